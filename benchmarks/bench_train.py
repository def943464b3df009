"""Benchmark of the CPT training loop (workflow_scripts/train.py) against a bare PyTorch loop, in one run.

Both loops train the same model from the same weights on the same batches (the run's data plan), with the same
micro-batching and the same (fused) AdamW; the bare loop has no clipping, no LR schedule, no logging, no
accelerate. A third loop, bare with PyTorch's default AdamW, shows what the fused optimizer buys. Each loop is
timed from the end of its first step (warm-up) to the end of its last, including everything the loop does per step
(train.py: the per-step CSV row and progress line). Repeats alternate train.py and bare, and the median of each is
reported, which evens out the load of a shared machine. Also reported: padding waste (tokens trained / tokens in
the blocks; 1.0 means no padding) and the tokens per second of the model on this machine.

    python benchmarks/bench_train.py --model results/hf_models/smollm2-135m-instruct --steps 6 --repeats 2
    python benchmarks/bench_train.py --model .cache/test-models/tiny-llama --steps 20 --block-size 64
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workflow_scripts import train as T  # noqa: E402
from workflow_scripts.config import validate_config  # noqa: E402
from workflow_scripts.corpus import build_corpus, load_corpus  # noqa: E402

STORIES = sorted((ROOT / "resources" / "replay").glob("*.txt"))


def make_corpus(model: str, workdir: Path) -> Path:
    """A real-text corpus: the paragraphs of the vendored public-domain stories, as synthesis records."""
    paras = [p.strip() for story in STORIES for p in story.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    shard = workdir / "shard.jsonl"
    with open(shard, "w", encoding="utf-8") as f:
        for i, text in enumerate(paras):
            f.write(json.dumps({"id": f"p{i:04d}", "method": "bench", "text": text}) + "\n")
    build_corpus("bench", [shard], model, workdir / "corpus", validate_config({"seed": 0}))
    return workdir / "corpus"


def run_train_py(cfg: dict, corpus: Path, budget: int, model: str, workdir: Path, tag: str) -> tuple[float, dict]:
    """train.py's loop: seconds per token over steps 2..N, from its own per-step log."""
    s = T.train(cfg, corpus, budget, model, workdir / f"out-{tag}", workdir / f"work-{tag}")
    with open(workdir / f"out-{tag}" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # elapsed_s is stamped after each step's work and before its log row: steps 2..N and the rows between
    seconds = float(rows[-1]["elapsed_s"]) - float(rows[0]["elapsed_s"])
    tokens = sum(int(r["tokens"]) for r in rows[1:])
    return tokens / seconds, s


def run_bare(cfg: dict, corpus: Path, budget: int, model_dir: str, fused: bool) -> tuple[float, float]:
    """The bare loop: forward, backward, step, zero_grad on the same batches, with AdamW fused (as train.py) or
    PyTorch's default AdamW. Tokens per second and per CPU-second (all threads of the process) over steps 2..N."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    cpt = cfg["cpt"]
    torch.set_num_threads(cpt["threads"])
    tokens, _ = load_corpus(corpus)
    bs, gb, mb = cpt["block_size"], cpt["global_batch"], cpt["micro_batch"]
    n_blocks = budget // bs
    blocks = T.Blocks(np.asarray(tokens[:n_blocks * bs]).reshape(n_blocks, bs), None, 0)
    plan = T.data_plan(n_blocks, cpt["epochs"], cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cpt["lr"], weight_decay=cpt["weight_decay"], fused=fused or None)
    t_first, n_tok = None, 0
    for step in range(-(-len(plan) // gb)):
        ids = plan[step * gb:(step + 1) * gb]
        for i in range(0, len(ids), mb):
            x = blocks.batch(ids[i:i + mb])
            loss = model(input_ids=x, labels=x).loss * (len(ids[i:i + mb]) / len(ids))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the same synchronisation point as the logged loss
        if t_first is None:
            t_first, cpu_first = time.perf_counter(), time.process_time()
        else:
            n_tok += len(ids) * bs
    return n_tok / (time.perf_counter() - t_first), n_tok / (time.process_time() - cpu_first)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="results/hf_models/smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per loop (the first is warm-up)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    ours, bare, bare_cpu, bare_default, summary = [], [], [], [], {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        work = Path(tmp)
        corpus = make_corpus(args.model, work)
        # --steps steps of full blocks: as many epochs over the corpus as that takes
        want, have = args.steps * args.global_batch, len(load_corpus(corpus)[0]) // args.block_size
        budget = min(want, have) * args.block_size
        cfg = validate_config({"seed": 0, "cpt": {
            "block_size": args.block_size, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
            "epochs": -(-want // have), "lr": 1e-4, "threads": args.threads, "checkpoint_every": 0,
            "log_every": 1000, "replay": {"rate": 0.0}, "probe": {"source": None}}})
        for r in range(args.repeats):
            tps, summary = run_train_py(cfg, corpus, budget, args.model, work, str(r))
            ours.append(tps)
            tps, cpu_tps = run_bare(cfg, corpus, budget, args.model, fused=True)
            bare.append(tps)
            bare_cpu.append(cpu_tps)
            bare_default.append(run_bare(cfg, corpus, budget, args.model, fused=False)[0])
            print(f"repeat {r + 1}: train.py {ours[-1]:.1f} tok/s, bare {bare[-1]:.1f} tok/s, "
                  f"bare with default AdamW {bare_default[-1]:.1f} tok/s", file=sys.stderr)
    result = {
        "model": args.model, "steps": summary["steps"], "block_size": args.block_size, "global_batch": args.global_batch,
        "micro_batch": args.micro_batch, "threads": args.threads, "repeats": args.repeats,
        "train_py_tokens_per_s": round(statistics.median(ours), 1), "bare_tokens_per_s": round(statistics.median(bare), 1),
        "ratio": round(statistics.median(ours) / statistics.median(bare), 3),
        "ratio_per_repeat": [round(a / b, 3) for a, b in zip(ours, bare)],
        "bare_tokens_per_cpu_s": round(statistics.median(bare_cpu), 1),
        "bare_default_adamw_tokens_per_s": round(statistics.median(bare_default), 1),
        "load_avg_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "padding_waste": summary["tokens_seen"] / (summary["sequences_trained"] * summary["block_size"]),
        "tokens_seen": summary["tokens_seen"], "padding_tokens": summary["padding_tokens"],
        "peak_memory_mb": summary["peak_memory_mb"], "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
