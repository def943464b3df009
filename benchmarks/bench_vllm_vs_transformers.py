"""Benchmark the two local engines on the same EntiGraph relation requests of one article: vLLM (its CPU build
here, `bash scripts/bootstrap.sh --vllm`) against the transformers engine with the demo's settings (batches of 8,
the article prefix prefilled once per group).

The requests are those of benchmarks/bench_synthesis_engine.py (the paper's pair system prompt + the article + two
entities, greedy, a fixed max_new_tokens). Each engine runs in its own fresh process, one after the other:

    start-up     seconds to build the engine (model load; vLLM: its engine process, KV cache, warm-up)
    generate     wall seconds of the whole generate call (prefill included)
    tok/s        completion tokens / generate seconds

vLLM's CPU build runs with float32 and eager mode (as experiments/cpu-vllm.yaml); prefix caching on.

    .venv/bin/python benchmarks/bench_vllm_vs_transformers.py                       # prints the table
    .venv/bin/python benchmarks/bench_vllm_vs_transformers.py --results-md benchmarks/RESULTS.md   # and appends it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_synthesis_engine import load_article, relation_requests, request_parser  # noqa: E402

ENGINES = {
    "transformers": {"batch_size": 8, "max_prefix_reuse": True, "device": "cpu", "dtype": "float32",
                     "progress": False},
    "vllm": {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": True, "max_model_len": 4096,
             "cpu_kvcache_space_gib": 2, "progress": False},
}


def run_engine(engine: str, model: str, requests_spec: dict, threads: int) -> dict:
    """In this process: build the engine, generate every request once, return the measurements."""
    from workflow_scripts.backends import get_backend

    if engine == "transformers":
        import torch

        torch.set_num_threads(threads)
    article = load_article(requests_spec["article_chars"])
    reqs = relation_requests(article, requests_spec["requests"], requests_spec["max_new_tokens"])
    t0 = time.perf_counter()
    backend = get_backend(engine, {"model": model, **ENGINES[engine]})
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    comps = list(backend.generate(reqs))
    gen = time.perf_counter() - t1
    backend.close()
    errors = [c.error for c in comps if c.error]
    if errors:
        raise SystemExit(f"error: {engine}: {len(errors)} requests failed, e.g. {errors[0]}")
    by_id = {c.id: c for c in comps}
    return {"engine": engine, "startup_s": round(startup, 1), "generate_s": round(gen, 1),
            "requests": len(reqs), "prompt_tokens": sum(c.prompt_tokens for c in comps),
            "cached_prompt_tokens": sum(c.cached_prompt_tokens or 0 for c in comps),
            "completion_tokens": sum(c.completion_tokens for c in comps),
            "tok_s": round(sum(c.completion_tokens for c in comps) / gen, 2),
            "texts": [by_id[r.id].text for r in reqs], "load": round(os.getloadavg()[0], 1),
            "article": {k: article[k] for k in ("uid", "title", "source")}, "chars": len(article["text"])}


def table(results: list[dict], args: argparse.Namespace) -> str:
    a = results[0]
    lines = [f"Model {args.model} (float32, CPU); article {a['article']['uid']} \"{a['article']['title']}\" "
             f"({a['chars']} characters, from {a['article']['source']}); {a['requests']} pair-style relation "
             f"requests (paper system prompt + article + two entities), greedy, max_new_tokens "
             f"{args.max_new_tokens}. Each engine in a fresh process, one after the other.", "",
             "| engine | settings | start-up s | generate s | prompt tokens | of them cached | completion tokens "
             "| completion tok/s | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in ENGINES[r["engine"]].items() if k != "progress")
        lines.append(f"| {r['engine']} | {settings} | {r['startup_s']} | {r['generate_s']} | {r['prompt_tokens']} "
                     f"| {r['cached_prompt_tokens'] if r['engine'] == 'vllm' else 'n/a'} | {r['completion_tokens']} "
                     f"| {r['tok_s']} | {r['load']} |")
    by = {r["engine"]: r for r in results}
    if set(by) == set(ENGINES):
        tf, vl = by["transformers"], by["vllm"]
        same = sum(x == y for x, y in zip(tf["texts"], vl["texts"]))
        lines += ["", f"vLLM / transformers: completion tok/s {vl['tok_s'] / tf['tok_s']:.2f}x, start-up "
                      f"{vl['startup_s'] / max(tf['startup_s'], 1e-9):.1f}x; start-up + generate "
                      f"{vl['startup_s'] + vl['generate_s']:.0f} s vs {tf['startup_s'] + tf['generate_s']:.0f} s. "
                      f"Greedy texts identical for {same} of {len(tf['texts'])} requests."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = request_parser(__doc__, 2, "torch threads of the transformers engine")
    p.add_argument("--engines", default="transformers,vllm")
    p.add_argument("--results-md", default=None, help="append a section with the table to this Markdown file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # ENGINE: run it here, print JSON
    args = p.parse_args(argv)
    spec = {"requests": args.requests, "max_new_tokens": args.max_new_tokens, "article_chars": args.article_chars}
    if not Path(args.model).exists():
        raise SystemExit(f"error: {args.model} not found; convert the demo model first: .venv/bin/python -m "
                         f"workflow_scripts.models convert --name smollm2-135m-instruct --output {args.model}")
    if args.child:
        print("RESULT " + json.dumps(run_engine(args.child, args.model, spec, args.threads)))
        return 0
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, "--model", args.model, "--requests", str(args.requests),
               "--max-new-tokens", str(args.max_new_tokens), "--article-chars", str(args.article_chars),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        out = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not out:
            raise SystemExit(f"error: the {engine} run failed: {proc.stderr[-2000:]}")
        results.append(json.loads(out[-1][len("RESULT "):]))
        print(f"{engine}: start-up {results[-1]['startup_s']} s, {results[-1]['tok_s']} completion tok/s",
              file=sys.stderr)
    text = table(results, args)
    print(text)
    if args.results_md:
        used = argv if argv is not None else sys.argv[1:]
        cmd = " ".join(["python benchmarks/bench_vllm_vs_transformers.py", *used])
        with open(args.results_md, "a", encoding="utf-8") as f:
            f.write(f"\n## Synthesis engines: vLLM (CPU build) vs transformers\n\nCommand: `{cmd}` on "
                    f"{date.today().isoformat()}.\n\n{text}\n")
        print(f"appended to {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
