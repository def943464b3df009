"""General text for CPT: the replay pool mixed in against forgetting, and the held-out forgetting probe.

    python -m workflow_scripts.replay prepare --input ~/Downloads/RedPajama-Data-1T-Sample --output data/replay/redpajama
    python -m workflow_scripts.replay check --source data/replay/redpajama --model results/hf_models/smollm2-135m-instruct

Replay text comes from local files only (docs/cpt.md "Replay"): a .txt/.md file (one document), a .jsonl file (one
document per record, field `text_field`), a .parquet file (column `text_field`), or a folder of such files (read
recursively, sorted by path). The paper's replay set, togethercomputer/RedPajama-Data-1T-Sample, is a Hub dataset
with a loading script, which `datasets` 5.x refuses to run; download its jsonl files once (e.g. `huggingface-cli
download togethercomputer/RedPajama-Data-1T-Sample --repo-type dataset --local-dir DIR`) and `prepare` turns them
into JSONL shards of `{"text": ...}` (metadata dropped, empty documents skipped, byte-order marks removed) with a
manifest.

As the authors' code does (data/tokenize_redpj.py, data/cptdata.py of their repository): the documents are shuffled
with the seed and a part is held out (`heldout_fraction`, 1% in the reference); the shuffled training documents,
tokenized like the corpora ([BOS] text [EOS], concatenated), form a pool of at most `max_tokens` tokens cut into
blocks of `block_size`; every replay draw is one of those blocks chosen uniformly at random (seeded), not the
stream's first tokens. The held-out part is the natural forgetting probe (`cpt.probe.source: replay:heldout`).

The pool is built once per run by a CPU job (rule replay_pool: `python -m workflow_scripts.replay pool`) into
results/replay/pool/: tokens.bin (the pool, raw uint32), heldout.bin (the held-out documents' first probe tokens
when cpt.probe.source is replay:heldout, else empty) and meta.json (the settings, the tokenizer and the source's
fingerprint). Every CPT process memory-maps it (train.py --replay-pool) after checking meta.json against its own
settings and corpus tokenizer, so no rank reads or tokenizes the source. Without --replay-pool train.py builds the
pool itself, as before (optionally cached in cpt.replay.cache_dir).

A forgetting probe must never be training data: `probe_blocks` refuses (InputError, one line) a probe whose
13-token sequences occur in the tokens the run trains on (corpus budget and replay blocks) or in the prepared
articles beyond `cpt.probe.max_overlap`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import stage
from .io_utils import InputError, atomic_path, iter_jsonl, read_text, sha256_file, stable_hash, write_json_atomic
from .layout import POOL_HELDOUT, POOL_META, POOL_TOKENS

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
HELDOUT = "replay:heldout"  # probe source: the held-out part of cpt.replay.source
NGRAM = 13  # overlap unit of the probe check (tokens): long enough that shared phrases are copies, not idiom
DOWNLOAD_HINT = ("download it once and point the source at the local files (python -m workflow_scripts.replay "
                 "prepare turns the RedPajama sample's jsonl files into that form; docs/cpt.md)")


# ----------------------------------------------------------------------------------------------- reading
def source_files(source: str | Path) -> list[Path]:
    """The files of a local source (a file, or a folder read recursively in path order)."""
    path = Path(source).expanduser()
    if not path.exists():
        hub = isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
        raise InputError(f"{source}: general-text source not found" + (
            "; Hub datasets are not read directly (datasets 5.x refuses those with a loading script, such as "
            f"RedPajama-Data-1T-Sample): {DOWNLOAD_HINT}" if hub else
            "; give a local .txt/.md/.jsonl/.parquet file or a folder of them"))
    if path.is_file():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in (*TEXT_SUFFIXES, *RECORD_SUFFIXES))
    if not files:
        raise InputError(f"{path}: no .txt, .md, .jsonl or .parquet files in the general-text folder")
    return files


def general_text_sources(cfg: dict) -> dict[str, str]:
    """The local general-text sources the jobs read, by config key: cpt.replay.source when CPT replays
    (cpt.replay.rate > 0) or a mixture draws on it, cpt.probe.source unless null or `replay:heldout`. Every source is
    local (Hub datasets are not read: source_files), so each must exist before a job reads it."""
    cpt = cfg["cpt"]
    out: dict[str, str] = {}
    mixed = any("replay" in m["sources"] for m in (cfg.get("mixtures") or {}).values())
    if cpt["replay"]["source"] and (cpt["replay"]["rate"] > 0 or mixed):
        out["cpt.replay.source"] = str(cpt["replay"]["source"])
    if cpt["probe"]["source"] and cpt["probe"]["source"] != HELDOUT:
        out["cpt.probe.source"] = str(cpt["probe"]["source"])
    return out


def missing_sources(cfg: dict) -> list[str]:
    """One line per general-text source that does not exist, naming its key and what to do: a real run stops on
    them before any job (rules/common.smk onstart); a dry run plans without them."""
    return [f"{key} {path}: no such file or folder; {DOWNLOAD_HINT}" if key == "cpt.replay.source" else
            f"{key} {path}: no such file or folder; give a local .txt/.md/.jsonl/.parquet file or folder, "
            f"{HELDOUT}, or null"
            for key, path in general_text_sources(cfg).items() if not Path(path).expanduser().exists()]


def _parquet_texts(path: Path, text_field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if text_field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no column {text_field!r} (have {pf.schema_arrow.names}; set text_field)")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield f"{path} row {row}", value


def iter_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a local source in file order (see the module docstring); a record without a string field
    `text_field` is an InputError naming it."""
    for f in source_files(source):
        suffix = f.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield read_text(f)
            continue
        items: Iterable[tuple[str, Any]]
        if suffix == ".jsonl":
            items = ((f"{f}:{line}", rec.get(text_field)) for line, rec in iter_jsonl(f))
        else:
            items = _parquet_texts(f, text_field)
        for where, text in items:
            if not isinstance(text, str):
                raise InputError(f"{where}: no string field {text_field!r} (set cpt.replay.text_field / "
                                 "cpt.probe.text_field)")
            yield text.lstrip("\ufeff")


def iter_texts(source: str, text_field: str = "text", split: str = "train",
               hf_config: str | None = None) -> Iterator[str]:
    """Documents of a local source (kept for callers of the earlier API; `split`/`hf_config` are unused)."""
    return iter_documents(source, text_field)


def load_documents(source: str | Path, text_field: str = "text") -> list[str]:
    """All non-empty documents of a source, in file order."""
    docs = [t for t in iter_documents(source, text_field) if t.strip()]
    if not docs:
        raise InputError(f"{source}: no text in the general-text source")
    return docs


def shuffle_split(n_docs: int, seed: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training order, held-out documents) as index arrays: a seeded permutation of the documents whose last
    int(heldout_fraction * n) entries are held out (a single document is never held out)."""
    perm = np.random.default_rng([seed, 7]).permutation(n_docs)
    n_held = int(heldout_fraction * n_docs)
    return perm[:n_docs - n_held], perm[n_docs - n_held:]


# ----------------------------------------------------------------------------------------------- the replay pool
def _tokenize_until(tok: Any, texts: Iterable[str], specials: dict[str, Any], max_tokens: int,
                    batch_docs: int = 256) -> np.ndarray:
    """[BOS] text [EOS] of `texts` in order, concatenated, cut at max_tokens (int32)."""
    from .corpus import encode_documents

    parts: list[np.ndarray] = []
    n, batch = 0, []

    def flush() -> None:
        nonlocal n
        for a in encode_documents(tok, batch, specials, np.dtype(np.int32), batch_size=len(batch)):
            parts.append(a)
            n += len(a)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
            if n >= max_tokens:
                break
    if batch and n < max_tokens:
        flush()
    return np.concatenate(parts)[:max_tokens] if parts else np.zeros(0, np.int32)


def _cache_key(rp: dict, tok: Any, specials: dict[str, Any], seed: int) -> str:
    files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files(rp["source"])]
    return stable_hash(files, rp["text_field"], rp["heldout_fraction"], rp["max_tokens"], seed,
                       getattr(tok, "name_or_path", ""), len(tok), json.dumps(specials, sort_keys=True, default=str))


def replay_pool(rp: dict, tok: Any, specials: dict[str, Any], seed: int) -> np.ndarray:
    """The replay pool of cpt.replay `rp`: the shuffled, not held-out documents tokenized up to rp.max_tokens.

    With rp.cache_dir set the pool is saved there (keyed by the files, tokenizer and settings) and reused by the
    other CPT jobs of the run, so a large source is tokenized once."""
    cache = None
    if rp.get("cache_dir"):
        cache = Path(rp["cache_dir"]) / f"pool-{_cache_key(rp, tok, specials, seed)}.npy"
        if cache.exists():
            return np.load(cache, mmap_mode="r")
    docs = load_documents(rp["source"], rp["text_field"])
    order, _ = shuffle_split(len(docs), seed, rp["heldout_fraction"])
    pool = _tokenize_until(tok, (docs[i] for i in order), specials, rp["max_tokens"])
    if cache is not None:
        with atomic_path(cache, suffix=".npy") as tmp:
            np.save(tmp, pool)
    return pool


# ------------------------------------------------------------------------------- the pool built once per run
POOL_DTYPE = np.dtype(np.uint32)


@dataclass
class Pool:
    """A built replay pool, memory-mapped: the pool's tokens and the held-out probe tokens (None unless built for
    cpt.probe.source replay:heldout)."""

    tokens: np.ndarray
    heldout: np.ndarray | None
    meta: dict


def pool_settings(cpt: dict, seed: int) -> dict:
    """What a pool's tokens depend on besides the tokenizer and the source's files."""
    rp, pc = cpt["replay"], cpt["probe"]
    return {"source": str(rp["source"]), "text_field": rp["text_field"], "heldout_fraction": rp["heldout_fraction"],
            "max_tokens": rp["max_tokens"], "seed": int(seed),
            "heldout_max_tokens": pc["max_tokens"] if pc["source"] == HELDOUT else 0}


def source_fingerprint(source: str | Path) -> str:
    """The source's files (paths relative to it) and sizes: a pool built from other files is stale."""
    root = Path(source).expanduser()
    files = source_files(source)
    return stable_hash([(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size) for f in files])


def tokenizer_record(location: str, tok: Any, specials: dict[str, Any]) -> dict:
    """The tokenizer as a corpus manifest records it (workflow_scripts/corpus.py build_corpus)."""
    tok_file = Path(location) / "tokenizer.json"
    return {"location": str(location), "class": type(tok).__name__, "vocab_size": len(tok),
            "sha256": sha256_file(tok_file) if tok_file.exists() else None, **specials}


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer records tokenize alike: class, vocabulary size, BOS/EOS, and tokenizer.json's content
    (its location when either has no tokenizer.json, e.g. a hub id)."""
    keys = ("class", "vocab_size", "bos", "eos")
    same_file = a["sha256"] == b["sha256"] if a.get("sha256") and b.get("sha256") else a["location"] == b["location"]
    return same_file and all(a.get(k) == b.get(k) for k in keys)


def _write_tokens(path: Path, tokens: np.ndarray) -> None:
    with atomic_path(path, suffix=".bin") as tmp:
        np.asarray(tokens, dtype=POOL_DTYPE).tofile(tmp)


def build_pool(cpt: dict, seed: int, location: str, tok: Any, specials: dict[str, Any], outdir: str | Path) -> dict:
    """Tokenize the replay pool (and the held-out probe tokens) once into `outdir`; returns meta.json's content.
    The same tokens as `replay_pool` and `probe_tokens` compute in a CPT process (tests/test_protocol.py)."""
    rp, outdir = cpt["replay"], Path(outdir)
    if not rp.get("source"):
        raise InputError("the replay pool needs cpt.replay.source (a local text/JSONL/parquet file or folder)")
    settings = pool_settings(cpt, seed)
    docs = load_documents(rp["source"], rp["text_field"])
    order, held = shuffle_split(len(docs), seed, rp["heldout_fraction"])
    pool = _tokenize_until(tok, (docs[i] for i in order), specials, rp["max_tokens"])
    heldout = np.zeros(0, np.int32)
    if settings["heldout_max_tokens"] and len(held):
        heldout = _tokenize_until(tok, (docs[i] for i in sorted(held)), specials, settings["heldout_max_tokens"])
    _write_tokens(outdir / POOL_TOKENS, pool)
    _write_tokens(outdir / POOL_HELDOUT, heldout)
    meta = {"settings": settings, "tokenizer": tokenizer_record(location, tok, specials),
            "source_fingerprint": source_fingerprint(rp["source"]), "documents": len(docs),
            "heldout_documents": int(len(held)), "tokens": int(len(pool)), "heldout_tokens": int(len(heldout)),
            "dtype": POOL_DTYPE.name, "files": {"tokens": POOL_TOKENS, "heldout": POOL_HELDOUT}}
    write_json_atomic(outdir / POOL_META, meta)
    return meta


def _memmap(path: Path, n: int) -> np.ndarray:
    if path.stat().st_size != n * POOL_DTYPE.itemsize:
        raise InputError(f"{path}: {path.stat().st_size} bytes, expected {n} uint32 tokens; rebuild the replay pool")
    return np.memmap(path, dtype=POOL_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, POOL_DTYPE)


def load_pool(pool_dir: str | Path, cpt: dict, seed: int, tokenizer: dict) -> Pool:
    """The pool built by `build_pool`, memory-mapped, after checking that it is this run's: the same settings, a
    tokenizer that tokenizes like the corpus's (`tokenizer`: the corpus manifest's record) and the same source
    files. Anything else is an InputError naming what differs."""
    pool_dir = Path(pool_dir)
    meta_path = pool_dir / POOL_META
    if not meta_path.exists():
        raise InputError(f"{pool_dir}: no {POOL_META}; build the replay pool first (rule replay_pool)")
    meta = json.loads(meta_path.read_text())
    want = pool_settings(cpt, seed)
    diff = sorted(k for k in want if meta["settings"].get(k) != want[k])
    if diff:
        raise InputError(f"{pool_dir}: replay pool built with other settings ({', '.join(diff)}: "
                         f"{[meta['settings'].get(k) for k in diff]} vs {[want[k] for k in diff]}); rebuild it")
    if not same_tokenizer(meta["tokenizer"], tokenizer):
        raise InputError(f"{pool_dir}: replay pool tokenized with {meta['tokenizer']['location']}, not like the "
                         f"corpus ({tokenizer['location']}); rebuild it with the CPT model's tokenizer")
    if meta["source_fingerprint"] != source_fingerprint(cpt["replay"]["source"]):
        raise InputError(f"{pool_dir}: the files of {cpt['replay']['source']} changed since the replay pool was "
                         "built; rebuild it")
    heldout = _memmap(pool_dir / POOL_HELDOUT, meta["heldout_tokens"]) if want["heldout_max_tokens"] else None
    return Pool(_memmap(pool_dir / POOL_TOKENS, meta["tokens"]), heldout, meta)


def draw_blocks(pool: np.ndarray, n_draws: int, block_size: int, seed: int) -> np.ndarray:
    """`n_draws` blocks drawn uniformly at random (with replacement, seeded) from the pool cut into blocks of
    `block_size` tokens, as the reference's CPTDataset draws `randint(len(rehersal_data))` (data/cptdata.py)."""
    n_blocks = len(pool) // block_size
    if n_blocks == 0:
        raise InputError(f"the replay pool holds {len(pool)} tokens, fewer than one block of {block_size}; give "
                         "more general text or raise cpt.replay.max_tokens")
    idx = np.random.default_rng([seed, 3]).integers(0, n_blocks, size=n_draws)
    return np.asarray(to_blocks(np.asarray(pool), block_size))[idx].astype(np.int32)


def replay_blocks(rp: dict, tok: Any, specials: dict[str, Any], block_size: int, n_draws: int,
                  seed: int, pool: Pool | None = None) -> np.ndarray:
    """The replay blocks of one CPT run: `n_draws` random blocks of the pool (train.py's entry point): the built
    `pool` when given, else tokenized here."""
    if not rp.get("source"):
        raise InputError("cpt.replay.rate > 0 needs cpt.replay.source (a local text/JSONL/parquet file or folder); "
                         "or set cpt.replay.rate: 0")
    tokens = pool.tokens if pool is not None else replay_pool(rp, tok, specials, seed)
    return draw_blocks(tokens, n_draws, block_size, seed)


def to_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """(n, block_size) view of the leading whole blocks; the last partial block is dropped."""
    n = len(tokens) // block_size
    return tokens[: n * block_size].reshape(n, block_size)


def general_tokens(source: str, tok: Any, specials: dict[str, Any], max_tokens: int, *, text_field: str = "text",
                   split: str = "train", hf_config: str | None = None, batch_docs: int = 64) -> np.ndarray:
    """The first `max_tokens` tokens of a local source's documents in file order, tokenized like the corpora."""
    tokens = _tokenize_until(tok, (t for t in iter_documents(source, text_field) if t.strip()), specials,
                             max_tokens, batch_docs)
    if len(tokens) == 0:
        raise InputError(f"{source}: no text in the general-text source")
    return tokens


# ----------------------------------------------------------------------------------------------- the probe
def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """A 64-bit rolling hash of every n-token window (uint64 arithmetic wraps, which is intended)."""
    t = np.asarray(tokens).reshape(-1).astype(np.uint64)
    m = len(t) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + t[j:j + m] + np.uint64(1)
    return h


def overlap_fraction(probe: np.ndarray, others: Iterable[np.ndarray], n: int = NGRAM,
                     chunk: int = 1 << 24) -> float:
    """Fraction of the probe's distinct n-token windows that occur anywhere in `others` (scanned in chunks)."""
    ph = np.unique(ngram_hashes(probe, n))
    if len(ph) == 0:
        return 0.0
    seen = np.zeros(len(ph), bool)
    for arr in others:
        flat = np.asarray(arr).reshape(-1)
        for start in range(0, max(1, len(flat) - n + 1), chunk):
            hs = ngram_hashes(flat[start:start + chunk + n - 1], n)
            idx = np.minimum(np.searchsorted(ph, hs), len(ph) - 1)
            seen[idx[ph[idx] == hs]] = True
    return float(seen.mean())


def probe_tokens(cpt: dict, tok: Any, specials: dict[str, Any], seed: int, pool: Pool | None = None) -> np.ndarray:
    """The probe's tokens: the held-out part of the replay source (`replay:heldout`; from the built `pool` when
    it holds them) or a local source."""
    pc = cpt["probe"]
    if pc["source"] == HELDOUT:
        rp = cpt["replay"]
        if not rp.get("source"):
            raise InputError(f"cpt.probe.source {HELDOUT} needs cpt.replay.source")
        if pool is not None and pool.heldout is not None:
            n_docs, n_held = pool.meta["documents"], pool.meta["heldout_documents"]
        else:
            docs = load_documents(rp["source"], rp["text_field"])
            _, held = shuffle_split(len(docs), seed, rp["heldout_fraction"])
            n_docs, n_held = len(docs), len(held)
        if n_held == 0:
            raise InputError(f"cpt.probe.source {HELDOUT}: cpt.replay.heldout_fraction "
                             f"{rp['heldout_fraction']} of {n_docs} documents holds none out; raise it")
        if pool is not None and pool.heldout is not None:
            return np.asarray(pool.heldout[:pc["max_tokens"]], dtype=np.int32)
        return _tokenize_until(tok, (docs[i] for i in sorted(held)), specials, pc["max_tokens"])
    return general_tokens(pc["source"], tok, specials, pc["max_tokens"], text_field=pc["text_field"])


def article_tokens(articles_path: str | Path, tok: Any, specials: dict[str, Any]) -> list[np.ndarray]:
    """The prepared articles (articles.jsonl), tokenized like the corpora."""
    from .corpus import encode_documents

    texts = [rec.get("text") or "" for _, rec in iter_jsonl(articles_path)]
    return encode_documents(tok, texts, specials, np.dtype(np.int32), batch_size=64)


def check_probe(probe: np.ndarray, source: str, training: Sequence[np.ndarray], articles: Sequence[np.ndarray],
                max_overlap: float, articles_path: str | Path | None = None) -> dict[str, float]:
    """Refuse a probe that is training data: the fraction of its 13-token windows found in the training tokens or
    in the articles must not exceed `max_overlap`. Returns both fractions."""
    found = {"training": overlap_fraction(probe, training), "articles": overlap_fraction(probe, articles)}
    for what, frac in found.items():
        if frac > max_overlap:
            where = "the tokens this run trains on (corpus budget and replay blocks)" if what == "training" else \
                f"the prepared articles ({articles_path})"
            raise InputError(f"cpt.probe.source {source}: {frac:.0%} of its {NGRAM}-token sequences occur in {where} "
                             f"(cpt.probe.max_overlap {max_overlap:.0%}); the forgetting probe must be held-out text: "
                             f"use {HELDOUT} or text the run never trains on")
    return found


def probe_blocks(cpt: dict, tok: Any, specials: dict[str, Any], block_size: int, seed: int,
                 training: Sequence[np.ndarray | None], articles_path: str | Path | None,
                 pool: Pool | None = None) -> tuple[Any, dict]:
    """The forgetting probe as blocks (train.py's entry point), after `check_probe`; (None, {}) without a probe."""
    if not cpt["probe"]["source"]:
        return None, {}
    pt = probe_tokens(cpt, tok, specials, seed, pool)
    if len(pt) == 0:
        raise InputError(f"{cpt['probe']['source']}: no text for the forgetting probe")
    arts = article_tokens(articles_path, tok, specials) if articles_path else []
    found = check_probe(pt, cpt["probe"]["source"], [t for t in training if t is not None], arts,
                        cpt["probe"]["max_overlap"], articles_path)
    return (to_blocks(pt, block_size) if len(pt) >= block_size else pt[None, :]), found


# ----------------------------------------------------------------------------------------------- prepare
def prepare(inputs: Sequence[str | Path], output: str | Path, text_field: str = "text",
            shard_documents: int = 100_000, max_documents: int | None = None) -> dict:
    """Turn downloaded general text (e.g. the RedPajama sample's *.jsonl files, or any supported local files)
    into JSONL shards `part-NNNNN.jsonl` of {"text": ...} in `output`, plus manifest.json. Order is kept (the CPT
    stage shuffles with the run's seed)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    shards, n_docs, n_chars, skipped = [], 0, 0, 0
    buf: list[str] = []

    def flush() -> None:
        path = output / f"part-{len(shards):05d}.jsonl"
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in buf), encoding="utf-8")
        shards.append({"file": path.name, "documents": len(buf)})
        buf.clear()

    sources = [str(f) for src in inputs for f in source_files(src)]
    for src in inputs:
        for text in iter_documents(src, text_field):
            if max_documents is not None and n_docs >= max_documents:
                break
            if not text.strip():
                skipped += 1
                continue
            buf.append(text)
            n_docs += 1
            n_chars += len(text)
            if len(buf) >= shard_documents:
                flush()
    if buf:
        flush()
    if not n_docs:
        raise InputError(f"{', '.join(map(str, inputs))}: no documents with text")
    manifest = {"documents": n_docs, "characters": n_chars, "empty_skipped": skipped, "shards": shards,
                "inputs": sources, "text_field_in": text_field}
    write_json_atomic(output / "manifest.json", manifest)
    return manifest


def _check_pool(args: argparse.Namespace) -> None:
    """`replay check`: tokenize a source's replay pool and print its size."""
    from .config import section_defaults
    from .corpus import special_tokens
    from .models import load_tokenizer

    tok = load_tokenizer(args.model)
    rp = {"source": args.source, "text_field": args.text_field, "heldout_fraction": args.heldout_fraction,
          "max_tokens": args.max_tokens, "cache_dir": None}
    pool = replay_pool(rp, tok, special_tokens(tok, section_defaults("corpus")), args.seed)
    print(json.dumps({"source": args.source, "pool_tokens": int(len(pool)), "block_size": args.block_size,
                      "distinct_start_positions": max(0, int(len(pool)) - args.block_size + 1)}))


def _build_pool(args: argparse.Namespace) -> None:
    """`replay pool`: the run's replay pool, built once (rule replay_pool), and a one-line summary."""
    from .config import section_defaults
    from .corpus import special_tokens
    from .models import load_tokenizer

    cfg = stage.config(args)
    cpt = cfg["cpt"]
    seed = int(cpt["seed"] if cpt.get("seed") is not None else cfg["seed"])
    tok = load_tokenizer(args.model)
    meta = build_pool(cpt, seed, args.model, tok, special_tokens(tok, cfg["corpus"]), args.outdir)
    print(json.dumps({k: meta[k] for k in ("documents", "heldout_documents", "tokens", "heldout_tokens")}
                     | {"outdir": args.outdir}))


def _prepare(args: argparse.Namespace) -> None:
    """`replay prepare`: local JSONL shards of downloaded general text, and a one-line summary."""
    out = prepare(args.input, args.output, args.text_field, args.shard_documents, args.max_documents)
    print(json.dumps({k: out[k] for k in ("documents", "characters", "empty_skipped")} |
                     {"shards": len(out["shards"]), "output": args.output}))


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("replay", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = stage.subcommand(sub, "prepare", "downloaded general text (e.g. the RedPajama sample) -> local JSONL shards")
    pp.add_argument("--input", nargs="+", required=True, help="files or folders (.jsonl, .parquet, .txt, .md)")
    pp.add_argument("--output", required=True, help="folder for part-NNNNN.jsonl + manifest.json")
    pp.add_argument("--text-field", default="text")
    pp.add_argument("--shard-documents", type=int, default=100_000)
    pp.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    pc = stage.subcommand(sub, "check", "tokenize a source's replay pool and report its size")
    pc.add_argument("--source", required=True)
    pc.add_argument("--model", required=True, help="model folder or hub id whose tokenizer is used")
    pc.add_argument("--max-tokens", type=int, default=1_000_000)
    pc.add_argument("--heldout-fraction", type=float, default=0.01)
    pc.add_argument("--block-size", type=int, default=2048)
    pc.add_argument("--text-field", default="text")
    pc.add_argument("--seed", type=int, default=42)
    pb = stage.subcommand(sub, "pool", "tokenize the run's replay pool once (tokens.bin, heldout.bin, meta.json)",
                          config=True)
    pb.add_argument("--model", required=True, help="the CPT base model (its tokenizer, as the corpora's)")
    pb.add_argument("--outdir", required=True, help="folder of the pool (results/replay/pool)")
    args = p.parse_args(argv)
    return stage.run(lambda: {"prepare": _prepare, "check": _check_pool, "pool": _build_pool}[args.cmd](args))


if __name__ == "__main__":
    sys.exit(main())
