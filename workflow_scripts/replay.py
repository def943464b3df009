"""General text for CPT: the replay source mixed in against forgetting, and the held-out forgetting probe.

    python -m workflow_scripts.replay --source resources/replay/jaywalker.txt --model results/hf_models/smollm2-135m-instruct

A source is one of:
- a local .txt or .md file (one document), a .jsonl file (one document per record, field `text_field`), or a
  folder of such files (sorted by name);
- a Hugging Face dataset id (e.g. the paper's `togethercomputer/RedPajama-Data-1T-Sample`), read lazily with
  `datasets` in streaming mode: only the documents needed for the requested number of tokens are fetched (on a
  cluster, from its cache).

Documents are tokenized exactly like the corpora (workflow_scripts.corpus: [BOS] text [EOS]) and concatenated in
source order; no shuffle here, the training plan decides which block is used where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .io_utils import InputError, iter_jsonl

TEXT_SUFFIXES = (".txt", ".md")


def iter_texts(source: str, text_field: str = "text", split: str = "train",
               hf_config: str | None = None) -> Iterator[str]:
    """Documents of a source, lazily (see the module docstring for what a source is)."""
    path = Path(source)
    if path.exists():
        files = sorted(f for f in path.iterdir() if f.suffix in (*TEXT_SUFFIXES, ".jsonl")) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                for line, rec in iter_jsonl(f):
                    if not isinstance(rec.get(text_field), str):
                        raise InputError(f"{f}:{line}: no string field {text_field!r} (set cpt.replay.text_field)")
                    yield rec[text_field]
            else:
                yield f.read_text(encoding="utf-8")
        return
    if source.count("/") > 1 or source.startswith((".", "/", "~")) or Path(source).suffix in (*TEXT_SUFFIXES, ".jsonl"):
        raise InputError(f"{source}: general-text source not found; give a local .txt/.jsonl file or folder, or a "
                         "Hugging Face dataset id (owner/name)")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{source}: reading a Hugging Face dataset needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(source, hf_config, split=split, streaming=True)
    except Exception as e:  # network, cache or name errors: all mean "this source cannot be read here"
        raise InputError(f"{source}: cannot open the Hugging Face dataset ({type(e).__name__}: {e}); on an offline "
                         "machine pre-fill the cache, or point the source at a local file") from None
    for rec in ds:
        text = rec.get(text_field)
        if not isinstance(text, str):
            raise InputError(f"{source}: record without a string field {text_field!r} (set text_field)")
        yield text


def general_tokens(source: str, tok: Any, specials: dict[str, Any], max_tokens: int, *, text_field: str = "text",
                   split: str = "train", hf_config: str | None = None, batch_docs: int = 64) -> np.ndarray:
    """The first `max_tokens` tokens of a source's documents, tokenized like the corpora (int32 array: the paper's
    replay needs about 90M tokens per run, 360 MB)."""
    from .corpus import encode_documents

    parts: list[np.ndarray] = []
    n = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n
        for a in encode_documents(tok, batch, specials, np.dtype(np.int32), batch_size=len(batch)):
            parts.append(a)
            n += len(a)
        batch.clear()

    for text in iter_texts(source, text_field, split, hf_config):
        if text.strip():
            batch.append(text)
        if len(batch) >= batch_docs:
            flush()
            if n >= max_tokens:
                break
    if batch and n < max_tokens:
        flush()
    if n == 0:
        raise InputError(f"{source}: no text in the general-text source")
    return np.concatenate(parts)[:max_tokens]


def to_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """(n, block_size) view of the leading whole blocks; the last partial block is dropped."""
    n = len(tokens) // block_size
    return tokens[: n * block_size].reshape(n, block_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="local file/folder or Hugging Face dataset id")
    p.add_argument("--model", required=True, help="model folder or hub id whose tokenizer is used")
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train")
    args = p.parse_args(argv)
    from .corpus import load_tokenizer, special_tokens

    try:
        tok = load_tokenizer(args.model)
        specials = special_tokens(tok, {})
        tokens = general_tokens(args.source, tok, specials, args.max_tokens, text_field=args.text_field,
                                split=args.split)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"source": args.source, "tokens": int(len(tokens)),
                      "blocks": int(len(tokens) // args.block_size), "block_size": args.block_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
