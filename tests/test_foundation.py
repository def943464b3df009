"""Foundation (issue 2): config defaults and errors, atomic and append-only writers, packaged-model conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow_scripts.config import config_hash, load_config, resolve_shipped_files, validate_config
from workflow_scripts.io_utils import AppendOnlyJsonl, InputError, iter_jsonl, write_json_atomic
from workflow_scripts.models import model_location

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_schema_fills_defaults_and_demo_config_validates():
    cfg = validate_config({})
    assert cfg["data"]["quality"]["url"].startswith("https://github.com/nyu-mll/quality/")
    assert cfg["data"]["quality"]["splits"] == ["train", "dev"]
    assert cfg["models"]["base"] == {"source": "package", "name": "smollm2-135m-instruct", "revision": None, "dtype": "auto"}
    demo = load_config([ROOT / "config.yaml"])
    assert demo["data"]["quality"]["url"] == "resources/quality/QuALITY.v1.0.1.zip"


@pytest.mark.unit
def test_shipped_files_resolve_to_the_workflow_only_when_the_working_folder_lacks_them(tmp_path):
    def cfg():
        return {"data": {"quality": {"url": "resources/quality/QuALITY.v1.0.1.zip"}},
                "cpt": {"replay": {"source": "resources/replay/jaywalker.txt"}, "probe": {"source": "mine.txt"}},
                "instruct": {"data": {"source": "gutenberg"}}}

    # From another folder: the workflow's own copy; a path the workflow does not ship and a name stay as given.
    other = resolve_shipped_files(cfg(), tmp_path)
    assert other["data"]["quality"]["url"] == str(ROOT / "resources/quality/QuALITY.v1.0.1.zip")
    assert other["cpt"]["replay"]["source"] == str(ROOT / "resources/replay/jaywalker.txt")
    assert other["cpt"]["probe"]["source"] == "mine.txt" and other["instruct"]["data"]["source"] == "gutenberg"
    # The user's own file of that name wins, as a relative path in Snakemake does.
    (tmp_path / "resources/replay").mkdir(parents=True)
    (tmp_path / "resources/replay/jaywalker.txt").write_text("my replay text")
    assert resolve_shipped_files(cfg(), tmp_path)["cpt"]["replay"]["source"] == "resources/replay/jaywalker.txt"
    assert resolve_shipped_files(cfg(), ROOT) == cfg()


@pytest.mark.unit
def test_invalid_config_names_the_key():
    with pytest.raises(ValueError, match=r"data\.max_articles: 0 is less than the minimum"):
        validate_config({"data": {"max_articles": 0}})
    with pytest.raises(ValueError, match=r"data: Additional properties are not allowed \('max_artcles'"):
        validate_config({"data": {"max_artcles": 3}})


@pytest.mark.unit
def test_config_hash_is_stable_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.unit
def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"ok": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": Boom()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.unit
def test_append_only_jsonl_skips_existing_and_repairs_truncated_tail(tmp_path):
    path = tmp_path / "shard.jsonl"
    with AppendOnlyJsonl(path) as w:
        assert w.append({"id": "a", "text": "one"})
        assert not w.append({"id": "a", "text": "again"})
    with open(path, "a", encoding="utf-8") as f:  # a kill in the middle of a write
        f.write('{"id": "b", "te')
    with AppendOnlyJsonl(path) as w:
        assert "a" in w and "b" not in w
        assert w.append({"id": "b", "text": "two"})
    assert [r["id"] for _, r in iter_jsonl(path)] == ["a", "b"]


@pytest.mark.unit
def test_iter_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: expected a JSON object"):
        list(iter_jsonl(p))


@pytest.mark.unit
def test_model_location():
    assert model_location({"source": "package", "name": "smollm2-135m-instruct"}) == "results/hf_models/smollm2-135m-instruct"
    assert model_location({"source": "hf", "name": "meta-llama/Meta-Llama-3-8B"}) == "meta-llama/Meta-Llama-3-8B"


@pytest.mark.engine
def test_packaged_model_converts_to_a_loadable_folder(smollm_dir):
    """The real offline model: the converted folder loads with plain from_pretrained and answers sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smollm_dir / "conversion.json").read_text())
    assert info["parameters"] > 100_000_000 and info["vocab_size"] == 49152
    assert (smollm_dir / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.unit
def test_method_budgets_override_per_method():
    from workflow_scripts.config import method_budgets

    cfg = validate_config({"cpt": {"budgets": [100, 200, 400], "method_budgets": {"rephrase": [100, 150]}}})
    assert method_budgets(cfg, "entigraph") == [100, 200, 400]
    assert method_budgets(cfg, "rephrase") == [100, 150]
    paper = load_config([ROOT / "config.yaml", ROOT / "experiments/paper.yaml"])
    assert max(method_budgets(paper, "rephrase")) <= 38_000_000 < max(method_budgets(paper, "entigraph"))


@pytest.mark.unit
def test_budget_shorter_than_a_block_fails_at_planning_time():
    from workflow_scripts.config import check_budgets

    cfg = validate_config({"synthesis": {"methods": ["entigraph", "rephrase"]},
                           "cpt": {"budgets": [256], "block_size": 128, "method_budgets": {"rephrase": [96, 256]}}})
    with pytest.raises(ValueError, match=r"shorter than one block of cpt.block_size=128 tokens: rephrase 96"):
        check_budgets(cfg)
    check_budgets(load_config([ROOT / "config.yaml"]))
    check_budgets(load_config([ROOT / "config.yaml", ROOT / "experiments/paper.yaml"]))
