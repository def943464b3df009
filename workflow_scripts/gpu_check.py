"""One-shot GPU check of the training and evaluation code on one H100/H200 (issue 11), in under 8 minutes, offline.

    bash scripts/gpu_check.sh                  # the GPU run: a ~1.2B-parameter Llama, bf16, fixed steps
    bash scripts/gpu_check.sh --dry-run        # the same code on the CPU with a tiny model (what the tests run)
    python -m workflow_scripts.gpu_check --help

It assumes only what a fresh GPU machine has: Python 3.12 with torch, transformers and accelerate (2.11 / 5.17 /
1.15 as the issue states; the versions are printed), this repository, no vLLM, no Snakemake, no jsonschema, no
network and no model download. Steps:

1. A Llama-shaped model of about 1.24B parameters from a config (Llama 3.2 1B's shape: 16 layers, hidden 2048,
   MLP 8192, 32 heads / 8 KV heads, vocabulary 128,256, tied embeddings), random weights, seeded.
2. The project's training loop (workflow_scripts.train: Runtime, train_step, training_loop; bf16 autocast with fp32
   master weights, fused AdamW, LR schedule, clipping, per-step log) for a fixed number of steps on random-token
   blocks, then a bare PyTorch loop (forward, backward, AdamW step, same micro-batches, same autocast) from the same
   initial weights on the same batches. Printed: tokens/s of each, their ratio, the MFU of each (6N + attention
   FLOPs per token as in nanoGPT's estimate_mfu, against the GPU's dense bf16 peak), peak memory, and the first
   step's loss of both (the same computation, so they agree to bf16 rounding).
3. The evaluation stage's log-likelihood path on the GPU: the trained model saved as a Hugging Face folder, loaded
   by qa_eval.load_local_model (bf16 on CUDA), a tokenizer trained offline on the repository's public-domain texts,
   multiple-choice items scored by qa_eval.LoglikScorer (shared-prefix cache, batched), checked against the
   uncached reference naive_loglik, with tokens/s.

The results go to stdout as a table and, with --output, as JSON. `--dry-run` runs the same steps on the CPU with a
2-layer model in fp32 (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXTS = sorted((ROOT / "resources" / "replay").glob("*.txt"))
# Dense bf16 peak FLOP/s (NVIDIA datasheets, SXM parts; without sparsity).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12}
SHAPES = {
    # Llama 3.2 1B's shape (config.json of meta-llama/Llama-3.2-1B): 1.24B parameters with tied embeddings
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
RUNS = {"gpu": {"shape": "1b", "block_size": 2048, "global_batch": 16, "micro_batch": 4, "steps": 30},
        "dry": {"shape": "tiny", "block_size": 32, "global_batch": 4, "micro_batch": 2, "steps": 6}}


def schema_defaults(node: dict) -> Any:
    """The defaults of a schema node, objects filled recursively (without jsonschema, which this machine may lack)."""
    if node.get("type") == "object" and "properties" in node:
        return {k: schema_defaults(sub) for k, sub in node["properties"].items()}
    return node.get("default")


def section_defaults(name: str) -> dict:
    from .config import load_schema

    return schema_defaults(load_schema()["properties"][name])


def build_model(shape: str, seed: int, device: Any):  # type: ignore[no-untyped-def]
    """A random Llama of the given shape, created directly on the device (fast for 1B parameters), in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return model


def flops_per_token(model, block_size: int) -> float:  # type: ignore[no-untyped-def]
    """Training FLOPs per token: 6 x parameters + 12 x layers x hidden x sequence (nanoGPT's estimate_mfu)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * block_size


def random_run(spec: dict, vocab: int, seed: int, cpt: dict):  # type: ignore[no-untyped-def]
    """A train.Run over random-token blocks: one epoch, every sequence a corpus block, no replay, no probe."""
    from . import train as T

    n_seq = spec["global_batch"] * spec["steps"]
    blocks = np.random.default_rng(seed).integers(0, vocab, size=(n_seq, spec["block_size"]), dtype=np.int64)
    plan = np.arange(n_seq, dtype=np.int64)
    return T.Run(method="gpu-check", seed=seed, epochs=1, block_size=spec["block_size"],
                 global_batch=spec["global_batch"], micro_batch=spec["micro_batch"], n_tokens=blocks.size,
                 capped=False, n_blocks=n_seq, plan=plan, blocks=T.Blocks(blocks, None, seed), steps=spec["steps"],
                 warmup=T.warmup_steps_for(spec["steps"], cpt["warmup_ratio"]))


def project_loop(cpt: dict, spec: dict, run, device, workdir: Path) -> tuple[dict, Any]:  # type: ignore[no-untyped-def]
    """workflow_scripts.train's loop on the run; throughput from its own per-step log (steps 3..N: warm-up off)."""
    from . import train as T

    rt = T.Runtime(cpt)
    model = rt.wrap(build_model(spec["shape"], run.seed, device))
    model.train()
    optimizer = T.configure_optimizer(model, cpt["lr"], cpt["weight_decay"], tuple(cpt["betas"]), cpt["adam_eps"])
    state = {"step": 0, "tokens_seen": 0, "replay_sequences": 0, "train_seconds": 0.0, "loss": None}
    (workdir / "train_log.csv").write_text(",".join(T.LOG_FIELDS) + "\n")
    T.training_loop(cpt, rt, model, optimizer, run, state, workdir)
    with open(workdir / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timed = rows[2:]
    tps = sum(int(r["tokens"]) for r in timed) / sum(float(r["step_seconds"]) for r in timed)
    out = {"tokens_per_s": tps, "first_loss": float(rows[0]["loss"]), "last_loss": float(rows[-1]["loss"]),
           "steps": len(rows), "precision": rt.precision}
    del optimizer
    return out, model


def bare_loop(spec: dict, run, device, bf16: bool) -> dict:  # type: ignore[no-untyped-def]
    """The reference: forward, backward, fused AdamW step on the same batches from the same weights; no schedule,
    clipping or logging. loss.item() each step, as the project loop reads its loss each step."""
    import torch

    model = build_model(spec["shape"], run.seed, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times, losses = [], []
    for step in range(run.steps):
        t0 = time.perf_counter()
        ids = run.plan[step * run.global_batch:(step + 1) * run.global_batch]
        total = 0.0
        for i in range(0, len(ids), run.micro_batch):
            x = run.blocks.batch(ids[i:i + run.micro_batch]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            (loss * len(x) / len(ids)).backward()
            total += loss.item() * len(x) / len(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total)
    tokens = run.global_batch * run.block_size * (run.steps - 2)
    del model, opt
    return {"tokens_per_s": tokens / sum(times[2:]), "first_loss": losses[0], "last_loss": losses[-1]}


def offline_tokenizer(vocab: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE trained here on the repository's public-domain stories (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([p.read_text(encoding="utf-8") for p in TEXTS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def eval_check(model, folder: Path, n_items: int) -> dict:  # type: ignore[no-untyped-def]
    """The log-likelihood evaluation path on the saved model: load as the eval stage does, score, cross-check."""
    import torch

    from .qa_eval import LoglikScorer, load_local_model, naive_loglik

    tok = offline_tokenizer(min(8192, model.config.vocab_size))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    ecfg = section_defaults("evaluation")  # device auto, dtype auto: bf16 on a GPU
    t0 = time.perf_counter()
    loaded, tok = load_local_model(str(folder), ecfg)
    load_s = time.perf_counter() - t0
    paras = [p.strip() for p in TEXTS[0].read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200]
    prefix = "\n\n".join(paras[:5])  # a shared prefix of about a thousand tokens, as the 5-shot prompt
    items = [(paras[5 + i % (len(paras) - 6)][:600] + "\nQuestion: what happens next?\nAnswer:",
              [" He leaves.", " She stays behind.", " Nothing at all happens.", " They argue about it."])
             for i in range(n_items)]
    scorer = LoglikScorer(loaded, tok, prefix, batch_questions=8)
    scorer.score(items[:2])  # warm-up
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    scorer.forward_tokens, t0 = 0, time.perf_counter()
    scores = scorer.score(items)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    naive = [naive_loglik(scorer, items[0][0], c)["logprob"] for c in items[0][1]]
    diff = max(abs(a["logprob"] - b) for a, b in zip(scores[0], naive))
    finite = all(math.isfinite(o["logprob"]) for s in scores for o in s)
    return {"items": n_items, "options": 4, "seconds": seconds, "tokens_per_s": scorer.forward_tokens / seconds,
            "load_seconds": load_s, "dtype": str(next(loaded.parameters()).dtype), "device": str(loaded.device),
            "max_abs_diff_vs_uncached": diff, "all_finite": finite}


def run_check(dry_run: bool, steps: int | None = None, peak_tflops: float | None = None) -> dict:
    """The whole check; returns the results (also printed)."""
    import torch
    import transformers

    on_gpu = torch.cuda.is_available() and not dry_run
    if not on_gpu and not dry_run:
        raise SystemExit("gpu_check: no CUDA device here; run on the GPU machine, or use --dry-run for the CPU mode")
    spec = dict(RUNS["dry" if dry_run else "gpu"])
    spec["steps"] = steps or spec["steps"]
    device = torch.device("cuda" if on_gpu else "cpu")
    cpt = section_defaults("cpt")
    cpt.update(precision="bf16" if on_gpu else "fp32", checkpoint_every=0, log_every=spec["steps"], lr=1e-4,
               warmup_ratio=0.05, threads=cpt["threads"] or 2)
    if not on_gpu:
        torch.set_num_threads(2)
    name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    peak = peak_tflops * 1e12 if peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None) \
        if on_gpu else None
    result: dict = {"mode": "dry-run (CPU, tiny model, fp32)" if dry_run else "gpu", "device": name,
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 "accelerate": _version("accelerate")}, "run": spec}
    run = random_run(spec, SHAPES[spec["shape"]]["vocab_size"], 0, cpt)
    with tempfile.TemporaryDirectory() as tmp:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        project, model = project_loop(cpt, spec, run, device, Path(tmp))
        fpt = flops_per_token(model, spec["block_size"])
        result["params"] = sum(p.numel() for p in model.parameters())
        result["project_loop"] = project
        if on_gpu:
            result["project_loop"]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["eval"] = eval_check(model, Path(tmp) / "model", 64 if on_gpu else 4)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        result["bare_loop"] = bare_loop(spec, run, device, bf16=on_gpu)
    for loop in ("project_loop", "bare_loop"):
        result[loop]["mfu"] = result[loop]["tokens_per_s"] * fpt / peak if peak else None
    result["ratio_project_to_bare"] = result["project_loop"]["tokens_per_s"] / result["bare_loop"]["tokens_per_s"]
    result["first_loss_diff"] = abs(result["project_loop"]["first_loss"] - result["bare_loop"]["first_loss"])
    result["flops_per_token"], result["peak_flops"] = fpt, peak
    return result


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def report(r: dict) -> str:
    p, b, e = r["project_loop"], r["bare_loop"], r["eval"]
    mfu = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"gpu_check: {r['mode']} on {r['device']}; {r['params'] / 1e6:,.1f}M parameters; versions {r['versions']}",
             f"  train, project loop : {p['tokens_per_s']:12.0f} tokens/s  MFU {mfu(p['mfu'])}  "
             f"loss {p['first_loss']:.4f} -> {p['last_loss']:.4f} over {p['steps']} steps ({p['precision']})",
             f"  train, bare PyTorch : {b['tokens_per_s']:12.0f} tokens/s  MFU {mfu(b['mfu'])}  "
             f"loss {b['first_loss']:.4f} -> {b['last_loss']:.4f}",
             f"  ratio project / bare: {r['ratio_project_to_bare']:.3f}   first-step loss difference "
             f"{r['first_loss_diff']:.2e}",
             f"  eval loglik         : {e['tokens_per_s']:12.0f} tokens/s  {e['items']} items x 4 options in "
             f"{e['seconds']:.2f} s ({e['dtype']} on {e['device']}, load {e['load_seconds']:.1f} s); cached vs "
             f"uncached max |diff| {e['max_abs_diff_vs_uncached']:.2e}"]
    if "peak_memory_gb" in p:
        lines.append(f"  peak GPU memory (training): {p['peak_memory_gb']:.1f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32: checks the code path anywhere")
    p.add_argument("--steps", type=int, default=None, help="training steps of each loop (default 30; dry run 6)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of this GPU for the MFU (default: known for H100/H200/A100/L40S)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    t0 = time.time()
    r = run_check(args.dry_run, args.steps, args.peak_tflops)
    r["wall_seconds"] = time.time() - t0
    print(report(r))
    print(f"  wall time: {r['wall_seconds']:.0f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
