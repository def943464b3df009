"""Benchmark the transformers engine's two levers on EntiGraph relation requests: batching and prefix KV reuse.

One article, eight pair-style relation requests (the paper's system prompt + the article + a `### Entities:` list
that differs per request), greedy decoding with a fixed max_new_tokens, run four ways on the real offline model:

    naive     batch_size 1, no prefix reuse (one request at a time, full prompt each)
    batching  batch_size 8, no prefix reuse
    prefix    batch_size 1, prefix reuse (the article prefix is prefilled once, each request feeds its suffix)
    both      batch_size 8, prefix reuse

and reports completion tokens per second (wall time of the whole generate call, prefill included) and the
speed-ups over naive. Greedy decoding makes the four runs produce the same texts (checked and reported).

    .venv/bin/python benchmarks/bench_synthesis_engine.py                       # prints the table
    .venv/bin/python benchmarks/bench_synthesis_engine.py --results-md benchmarks/RESULTS.md   # and appends it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workflow_scripts.backends import GenerationRequest  # noqa: E402
from workflow_scripts.quality import author_first_last, read_quality_zip, truncate_text  # noqa: E402

MODES = [("naive", 1, False), ("batching", 8, False), ("prefix", 1, True), ("both", 8, True)]
COMMON_WORDS = {"The", "He", "She", "It", "But", "And", "They", "What", "You", "There", "This", "That", "When",
                "Then", "His", "Her", "We", "If", "In", "As", "Not", "Now", "Yes", "No", "Well", "Oh", "So", "For",
                "All", "One", "At", "On", "Of", "To", "A", "An", "Why", "How", "Who", "Where", "Just", "After",
                "Before", "Some", "Maybe", "Sure", "Your", "My", "Our", "Their", "With", "From", "Even", "Still"}


def load_article(article_chars: int) -> dict:
    """The first article of results/data/articles.jsonl when it is long enough, else the vendored QuALITY zip's
    full text of the first article; cut to `article_chars` at a paragraph or sentence boundary."""
    path = ROOT / "results" / "data" / "articles.jsonl"
    if path.exists():
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        for rec in recs:
            if len(rec["text"]) >= article_chars:
                return {"source": str(path.relative_to(ROOT)), "uid": rec["uid"], "title": rec["title"],
                        "author": author_first_last(rec.get("author")), "year": rec.get("year"),
                        "text": truncate_text(rec["text"], article_chars)}
    zip_path = ROOT / "resources" / "quality" / "QuALITY.v1.0.1.zip"
    for _, _, _, rec in read_quality_zip(zip_path, ["train", "dev"]):
        return {"source": str(zip_path.relative_to(ROOT)), "uid": rec["article_id"], "title": rec["title"],
                "author": author_first_last(rec.get("author")), "year": rec.get("year"),
                "text": truncate_text(rec["article"], article_chars)}
    raise SystemExit(f"error: no article found in {path} or {zip_path}")


def pick_entities(text: str, k: int) -> list[str]:
    """The k most frequent capitalised words that are not sentence-opening function words (names, places)."""
    counts = Counter(w for w in re.findall(r"\b[A-Z][a-z]{2,}\b", text) if w not in COMMON_WORDS)
    return [w for w, _ in counts.most_common(k)]


def relation_requests(article: dict, n: int, max_new_tokens: int) -> list[GenerationRequest]:
    system = (ROOT / "workflow_scripts" / "prompts" / "entigraph_pair.txt").read_text(encoding="utf-8").strip()
    doc = f'"{article["title"]}", {article["author"]}, {article["year"]}.\n {article["text"]}'
    ents = pick_entities(article["text"], n)
    if len(ents) < 2:
        raise SystemExit("error: the article has too few named entities for pair requests")
    pairs = [(ents[i % len(ents)], ents[(i + 1) % len(ents)]) for i in range(n)]
    return [GenerationRequest(id=f"pair-{i}", group=str(article["uid"]), max_new_tokens=max_new_tokens,
                              temperature=0.0, seed=i,
                              messages=[{"role": "system", "content": system},
                                        {"role": "user", "content": f"{doc}\n### Entities:\n- {a}\n- {b}"}])
            for i, (a, b) in enumerate(pairs)]


def request_parser(doc: str | None, threads: int, threads_help: str) -> argparse.ArgumentParser:
    """The command line both synthesis benchmarks share: model, relation requests of one article, threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="results/hf_models/smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--article-chars", type=int, default=4000)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    return p


def main(argv: list[str] | None = None) -> int:
    p = request_parser(__doc__, 1, "torch threads (the machine's cores may be shared)")
    p.add_argument("--modes", default=",".join(m for m, _, _ in MODES))
    p.add_argument("--results-md", default=None, help="append a section with the table to this Markdown file")
    args = p.parse_args(argv)

    import torch

    from workflow_scripts.backends.transformers_backend import TransformersBackend

    torch.set_num_threads(args.threads)
    model = str(ROOT / args.model) if not Path(args.model).is_absolute() else args.model
    if not Path(model).exists():
        print(f"error: {args.model} not found; build it with `snakemake {args.model}` or pass --model", file=sys.stderr)
        return 2
    article = load_article(args.article_chars)
    reqs = relation_requests(article, args.requests, args.max_new_tokens)
    engine = TransformersBackend(model=model, batch_size=1, device="cpu", dtype="float32", progress=False)
    prompt_lens = [len(engine.encode(r)) for r in reqs]
    from workflow_scripts.backends.common import longest_common_prefix

    shared = longest_common_prefix([engine.encode(r) for r in reqs])
    print(f"article {article['uid']} ({article['title']}, {len(article['text'])} chars, from {article['source']}); "
          f"{len(reqs)} requests, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens, shared prefix {shared} "
          f"tokens; max_new_tokens {args.max_new_tokens}, greedy; torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    wanted = args.modes.split(",")
    rows, texts = [], {}
    for mode, batch_size, reuse in MODES:
        if mode not in wanted:
            continue
        engine.batch_size, engine.max_prefix_reuse = batch_size, reuse
        engine.stats.update(prompt_tokens=0, prefilled_tokens=0, completion_tokens=0, seconds=0.0)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = sorted(engine.generate(reqs), key=lambda c: c.id)
        secs = time.perf_counter() - t0
        errors = [c.error for c in out if c.error]
        if errors:
            print(f"error: {mode}: {errors[0]}", file=sys.stderr)
            return 1
        tok = sum(c.completion_tokens for c in out)
        texts[mode] = [c.text for c in out]
        rows.append({"mode": mode, "batch_size": batch_size, "prefix_reuse": reuse, "seconds": secs,
                     "completion_tokens": tok, "prefilled_tokens": engine.stats["prefilled_tokens"],
                     "tok_s": tok / secs, "load": (load0 + os.getloadavg()[0]) / 2})
        print(f"  {mode:9s} {secs:7.1f}s  {tok / secs:6.2f} completion tok/s  "
              f"(prefilled {engine.stats['prefilled_tokens']} tokens)", flush=True)

    base = next((r for r in rows if r["mode"] == "naive"), None)
    same = all(t == next(iter(texts.values())) for t in texts.values())
    lines = ["| mode | batch_size | prefix reuse | seconds | completion tokens | prefilled tokens | completion tok/s | "
             "speed-up vs naive | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["speedup"] = r["tok_s"] / base["tok_s"] if base else float("nan")
        lines.append(f"| {r['mode']} | {r['batch_size']} | {'on' if r['prefix_reuse'] else 'off'} | "
                     f"{r['seconds']:.1f} | {r['completion_tokens']} | {r['prefilled_tokens']} | {r['tok_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['load']:.1f} |")
    table = "\n".join(lines)
    by = {r["mode"]: r for r in rows}
    notes = [f"Greedy outputs identical across modes: {'yes' if same else 'NO'}."]
    if {"naive", "batching", "prefix", "both"} <= set(by):
        lb, lp, lt = (math.log(by[m]["speedup"]) for m in ("batching", "prefix", "both"))
        notes.append(f"Combined speed-up {by['both']['speedup']:.2f}x (target >= 3x). Share of the combined "
                     f"log-speed-up obtained by each lever alone: batching {lb / lt:.0%}, prefix reuse "
                     f"{lp / lt:.0%} (the rest, {1 - (lb + lp) / lt:.0%}, is their interaction).")
    print()
    print(table)
    print("\n".join(notes))

    if args.results_md:
        cmd = "python benchmarks/bench_synthesis_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = [
            "", "## Synthesis engine: batching and prefix KV reuse (transformers backend)", "",
            f"Command: `{cmd.strip()}` on {time.strftime('%Y-%m-%d')}.", "",
            f"Model {args.model} (float32, CPU, {args.threads} torch thread(s)); article {article['uid']} "
            f"\"{article['title']}\" ({len(article['text'])} characters, from {article['source']}); {len(reqs)} "
            f"pair-style relation requests (paper system prompt + article + two entities), prompts "
            f"{min(prompt_lens)}-{max(prompt_lens)} tokens of which {shared} are shared; greedy, "
            f"max_new_tokens {args.max_new_tokens}. Completion tok/s = completion tokens / wall time of the whole "
            "generate call (prefill included).", "",
            table, "", *notes, "",
            "The machine has 2 CPU cores shared with other developers' processes during the run (load average in "
            "the last column; >1 per core means contention), so absolute numbers are noisy; the runs were "
            "sequential in one process, so the ratios are the meaningful result.", "",
        ]
        if not Path(args.results_md).exists():
            section = ["# Benchmark results", "", "Measured numbers; every section names the command that produced "
                       "it and the conditions of the run."] + section
        with open(args.results_md, "a", encoding="utf-8") as f:
            f.write("\n".join(section))
        print(f"appended to {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
