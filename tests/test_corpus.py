"""Stage 5 (issue 4): corpora are tokenized with the CPT tokenizer as [BOS] text [EOS], shuffled with the seed
independently of file and line order, concatenated into a memory-mapped array whose manifest locates every
record; budgets are exact, nested prefixes; bad corpora fail with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import corpus as C
from workflow_scripts.config import section_defaults, validate_config
from workflow_scripts.io_utils import InputError

ROOT = Path(__file__).resolve().parent.parent
STORY = (ROOT / "resources" / "replay" / "jaywalker.txt").read_text(encoding="utf-8")


def paragraphs(n: int, start: int = 0) -> list[str]:
    """Real English text for fixture records: paragraphs of a vendored public-domain story."""
    paras = [p.strip() for p in STORY.split("\n\n") if len(p.strip()) > 80]
    return paras[start:start + n]


def write_shard(path: Path, method: str, article: str, texts: list[str], kinds: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            kind = (kinds or ["summary"] + ["pair"] * len(texts))[i]
            f.write(json.dumps({"id": f"{article}-{i:03d}", "method": method, "kind": kind, "article_uid": article,
                                "entities": [], "text": text}) + "\n")


def cfg(**corpus) -> dict:
    return validate_config({"seed": 7, "corpus": corpus})


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "synth" / "entigraph"
    write_shard(d / "a1.jsonl", "entigraph", "a1", paragraphs(6, 0))
    write_shard(d / "a2.jsonl", "entigraph", "a2", paragraphs(5, 6))
    (d / "ledger.json").write_text("{}")  # not a shard: must be ignored
    (d / "entities").mkdir()
    (d / "entities" / "a1.json").write_text('{"entities": ["Marcia"]}')
    return d


@pytest.mark.engine
def test_build_layout_offsets_and_special_tokens(shards, tmp_path, smollm_dir):
    from transformers import AutoTokenizer

    m = C.build_corpus("entigraph", [shards], str(smollm_dir), tmp_path / "out", cfg())
    tokens, manifest = C.load_corpus(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    assert tokens.dtype == np.uint16 and manifest["dtype"] == "uint16"  # 49,152 ids fit in 16 bits
    # SmolLM2-Instruct's bos/eos are chat markers: one plain <|endoftext|> after each document, no BOS
    assert manifest["tokenizer"]["bos"] is None
    assert manifest["tokenizer"]["eos"] == {"token": "<|endoftext|>", "id": tok.convert_tokens_to_ids("<|endoftext|>")}
    assert m["n_records"] == 11 and m["n_articles"] == 2 and len(m["inputs"]) == 2
    assert m["tokens_by_kind"]["summary"] + m["tokens_by_kind"]["pair"] == m["total_tokens"] == len(tokens)
    texts = {f"a1-{i:03d}": t for i, t in enumerate(paragraphs(6, 0))} | {f"a2-{i:03d}": t for i, t in enumerate(paragraphs(5, 6))}
    ids, offsets = manifest["records"]["ids"], manifest["records"]["offsets"] + [len(tokens)]
    assert sorted(ids) == sorted(texts)
    for rid, lo, hi in zip(ids, offsets, offsets[1:]):
        expect = tok(texts[rid], add_special_tokens=False)["input_ids"] + [0]
        assert tokens[lo:hi].tolist() == expect, rid
    assert int((tokens == 0).sum()) == 11  # exactly one separator per document


@pytest.mark.engine
def test_order_depends_on_records_and_seed_only(shards, tmp_path, tiny_model_dir):
    a = C.build_corpus("entigraph", [shards], str(tiny_model_dir), tmp_path / "a", cfg())
    files = sorted(shards.glob("*.jsonl"), reverse=True)  # other file order, same records
    b = C.build_corpus("entigraph", files, str(tiny_model_dir), tmp_path / "b", cfg())
    c = C.build_corpus("entigraph", [shards], str(tiny_model_dir), tmp_path / "c", cfg(seed=8))
    assert (tmp_path / "a" / "tokens.npy").read_bytes() == (tmp_path / "b" / "tokens.npy").read_bytes()
    assert a["records"]["ids"] == b["records"]["ids"] and a["config_hash"] == b["config_hash"]
    assert c["records"]["ids"] != a["records"]["ids"] and sorted(c["records"]["ids"]) == sorted(a["records"]["ids"])
    assert c["total_tokens"] == a["total_tokens"] and c["seed"] == 8


@pytest.mark.engine
def test_raw_corpus_is_the_articles(tmp_path, tiny_model_dir):
    arts = tmp_path / "articles.jsonl"
    rows = [{"uid": f"u{i}", "title": f"T{i}", "author": "A", "year": 1950, "text": t}
            for i, t in enumerate(paragraphs(3, 20))]
    arts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = C.build_corpus("raw", [arts], str(tiny_model_dir), tmp_path / "raw", cfg())
    assert sorted(m["records"]["ids"]) == ["u0", "u1", "u2"] and m["tokens_by_kind"] == {"article": m["total_tokens"]}


@pytest.mark.engine
def test_explicit_special_tokens_and_template_free_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    both = C.special_tokens(tok, {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"})
    assert both["bos"]["token"] == "<|im_start|>" and both["eos"]["token"] == "<|endoftext|>"
    arr = C.encode_documents(tok, ["Hello there."], both, np.dtype(np.uint16))[0]
    assert arr[0] == both["bos"]["id"] and arr[-1] == both["eos"]["id"]
    assert C.special_tokens(tok, {"bos_token": None, "eos_token": None}) == {"bos": None, "eos": None}
    tok.chat_template = None  # a base model: its own bos/eos are document boundaries (Llama 3 base style)
    plain = C.special_tokens(tok, section_defaults("corpus"))  # bos_token, eos_token: auto
    assert plain["bos"]["token"] == tok.bos_token and plain["eos"]["token"] == tok.eos_token
    with pytest.raises(InputError, match="not a token"):
        C.special_tokens(tok, {"bos_token": "auto", "eos_token": "<|no such token|>"})


@pytest.mark.unit
def test_token_dtype_follows_vocabulary_size():
    assert C.token_dtype(49152) == np.uint16 and C.token_dtype(65536) == np.uint16
    assert C.token_dtype(65537) == np.uint32 and C.token_dtype(128256) == np.uint32  # Llama 3


@pytest.mark.engine
def test_budgets_are_exact_and_nested_prefixes(shards, tmp_path, tiny_model_dir):
    C.build_corpus("entigraph", [shards], str(tiny_model_dir), tmp_path / "out", cfg())
    tokens, m = C.load_corpus(tmp_path / "out" / "tokens.npy")
    prefixes = {}
    for b in (100, 250, 600):
        n, capped = C.budget_tokens(len(tokens), b, allow_cap=False)
        assert (n, capped) == (b, False)
        prefixes[b] = np.asarray(tokens[:n])
    assert np.array_equal(prefixes[600][:250], prefixes[250]) and np.array_equal(prefixes[250][:100], prefixes[100])
    assert C.budget_tokens(len(tokens), "all", allow_cap=False) == (m["total_tokens"], False)


@pytest.mark.unit
def test_budget_larger_than_corpus_is_an_error_unless_capped():
    with pytest.raises(InputError, match=r"budget 5000 tokens exceeds the corpus \(4000 tokens\).*allow_budget_cap"):
        C.budget_tokens(4000, 5000, allow_cap=False, where="results/corpus/rephrase")
    assert C.budget_tokens(4000, 5000, allow_cap=True) == (4000, True)
    with pytest.raises(InputError, match="corpus is empty"):
        C.budget_tokens(0, "all", allow_cap=True)


@pytest.mark.engine
def test_empty_and_malformed_corpora_fail_clearly(tmp_path, tiny_model_dir):
    d = tmp_path / "synth" / "rephrase"
    write_shard(d / "a1.jsonl", "rephrase", "a1", ["   ", ""])
    (d / "a2.jsonl").write_text("")
    with pytest.raises(InputError, match=r"empty corpus for method 'rephrase'.*'empty_text': 2"):
        C.build_corpus("rephrase", [d], str(tiny_model_dir), tmp_path / "o", cfg())
    with pytest.raises(InputError, match="nothing-here: corpus input not found"):
        C.build_corpus("rephrase", [tmp_path / "nothing-here"], str(tiny_model_dir), tmp_path / "o", cfg())
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(InputError, match="no input files for method 'rephrase'"):
        C.build_corpus("rephrase", [tmp_path / "empty-dir"], str(tiny_model_dir), tmp_path / "o", cfg())
    (d / "a1.jsonl").write_text('{"id": "x1", "method": "rephrase", "txt": "typo"}\n')
    with pytest.raises(InputError, match=r"a1.jsonl:1: record needs a string 'id' and a string 'text'"):
        C.build_corpus("rephrase", [d], str(tiny_model_dir), tmp_path / "o", cfg())
    (d / "a1.jsonl").write_text('{"id": "x1", "method": "entigraph", "text": "wrong method"}\n')
    with pytest.raises(InputError, match="record of method 'entigraph' in the inputs of method 'rephrase'"):
        C.build_corpus("rephrase", [d], str(tiny_model_dir), tmp_path / "o", cfg())
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.engine
def test_duplicate_ids_dropped_or_rejected(tmp_path, tiny_model_dir):
    d = tmp_path / "s"
    write_shard(d / "a1.jsonl", "entigraph", "a1", paragraphs(2))
    shutil.copy(d / "a1.jsonl", d / "copy.jsonl")  # the same records twice: dropped and counted
    m = C.build_corpus("entigraph", [d], str(tiny_model_dir), tmp_path / "o", cfg())
    assert m["n_records"] == 2 and m["dropped"]["duplicate_id"] == 2
    write_shard(d / "copy.jsonl", "entigraph", "a1", ["a different text with the same id"])
    with pytest.raises(InputError, match="appears twice with different texts"):
        C.build_corpus("entigraph", [d], str(tiny_model_dir), tmp_path / "o", cfg())


@pytest.mark.engine
def test_command_line(shards, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    assert C.main(["build", "--method", "entigraph", "--model", str(tiny_model_dir), "--inputs", str(shards),
                   "--outdir", str(out), "--config-json", '{"seed": 3}']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["seed"] == 3 and info["total_tokens"] == len(np.load(out / "tokens.npy"))
    assert C.main(["info", str(out), "--budget", str(info["total_tokens"] + 1)]) == 2
    assert "exceeds the corpus" in capsys.readouterr().err
