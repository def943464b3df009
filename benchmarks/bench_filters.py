"""Throughput of the quality filters (workflow_scripts/filters.py) in records per second, on the demo's synthetic
corpus, each step side by side in one process:

    python benchmarks/bench_filters.py [--synth results/synth/entigraph] [--repeat 5] [--judge-records 8] \\
        [--results-md benchmarks/RESULTS.md]

- heuristics: the length/repetition rules on every record (mean over --repeat passes after a warm-up pass);
- dedup: exact + MinHash-LSH near-duplicate removal (datasketch), with the seeded permutations shared by all
  records (the filter's default) and drawn anew per record (datasketch's plain constructor): the ratio is the
  gain of sharing. Measured on the corpus repeated --copies times with a distinct suffix per copy, so that the LSH
  index holds more than a handful of entries (the copies are near duplicates and are removed, as in a real
  corpus with repeated generations);
- judge: the LLM judge on the first --judge-records records with the demo's offline model (SmolLM2-135M-Instruct,
  transformers engine on CPU, greedy, 16 new tokens, the article cut to 1,500 characters as in
  experiments/cpu-judge.yaml); one pass, no cache.
Needs the demo synthesis shards (e.g. `snakemake --cores 2 --configfile config.yaml experiments/cpu-judge.yaml`)
and the converted model under results/hf_models/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workflow_scripts import filters  # noqa: E402
from workflow_scripts.config import load_config  # noqa: E402
from workflow_scripts.io_utils import read_jsonl  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (imports, first-call set-up)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synth", default="results/synth/entigraph", help="folder of a method's final shards")
    p.add_argument("--articles", default="results/data/articles.jsonl")
    p.add_argument("--model", default="results/hf_models/smollm2-135m-instruct")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--judge-records", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-md", default=None, help="append a section to this markdown file")
    args = p.parse_args()
    records = [r for f in sorted(Path(args.synth).glob("*.jsonl")) for r in read_jsonl(f)]
    if not records:
        print(f"error: no records in {args.synth}/*.jsonl; run the demo synthesis first", file=sys.stderr)
        return 2
    cfg = load_config(overrides={
        "models": {"generator": {"source": "path", "name": args.model}},
        "backends": {"transformers": {"device": "cpu", "progress": False, "batch_size": 8,
                                      "num_threads": args.threads}},
        "filters": {"judge": {"max_article_chars": 1500, "max_new_tokens": 16}}})
    fc = cfg["filters"]
    copies = [r | {"id": f"{r['id']}-{i}", "text": f"{r['text']} ({i})"} for i in range(args.copies) for r in records]
    rows = []
    t = timed(lambda: filters.apply_heuristics(records, fc["heuristics"]), args.repeat)
    rows.append(("heuristics", len(records), t))
    t_shared = timed(lambda: filters.apply_dedup(copies, fc["dedup"], 42, True), args.repeat)
    t_fresh = timed(lambda: filters.apply_dedup(copies, fc["dedup"], 42, False), args.repeat)
    rows += [("dedup (shared permutations)", len(copies), t_shared),
             ("dedup (fresh permutations)", len(copies), t_fresh)]
    kept = len(filters.apply_dedup(copies, fc["dedup"], 42)[0])
    articles = {str(a["uid"]): a for a in read_jsonl(args.articles)}
    sample = records[: args.judge_records]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = filters.run_judge(sample, articles, cfg, Path(tmp) / "scores.jsonl")
        t_judge = time.perf_counter() - t0
    rows.append(("judge (SmolLM2-135M, transformers, CPU)", len(sample), t_judge))
    load = os.getloadavg()[0]
    lines = ["| step | records | seconds per pass | records/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {s:.4f} | {n / s:.3g} |" for name, n, s in rows]
    ratio = (len(copies) / t_shared) / (len(copies) / t_fresh)
    summary = (f"Dedup kept {kept} of {len(copies)} records ({args.copies} near-duplicate copies of {len(records)}); "
               f"shared permutations {ratio:.2f}x the throughput of fresh ones. Judge: {out[3]['unparseable']} of "
               f"{len(sample)} answers unparseable, mean score {out[3]['mean_score']}. Heuristics / judge "
               f"throughput ratio: {(len(records) / rows[0][2]) / (len(sample) / t_judge):.0f}x. 1-minute load "
               f"average at the end: {load:.1f}.")
    print("\n".join(lines) + "\n\n" + summary)
    if args.results_md:
        cmd = "python benchmarks/bench_filters.py " + " ".join(sys.argv[1:])
        with open(args.results_md, "a", encoding="utf-8") as f:
            f.write(f"\n## Quality filters: throughput on the demo corpus (issue 14)\n\nCommand: `{cmd}` on "
                    f"{datetime.date.today()}.\n\nRecords: {len(records)} EntiGraph texts of the demo settings "
                    f"({args.synth}); the judge sees the first {len(sample)}.\n\n" + "\n".join(lines)
                    + "\n\n" + summary + "\n")
    print(json.dumps({name: round(n / s, 2) for name, n, s in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
