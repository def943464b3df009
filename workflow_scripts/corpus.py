"""Stage 5: one training corpus per method: tokenize every record, shuffle with the seed, concatenate on disk.

    python -m workflow_scripts.corpus build --method entigraph --model results/hf_models/smollm2-135m-instruct \\
        --inputs results/synth/entigraph/ --outdir results/corpus/entigraph [--configfile config.yaml]
    python -m workflow_scripts.corpus build --method raw --model MODEL --inputs results/data/articles.jsonl --outdir results/corpus/raw
    python -m workflow_scripts.corpus info results/corpus/entigraph [--budget 4096]

Output contract (docs/architecture.md): `tokens.npy`, a 1-D memory-mappable array (uint16 when the vocabulary has
fewer than 65,536 ids, else uint32) holding every document, in the seeded shuffled order, as
`[BOS] text [EOS]`; and `manifest.json`: tokenizer, special tokens, seed, dtype, total tokens, the record ids
with their offsets into the array, statistics (tokens per kind, dropped records and why), inputs with their
sha256, and the config hash.

Documents: for a synthesis method, every record's `text` (EntiGraph: the summary and every relation text; the
entity lists are not records). For `raw`, the articles of results/data/articles.jsonl. Records are sorted by id
before the shuffle, so the order depends on the records and the seed only, never on file or line order.

Budgets (`budget_tokens`): a budget of N tokens is the first N tokens of this one order, so budgets are nested
(a smaller budget is a prefix of a larger one) and their token counts exact. A fraction budget rRATIO
(cpt.budget_unit: fraction; workflow_scripts/budgets.py) is the first int(total x ratio) tokens, as the authors cut
their corpus file. A budget larger than the corpus is an error unless capping is allowed, and a cap is recorded by
the caller (train.py writes it to its summary).

Special tokens (paper: BOS + text + EOS, the Llama 3 convention). `auto` takes the tokenizer's bos/eos token
unless it is a chat-template marker (SmolLM2-Instruct's bos `<|im_start|>` and eos `<|im_end|>` are turn
markers, not document boundaries); a marker is replaced by the tokenizer's plain document separator
(`<|end_of_text|>`, `<|endoftext|>` or `</s>`, the first the vocabulary has). When BOS and EOS resolve to the same
id, it is written once, after the text: SmolLM2 gets `text <|endoftext|>`, the single separator between
documents of its own pretraining corpus, instead of a doubled one. Llama 3 base gets
`<|begin_of_text|> text <|end_of_text|>`, as in the paper.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import stage
from .budgets import prefix_tokens
from .config import config_hash
from .derived import RAW
from .io_utils import InputError, atomic_path, iter_jsonl, sha256_file, write_json_atomic
from .job_keys import shaping_part
from .models import load_tokenizer

DOC_SEPARATORS = ("<|end_of_text|>", "<|endoftext|>", "</s>")
TOKENS_FILE = "tokens.npy"
MANIFEST_FILE = "manifest.json"


# ------------------------------------------------------------------------------------------------ tokens
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary < 65,536), else uint32: half the disk and page cache when possible."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _chat_markers(tok: Any) -> str:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    return template or ""


def resolve_special_token(tok: Any, which: str, setting: str | None) -> tuple[str | None, int | None]:
    """(token, id) for `which` in bos | eos from a setting: `auto`, null (none) or an explicit token string."""
    if setting is None:
        return None, None
    vocab = tok.get_vocab()
    if setting != "auto":
        if setting not in vocab:
            raise InputError(f"corpus.{which}_token {setting!r} is not a token of the tokenizer "
                             f"({getattr(tok, 'name_or_path', '?')}); use auto, null or one of its special tokens")
        return setting, vocab[setting]
    markers = _chat_markers(tok)
    token = getattr(tok, f"{which}_token", None)
    if token and token in vocab and token not in markers:
        return token, vocab[token]
    for sep in DOC_SEPARATORS:
        if sep in vocab and sep not in markers:
            return sep, vocab[sep]
    if token and token in vocab:  # only a chat marker exists: better than no boundary at all
        return token, vocab[token]
    return None, None


def special_tokens(tok: Any, cfg: dict) -> dict[str, Any]:
    """The resolved document boundaries: {"bos": (token, id) | None, "eos": ...}; a BOS equal to the EOS is dropped."""
    bos = resolve_special_token(tok, "bos", cfg["bos_token"])
    eos = resolve_special_token(tok, "eos", cfg["eos_token"])
    if bos[1] is not None and bos[1] == eos[1]:
        bos = (None, None)
    return {"bos": None if bos[1] is None else {"token": bos[0], "id": bos[1]},
            "eos": None if eos[1] is None else {"token": eos[0], "id": eos[1]}}


def encode_documents(tok: Any, texts: Sequence[str], specials: dict[str, Any], dtype: np.dtype,
                     batch_size: int = 1000, progress: bool = False) -> list[np.ndarray]:
    """[BOS] text [EOS] per document, with the fast tokenizer in batches; one compact array per document."""
    bos = [] if specials["bos"] is None else [specials["bos"]["id"]]
    eos = [] if specials["eos"] is None else [specials["eos"]["id"]]
    out: list[np.ndarray] = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="tokenize", unit="batch", file=sys.stderr)
    for start in starts:
        batch = list(texts[start:start + batch_size])
        ids = tok(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        out.extend(np.asarray(bos + x + eos, dtype=dtype) for x in ids)
    return out


# ----------------------------------------------------------------------------------------------- records
def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder stands for its *.jsonl files (not recursive: entities/ and ledgers stay out)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.jsonl")))
        elif not p.exists():
            raise InputError(f"{p}: corpus input not found; run the synthesis (or prepare_articles for raw) first")
        else:
            files.append(p)
    return files


def load_records(method: str, paths: Sequence[str | Path]) -> tuple[list[dict], dict[str, Any]]:
    """Documents of a method, sorted by id, with statistics. `raw` reads articles (uid, text); others read
    synthesis records (id, text, and optionally method, kind, article_uid)."""
    files = expand_inputs(paths)
    if not files:
        raise InputError(f"no input files for method {method!r} (given: {', '.join(map(str, paths)) or 'nothing'}); "
                         "run the synthesis (or prepare_articles for raw) first")
    key = "uid" if method == RAW else "id"
    by_id: dict[str, dict] = {}
    dropped = {"empty_text": 0, "duplicate_id": 0}
    inputs = []
    for path in files:
        n = 0
        for line, rec in iter_jsonl(path):
            where = f"{path}:{line}"
            if key not in rec or not isinstance(rec.get("text"), str):
                raise InputError(f"{where}: record needs a string '{key}' and a string 'text' field "
                                 f"(has {sorted(rec)}); is this a {'articles' if key == 'uid' else 'synthesis'} file?")
            if method != RAW and rec.get("method") not in (None, method):
                raise InputError(f"{where}: record of method {rec['method']!r} in the inputs of method {method!r}; "
                                 "check the input paths")
            n += 1
            if not rec["text"].strip():
                dropped["empty_text"] += 1
                continue
            rid = str(rec[key])
            doc = {"id": rid, "text": rec["text"], "kind": "article" if method == RAW else rec.get("kind"),
                   "article_uid": rid if method == RAW else rec.get("article_uid"),
                   "source_method": rec.get("source_method")}
            if rid in by_id:
                if by_id[rid]["text"] != doc["text"]:
                    raise InputError(f"{where}: id {rid!r} appears twice with different texts; "
                                     "ids must be unique (remove one of the records)")
                dropped["duplicate_id"] += 1
                continue
            by_id[rid] = doc
        inputs.append({"path": str(path), "sha256": sha256_file(path), "records": n})
    if not by_id:
        raise InputError(f"empty corpus for method {method!r}: no record with text in {', '.join(map(str, files))} "
                         f"(dropped: {dropped}); check that the synthesis wrote records")
    docs = [by_id[k] for k in sorted(by_id)]
    return docs, {"inputs": inputs, "dropped": dropped}


def format_documents(docs: list[dict], method: str, formats: dict[str, str],
                     articles: str | Path | None) -> str | None:
    """Render each document with corpus.document_format[method] (a filtered variant: its source method's), e.g.
    SPA's "{title}\n{text}"; returns the format used, or None when the texts stay as they are."""
    fmt = formats.get(method) or next((formats[d["source_method"]] for d in docs
                                       if d.get("source_method") in formats), None)
    if not fmt:
        return None
    titles: dict[str, str] = {}
    if "{title}" in fmt:
        if articles is None:
            raise InputError(f"corpus.document_format of {method!r} uses {{title}}: pass --articles "
                             "results/data/articles.jsonl")
        titles = {str(a["uid"]): str(a.get("title") or a["uid"]).strip() for _, a in iter_jsonl(articles)}
    for d in docs:
        if "{title}" in fmt and d["article_uid"] not in titles:
            raise InputError(f"record {d['id']}: article {d['article_uid']!r} is not in {articles}")
        d["text"] = fmt.replace("{title}", titles.get(d["article_uid"], "")).replace("{text}", d["text"])
    return fmt


def corpus_hash_section(cfg_corpus: dict, fmt: str | None) -> dict:
    """The corpus settings that shaped this corpus: the document format only when one applied (so adding formats
    for other methods changes no existing corpus)."""
    out = {k: v for k, v in cfg_corpus.items() if k != "document_format"}
    if fmt:
        out["document_format"] = fmt
    return out


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The seeded permutation of the id-sorted documents: one order per (records, seed)."""
    return np.random.default_rng(seed).permutation(n)


# ------------------------------------------------------------------------------------------------- build
def corpus_seed(cfg: dict) -> int:
    seed = cfg["corpus"].get("seed")
    return int(cfg["seed"] if seed is None else seed)


def build_corpus(method: str, inputs: Sequence[str | Path], tokenizer: str, outdir: str | Path,
                 cfg: dict, progress: bool = False, articles: str | Path | None = None) -> dict[str, Any]:
    """Tokenize, shuffle and concatenate a method's documents into outdir/tokens.npy + manifest.json."""
    t0 = time.time()
    outdir = Path(outdir)
    docs, stats = load_records(method, inputs)
    fmt = format_documents(docs, method, cfg["corpus"].get("document_format") or {}, articles)
    tok = load_tokenizer(tokenizer)
    specials = special_tokens(tok, cfg["corpus"])
    dtype = token_dtype(len(tok))
    seed = corpus_seed(cfg)
    order = shuffle_order(len(docs), seed)
    docs = [docs[i] for i in order]
    arrays = encode_documents(tok, [d["text"] for d in docs], specials, dtype,
                              batch_size=cfg["corpus"]["tokenize_batch"], progress=progress)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    total = int(lengths.sum())
    with atomic_path(outdir / TOKENS_FILE, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        for a, off in zip(arrays, offsets):
            arr[off:off + len(a)] = a
        arr.flush()
        del arr
    by_kind: dict[str, int] = {}
    for d, n in zip(docs, lengths):
        by_kind[str(d["kind"])] = by_kind.get(str(d["kind"]), 0) + int(n)
    tok_file = Path(tokenizer) / "tokenizer.json"
    manifest = {
        "method": method,
        "tokens_file": TOKENS_FILE,
        "layout": "1-D array; documents in shuffled order, each [BOS] text [EOS]; record i spans "
                  "offsets[i] .. offsets[i+1] (the last one to total_tokens)",
        "tokenizer": {"location": str(tokenizer), "class": type(tok).__name__, "vocab_size": len(tok),
                      "sha256": sha256_file(tok_file) if tok_file.exists() else None, **specials},
        "dtype": dtype.name,
        "seed": seed,
        "total_tokens": total,
        "n_records": len(docs),
        "n_articles": len({d["article_uid"] for d in docs if d["article_uid"] is not None}),
        "tokens_by_kind": dict(sorted(by_kind.items())),
        "mean_tokens_per_record": round(total / len(docs), 1),
        "dropped": stats["dropped"],
        "inputs": stats["inputs"],
        "document_format": fmt,
        "config_hash": config_hash({"seed": seed, "corpus": corpus_hash_section(shaping_part(cfg, "corpus"), fmt),
                                    "tokenizer": str(tokenizer)}),
        "seconds": round(time.time() - t0, 2),
        "records": {"ids": [d["id"] for d in docs], "offsets": offsets.tolist()},
    }
    write_json_atomic(outdir / MANIFEST_FILE, manifest)
    return manifest


def load_corpus(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(memory-mapped tokens, manifest) of a corpus folder (or of its tokens.npy)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".npy" else path
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        raise InputError(f"{manifest_path}: corpus manifest not found; build the corpus first "
                         f"(snakemake {folder}/{MANIFEST_FILE})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    tokens = np.load(folder / manifest.get("tokens_file", TOKENS_FILE), mmap_mode="r")
    if tokens.ndim != 1 or len(tokens) != manifest["total_tokens"]:
        raise InputError(f"{folder}: tokens.npy holds {tokens.shape} tokens but the manifest says "
                         f"{manifest['total_tokens']}; rebuild the corpus")
    return tokens, manifest


def budget_tokens(total: int, budget: int | str, allow_cap: bool, where: str = "corpus") -> tuple[int, bool]:
    """Tokens of a budget: (n, capped). `all` is the whole corpus; a number is an exact prefix length; rRATIO (the
    fraction unit, workflow_scripts/budgets.py) is int(total x ratio), as the authors' data/cptdata.py cuts it."""
    if total <= 0:
        raise InputError(f"{where}: the corpus is empty; nothing to train on")
    if budget == "all":
        return total, False
    try:
        n = prefix_tokens(total, budget)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    if n <= 0:
        raise InputError(f"{where}: budget {budget} is {n} tokens of this {total}-token corpus; it must be a "
                         "positive token count, a fraction giving at least one token, or 'all'")
    if n > total:
        if not allow_cap:
            raise InputError(f"{where}: budget {n} tokens exceeds the corpus ({total} tokens); lower cpt.budgets, "
                             "synthesize more, or set cpt.allow_budget_cap: true to train on the whole corpus "
                             "(the cap is recorded in train_summary.json)")
        return total, True
    return n, False


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = stage.parser("corpus", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = stage.subcommand(sub, "build", "tokenize, shuffle and concatenate one method's documents", config=True)
    b.add_argument("--method", required=True, help="synthesis method name, or 'raw' for the articles")
    b.add_argument("--model", required=True, help="folder or hub id of the CPT base model (its tokenizer is used)")
    b.add_argument("--inputs", nargs="+", required=True,
                   help="JSONL files, or folders of *.jsonl shards (raw: results/data/articles.jsonl)")
    b.add_argument("--outdir", required=True, help="output folder (tokens.npy + manifest.json)")
    b.add_argument("--articles", default=None, help="results/data/articles.jsonl (titles for corpus.document_format)")
    i = stage.subcommand(sub, "info", "print a corpus manifest's summary (and a budget's token count)")
    i.add_argument("corpus", help="corpus folder")
    i.add_argument("--budget", default=None, help="a token budget, rRATIO (a fraction) or 'all'")
    i.add_argument("--allow-cap", action="store_true")
    args = p.parse_args(argv)

    def body() -> None:
        if args.cmd == "build":
            m = build_corpus(args.method, args.inputs, args.model, args.outdir, stage.config(args), progress=True,
                             articles=args.articles)
            summary = {k: v for k, v in m.items() if k not in ("records", "inputs", "layout")}
        else:
            tokens, m = load_corpus(args.corpus)
            summary = {k: m[k] for k in ("method", "total_tokens", "n_records", "dtype", "seed", "config_hash")}
            if args.budget is not None:
                n, capped = budget_tokens(len(tokens), args.budget, args.allow_cap, args.corpus)
                summary.update(budget=args.budget, budget_tokens=n, capped=capped)
        print(json.dumps(summary))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
