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

4. FSDP2 (issue 18): `torchrun --standalone --nproc_per_node 1 -m workflow_scripts.gpu_check --fsdp-worker`, a
   process group over NCCL, train.Runtime with FSDP forced on at world size 1 (fully_shard per decoder layer, bf16
   MixedPrecisionPolicy with fp32 reduction), the project's loop for 6 steps; the same run stopped after 3 steps
   with train.save_checkpoint (torch.distributed.checkpoint), loaded by train.load_checkpoint into a model of OTHER
   initial weights and run on: its next-step loss must equal the uninterrupted run's (RESUME_TOLERANCE). The
   uninterrupted run's torch.cuda.max_memory_allocated is set against workflow_scripts.memory.estimate_train_memory
   (MEMORY_TOLERANCE).

MFU uses the dense bf16 peak of the GPU variant named by torch.cuda.get_device_name() (workflow_scripts/gpu_specs.py:
H100 SXM / PCIe / NVL, H200, A100, ...). The results go to stdout as a table and, with --output, as JSON.
`--dry-run` runs the same steps on the CPU with a 2-layer model in fp32, gloo for NCCL (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXTS = sorted((ROOT / "resources" / "replay").glob("*.txt"))
# The measured peak memory of the FSDP phase against workflow_scripts.memory's estimate: within this fraction.
MEMORY_TOLERANCE = 0.25
# The resumed run's next-step loss against the uninterrupted run's: equal to the log's 6 decimals on the CPU (fp32,
# deterministic); on the GPU (bf16, deterministic algorithms requested) within this.
RESUME_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}
SHAPES = {
    # Llama 3.2 1B's shape (config.json of meta-llama/Llama-3.2-1B): 1.24B parameters with tied embeddings
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
RUNS = {"gpu": {"shape": "1b", "block_size": 2048, "global_batch": 16, "micro_batch": 4, "steps": 30, "fsdp_steps": 6},
        "dry": {"shape": "tiny", "block_size": 32, "global_batch": 4, "micro_batch": 2, "steps": 6, "fsdp_steps": 4}}


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

    from .config import section_defaults
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


def check_cpt(on_gpu: bool, spec: dict) -> dict:
    """The cpt section the check trains with: the schema's defaults, bf16 on the GPU (fp32 on the CPU)."""
    from .config import section_defaults

    cpt = section_defaults("cpt")
    cpt.update(precision="bf16" if on_gpu else "fp32", checkpoint_every=0, log_every=spec["steps"], lr=1e-4,
               warmup_ratio=0.05, threads=cpt["threads"] or 2)
    return cpt


def no_gpu_line() -> str:
    """Why there is no usable CUDA device here, in the pre-flight check's words (driver, torch's CUDA build)."""
    from .preflight import decide, gather_facts

    why = decide(gather_facts(), 1, False) or "no CUDA device here"
    return f"gpu_check: {why}; run on the GPU machine, or use --dry-run for the CPU mode"


def run_check(dry_run: bool, steps: int | None = None, peak_tflops: float | None = None,
              fsdp: bool = True) -> dict:
    """The whole check; returns the results (also printed)."""
    import torch
    import transformers

    from .gpu_specs import peak_bf16

    on_gpu = torch.cuda.is_available() and not dry_run
    if not on_gpu and not dry_run:
        raise SystemExit(no_gpu_line())
    spec = dict(RUNS["dry" if dry_run else "gpu"])
    spec["steps"] = steps or spec["steps"]
    device = torch.device("cuda" if on_gpu else "cpu")
    cpt = check_cpt(on_gpu, spec)
    if not on_gpu:
        torch.set_num_threads(2)
    name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    variant = peak_bf16(name) if on_gpu else None
    peak = peak_tflops * 1e12 if peak_tflops else (variant[1] if variant else None)
    result: dict = {"mode": "dry-run (CPU, tiny model, fp32)" if dry_run else "gpu", "device": name,
                    "gpu_variant": variant[0] if variant else None,
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
        if on_gpu:
            torch.cuda.empty_cache()
        if fsdp:
            result["fsdp"] = fsdp_phase(dry_run, spec, Path(tmp))
    for loop in ("project_loop", "bare_loop"):
        result[loop]["mfu"] = result[loop]["tokens_per_s"] * fpt / peak if peak else None
    result["ratio_project_to_bare"] = result["project_loop"]["tokens_per_s"] / result["bare_loop"]["tokens_per_s"]
    result["first_loss_diff"] = abs(result["project_loop"]["first_loss"] - result["bare_loop"]["first_loss"])
    result["flops_per_token"], result["peak_flops"] = fpt, peak
    return result


# ---------------------------------------------------------------- FSDP2 over NCCL/gloo, DCP save and resume, memory
def fsdp_phase(dry_run: bool, spec: dict, workdir: Path) -> dict:
    """The FSDP worker in its own process group: `torchrun --standalone --nproc_per_node 1 ... --fsdp-worker`
    (NCCL and bf16 on the GPU; gloo and fp32 in the dry run). Its JSON, or the failure's last lines."""
    out = workdir / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "workflow_scripts.gpu_check", "--fsdp-worker", "--workdir", str(workdir / "fsdp"), "--output", str(out),
           "--steps", str(spec["fsdp_steps"])] + (["--dry-run"] if dry_run else [])
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=360)
    if r.returncode != 0 or not out.exists():
        return {"ok": False, "error": "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])}
    res = json.loads(out.read_text())
    res["seconds"] = time.time() - t0
    return res


def fsdp_runtime(cpt: dict):  # type: ignore[no-untyped-def]
    from . import train as T

    rt = T.Runtime(cpt)
    rt.fsdp = True  # FSDP2 forced on at world size 1 (Runtime turns it on only above 1)
    return rt


def fsdp_model(cpt: dict, spec: dict, seed: int):  # type: ignore[no-untyped-def]
    """(runtime, FSDP2-wrapped model of `seed`'s initial weights, its optimizer), as train.py builds them."""
    from . import train as T

    rt = fsdp_runtime(cpt)
    model = rt.wrap(build_model(spec["shape"], seed, rt.device))
    model.train()
    return rt, model, T.configure_optimizer(model, cpt["lr"], cpt["weight_decay"], tuple(cpt["betas"]), cpt["adam_eps"])


def fsdp_train(cpt: dict, run, spec: dict, seed: int, workdir: Path, state: dict | None = None,
               model_opt=None, stop: int | None = None):  # type: ignore[no-untyped-def]
    """workflow_scripts.train's loop under FSDP2 forced on at world size 1 (Runtime enables FSDP only above 1):
    (runtime, model, optimizer, state, per-step losses of the log)."""
    from . import train as T

    rt, model, optimizer = fsdp_model(cpt, spec, seed) if model_opt is None else (fsdp_runtime(cpt), *model_opt)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "train_log.csv"
    if state is None:
        state = {"step": 0, "tokens_seen": 0, "replay_sequences": 0, "train_seconds": 0.0, "loss": None,
                 "fingerprint": "gpu-check", "settings_fingerprint": "gpu-check", "layout": rt.layout,
                 "resumed_from": []}
        log.write_text(",".join(T.LOG_FIELDS) + "\n")
    try:
        T.training_loop(cpt, rt, model, optimizer, run, state, workdir, stop_after_steps=stop)
    except T.Interrupted:
        pass
    with open(log, newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return rt, model, optimizer, state, losses


def memory_estimate(config: dict, spec: dict, cpt: dict, bf16: bool) -> dict:
    """The planner's estimate (workflow_scripts/memory.py) of this run's peak per GPU: FSDP2 forced on at world size 1."""
    from .memory import ModelShape, TrainShape, estimate_train_memory

    shape = ModelShape.from_hf_config(config)
    train = TrainShape(seq_len=spec["block_size"], micro_batch=spec["micro_batch"], world_size=1,
                       grad_accum=spec["global_batch"] // spec["micro_batch"], param_bytes=2 if bf16 else 4,
                       master_fp32=bf16, fsdp=True, reshard_after_forward=bool(cpt["fsdp"]["reshard_after_forward"]),
                       cpu_offload=False, activation_checkpointing=bool(cpt["gradient_checkpointing"]),
                       no_sync_accumulation=bool(cpt["fsdp"]["no_sync_accumulation"]), force_fsdp=True)
    est = estimate_train_memory(shape, train)
    return {"estimate_bytes": int(est.total_bytes), "parts": dict(est.parts)}


def fsdp_worker(dry_run: bool, steps: int, workdir: Path) -> dict:
    """Inside torchrun: an uninterrupted FSDP2 run of `steps` steps (its peak memory against the estimate), then
    the same run stopped after steps/2 with a distributed checkpoint (train.save_checkpoint), resumed into a model
    of OTHER initial weights (train.load_checkpoint must overwrite them) and run to the end."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
    import torch
    import torch.distributed as dist

    from . import train as T

    on_gpu = torch.cuda.is_available() and not dry_run
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.set_num_threads(2)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    spec = dict(RUNS["dry" if dry_run else "gpu"], steps=steps)
    cpt = check_cpt(on_gpu, spec)
    cpt["fsdp"]["enabled"] = True
    run = random_run(spec, SHAPES[spec["shape"]]["vocab_size"], 0, cpt)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    rt, model, opt, state, straight = fsdp_train(cpt, run, spec, 0, workdir / "uninterrupted")
    measured = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sharded = next(model.parameters())
    res = {"ok": True, "backend": dist.get_backend(), "world_size": dist.get_world_size(),
           "wrapper": type(model).__name__, "param_type": type(sharded).__name__,
           "param_dtype": str(sharded.dtype), "compute_dtype": "bfloat16" if rt.precision == "bf16" else "float32",
           "precision": rt.precision, "steps": steps, "losses": straight, "final_loss": state["loss"]}
    mem = memory_estimate(build_config(spec["shape"]), spec, cpt, rt.precision == "bf16")
    mem.update(measured_bytes=int(measured), measured_by="cuda max_memory_allocated" if on_gpu else
               "process max RSS (Python and torch included: not comparable)", tolerance=MEMORY_TOLERANCE)
    mem["ratio"] = mem["measured_bytes"] / mem["estimate_bytes"]
    mem["within_tolerance"] = abs(mem["ratio"] - 1) <= MEMORY_TOLERANCE if on_gpu else None
    res["memory"] = mem
    del model, opt
    if on_gpu:
        torch.cuda.empty_cache()
    half = steps // 2
    _, model, opt, _, _ = fsdp_train(cpt, run, spec, 0, workdir / "resumed", stop=half)
    del model, opt
    rt, model, opt = fsdp_model(cpt, spec, 1)  # other initial weights: the checkpoint must overwrite them
    ckpt = sorted((workdir / "resumed").glob("step_*"))[-1]
    state = T.load_checkpoint(rt, model, opt, ckpt)
    _, _, _, state, resumed = fsdp_train(cpt, run, spec, 1, workdir / "resumed", state=state, model_opt=(model, opt))
    tol = RESUME_TOLERANCE["cuda" if on_gpu else "cpu"]
    diff = abs(resumed[half] - straight[half])
    res["resume"] = {"checkpoint": ckpt.name, "files": sorted(p.name for p in ckpt.iterdir()), "stopped_at": half,
                     "losses": resumed, "next_step_loss": resumed[half], "uninterrupted_next_step_loss": straight[half],
                     "next_step_loss_diff": diff, "final_loss_diff": abs(state["loss"] - res["final_loss"]),
                     "tolerance": tol, "equal": diff <= tol}
    dist.destroy_process_group()
    return res


def build_config(shape: str) -> dict:
    """The transformers config.json dict of a check shape (what ModelShape.from_hf_config reads)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape]).to_dict()


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
    if "fsdp" in r:
        lines.extend(fsdp_report(r["fsdp"]))
    return "\n".join(lines)


def fsdp_report(f: dict) -> list[str]:
    if not f.get("ok"):
        return ["  FSDP2 phase FAILED:", *("    " + x for x in f.get("error", "").splitlines())]
    rs, m = f["resume"], f["memory"]
    mem = (f"estimate {m['estimate_bytes'] / 2**30:.2f} GiB, measured {m['measured_bytes'] / 2**30:.2f} GiB "
           f"({m['measured_by']}), ratio {m['ratio']:.2f}")
    return [f"  FSDP2 ({f['wrapper']}, {f['backend']}, world size {f['world_size']}, params {f['param_type']} "
            f"{f['param_dtype']}, compute {f['compute_dtype']}): loss {f['losses'][0]:.4f} -> {f['losses'][-1]:.4f} "
            f"over {f['steps']} steps",
            f"  DCP save/resume     : stopped after step {rs['stopped_at']}, resumed into other weights; next-step "
            f"loss {rs['next_step_loss']:.6f} vs {rs['uninterrupted_next_step_loss']:.6f} uninterrupted "
            f"(|diff| {rs['next_step_loss_diff']:.1e}, tolerance {rs['tolerance']:.0e}: "
            f"{'EQUAL' if rs['equal'] else 'DIFFERENT'})",
            f"  peak memory vs estimate: {mem}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32: checks the code path anywhere")
    p.add_argument("--steps", type=int, default=None, help="training steps of each loop (default 30; dry run 6)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of this GPU for the MFU (default: workflow_scripts/gpu_specs.py by its name)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 / checkpoint / memory phase")
    p.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)  # inside torchrun (fsdp_phase)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_worker:
        res = fsdp_worker(args.dry_run, args.steps or RUNS["dry" if args.dry_run else "gpu"]["fsdp_steps"],
                          Path(args.workdir))
        Path(args.output).write_text(json.dumps(res, indent=2, default=str))
        return 0
    t0 = time.time()
    r = run_check(args.dry_run, args.steps, args.peak_tflops, fsdp=not args.no_fsdp)
    r["wall_seconds"] = time.time() - t0
    print(report(r))
    print(f"  wall time: {r['wall_seconds']:.0f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
