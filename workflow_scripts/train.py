"""Stage 6: continued pretraining (CPT) of a causal LM on a budget-sized prefix of a corpus.

    python -m workflow_scripts.train --corpus results/corpus/entigraph --budget 4096 \\
        --model results/hf_models/smollm2-135m-instruct --output results/models/entigraph/4096 \\
        [--configfile config.yaml]
    torchrun --nproc_per_node 8 -m workflow_scripts.train ...        # several GPUs: FSDP, one unit per decoder layer

The paper's recipe is the config's default (cpt section of schemas/config.schema.yaml): full parameters, blocks of
2048 tokens, global batch 16 sequences, AdamW with peak LR 5e-6, 5% linear warmup then cosine decay, weight decay
0.01, 2 epochs (Raw CPT: 4), bf16 mixed precision on GPU, replay rate 0.1.

Data. The budget is the first N tokens of the corpus (workflow_scripts.corpus), cut into fixed-length blocks with
no padding and no cross-document masking (as the paper). The last partial block is dropped (its count is in the
summary: less than one block, e.g. 0 when the budget is a multiple of the block size). Each epoch visits every
block once in a seeded order; with replay rate r each position independently (seeded) takes a block of general
text instead of its corpus block, as the paper's "a RedPajama block replaces a synthetic one with probability r".
The whole run's order is computed up front (`data_plan`), so the data position after a restart is just the step.

Batches. A step takes `global_batch` sequences of the plan (the last step takes the rest). Gradient accumulation is
derived, never assumed: each of the world's ranks takes every world_size-th sequence of the step and runs it in
micro-batches of `micro_batch`; all ranks run the same number of micro-batches (a rank with nothing left forwards
a dummy sequence with weight 0). Each micro-batch loss is weighted by its share of the step, so the update is the
mean over the step's sequences whatever the world size.

Checkpoints every `checkpoint_every` steps under --workdir (default results/checkpoints/METHOD/BUDGET, outside the
Snakemake output folder, which Snakemake deletes before a rerun): model, optimizer, RNG states (accelerate's
save_state) and trainer_state.json (step, tokens, probe, fingerprint). The LR schedule is a pure function of the
step. A rerun with the same settings resumes from the latest checkpoint; with other settings it starts afresh.

Outputs in --output: the model in Hugging Face format (safetensors) with its tokenizer, train_log.csv (one row per
step: loss, LR, grad norm, tokens/s, ...) and train_summary.json (tokens, steps, wall time, peak memory,
throughput, the forgetting probe: perplexity of held-out general text before and after CPT).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .config import add_config_args, config_from_args, config_hash
from .corpus import RAW_METHOD, budget_tokens, load_corpus, load_tokenizer
from .io_utils import InputError, write_json_atomic
from .mixture import curriculum_order, source_shares
from .replay import general_tokens, to_blocks

LOG_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "sequences", "replay_sequences", "tokens", "tokens_seen",
              "step_seconds", "tokens_per_s", "elapsed_s"]
# Keys that change how a run is executed or recorded, not what it computes: a resume may change them.
OPERATIONAL_KEYS = ("budgets", "checkpoint_every", "keep_checkpoints", "delete_checkpoints", "log_every", "threads",
                    "resources", "micro_batch", "save_dtype", "probe", "fsdp", "gradient_checkpointing")


class Interrupted(RuntimeError):
    """Raised when --stop-after-steps ends a run early (after a checkpoint), as a killed job would."""


# -------------------------------------------------------------------------------------------- pure logic
def data_plan(n_blocks: int, epochs: int, seed: int, replay_rate: float = 0.0,
              order: np.ndarray | None = None) -> np.ndarray:
    """The sequence order of the whole run: entry >= 0 is corpus block i; entry -1-k is the k-th replay draw.

    Epoch e visits the blocks in the permutation of rng([seed, e]), or in the fixed `order` of a curriculum
    (workflow_scripts.mixture.curriculum_order); with replay, each position is replaced with probability
    `replay_rate` (rng([seed, e, 1])), so the epoch length does not change."""
    parts, k = [], 0
    fixed = None if order is None else np.asarray(order, dtype=np.int64)
    if fixed is not None and (len(fixed) != n_blocks or len(np.unique(fixed)) != n_blocks):
        raise ValueError(f"a curriculum order must be a permutation of the {n_blocks} blocks")
    for epoch in range(epochs):
        if fixed is not None:
            epoch_order = fixed.copy()
        else:
            epoch_order = np.random.default_rng([seed, epoch]).permutation(n_blocks).astype(np.int64)
        if replay_rate > 0:
            replace = np.random.default_rng([seed, epoch, 1]).random(n_blocks) < replay_rate
            epoch_order[replace] = -1 - np.arange(k, k + int(replace.sum()))
            k += int(replace.sum())
        parts.append(epoch_order)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup reaching `peak` at step warmup_steps - 1, then cosine decay towards `min_ratio * peak`
    (transformers' get_cosine_schedule_with_warmup, shifted by one so that no step runs at LR 0)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return math.ceil(total_steps * ratio)  # as transformers.TrainingArguments.get_warmup_steps


def rank_micro_batches(step_ids: np.ndarray, rank: int, world_size: int, micro_batch: int) -> list[np.ndarray]:
    """This rank's micro-batches of one step: every world_size-th sequence, in chunks of micro_batch. All ranks get
    the same number of chunks (collectives stay in step); an empty chunk means a weight-0 dummy forward."""
    mine = step_ids[rank::world_size]
    n_micro = math.ceil(math.ceil(len(step_ids) / world_size) / micro_batch)
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(n_micro)]


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per rank per full step (derived from the world size; never assumes 8 GPUs)."""
    return math.ceil(math.ceil(global_batch / world_size) / micro_batch)


class Blocks:
    """Training sequences by plan id: corpus blocks (a view of the memory-mapped prefix) and replay blocks, the
    k-th replay draw cycling through the available replay blocks in a fresh seeded order each cycle."""

    def __init__(self, corpus_blocks: np.ndarray, replay_blocks: np.ndarray | None, seed: int) -> None:
        self.corpus, self.replay, self.seed = corpus_blocks, replay_blocks, seed
        self._perms: dict[int, np.ndarray] = {}

    def replay_index(self, k: int) -> int:
        cycle, i = divmod(k, len(self.replay))
        if cycle not in self._perms:
            self._perms[cycle] = np.random.default_rng([self.seed, 2, cycle]).permutation(len(self.replay))
        return int(self._perms[cycle][i])

    def batch(self, ids: np.ndarray):  # type: ignore[no-untyped-def]
        import torch

        rows = [self.corpus[i] if i >= 0 else self.replay[self.replay_index(-1 - int(i))] for i in ids]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


# ------------------------------------------------------------------------------------------ model helpers
def configure_optimizer(model, lr: float, weight_decay: float,  # type: ignore[no-untyped-def]
                        betas: tuple[float, float], eps: float, fused: bool = True):
    """AdamW; weight decay on matrices only (not on norms and biases), as transformers.Trainer and nanoGPT do.
    The fused kernel (CPU and CUDA) makes the step of a 135M model on CPU about 5x faster than the default;
    FSDP2's sharded parameters keep the default (foreach) implementation."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def estimate_loss(model, blocks: np.ndarray, micro_batch: int, device) -> float:  # type: ignore[no-untyped-def]
    """Mean next-token loss over blocks (every rank runs all of them, so FSDP collectives match)."""
    import torch

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), micro_batch):
            x = torch.from_numpy(np.asarray(blocks[i:i + micro_batch], dtype=np.int64)).to(device)
            total += float(model(input_ids=x, labels=x).loss) * len(x)
            n += len(x)
    model.train(was_training)
    return total / n


def load_base_model(location: str):  # type: ignore[no-untyped-def]
    """The base model in float32 (master weights). A folder converted from a GGUF package keeps a stale
    `quantization_config: gguf` in config.json although its safetensors hold plain float weights; transformers
    would then refuse to save the trained model, so that entry is dropped here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location)
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        delattr(config, "quantization_config")
    return AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch.float32)


def peak_memory_mb(device_type: str) -> tuple[float, str]:
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def make_accelerator(cpt: dict, world_size: int):  # type: ignore[no-untyped-def]
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    on_gpu = torch.cuda.is_available()
    precision = cpt["precision"]
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    fsdp = None
    if world_size > 1 and cpt["fsdp"]["enabled"]:
        # FSDP2, one unit per decoder layer (the model's _no_split_modules, e.g. LlamaDecoderLayer), as the paper.
        # Within one node the paper's hybrid shard equals full shard.
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=cpt["fsdp"]["reshard_after_forward"], state_dict_type="SHARDED_STATE_DICT",
            activation_checkpointing=cpt["gradient_checkpointing"], cpu_offload=cpt["fsdp"]["cpu_offload"])
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", fsdp_plugin=fsdp, cpu=not on_gpu)
    return acc, precision


# ------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(workdir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this run (same fingerprint), or None."""
    for ckpt in sorted(workdir.glob("step_*"), reverse=True):
        state = ckpt / "trainer_state.json"
        if state.exists() and json.loads(state.read_text())["fingerprint"] == fingerprint:
            return ckpt
    return None


def save_checkpoint(acc, workdir: Path, state: dict, keep: int) -> Path:  # type: ignore[no-untyped-def]
    """accelerate state (model, optimizer, RNG) + trainer_state.json, renamed into place when complete."""
    final = workdir / f"step_{state['step']:08d}"
    tmp = workdir / f".{final.name}.partial"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(workdir.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------- train
def train(cfg: dict, corpus: str | Path, budget: int | str, model_location: str, output: str | Path,
          workdir: str | Path | None = None, method: str | None = None,
          stop_after_steps: int | None = None) -> dict[str, Any]:
    """Continued pretraining of `model_location` on `budget` tokens of `corpus`; returns the train summary."""
    import torch

    t_start = time.time()
    cpt, seed = cfg["cpt"], int(cfg["cpt"]["seed"] if cfg["cpt"]["seed"] is not None else cfg["seed"])
    output = Path(output)
    tokens, manifest = load_corpus(corpus)
    method = method or manifest["method"]
    workdir = Path(workdir or Path("results/checkpoints") / method / str(budget))
    epochs = cpt["raw_epochs"] if method == RAW_METHOD else cpt["epochs"]
    T, gb, mb = cpt["block_size"], cpt["global_batch"], cpt["micro_batch"]

    # ---- data: the budget prefix in blocks, the replay blocks, the run's plan
    n_tokens, capped = budget_tokens(len(tokens), budget, cpt["allow_budget_cap"], str(corpus))
    n_blocks = n_tokens // T
    if n_blocks == 0:
        raise InputError(f"{corpus}: budget {budget} ({n_tokens} tokens) is shorter than one block of {T} tokens; "
                         "raise the budget or lower cpt.block_size")
    corpus_blocks = tokens[:n_blocks * T].reshape(n_blocks, T)
    plan = data_plan(n_blocks, epochs, seed, cpt["replay"]["rate"],
                     curriculum_order(corpus, manifest, n_blocks, T))  # None: the seeded shuffle
    tok = load_tokenizer(model_location)
    specials = {k: manifest["tokenizer"][k] for k in ("bos", "eos")}  # general text tokenized like the corpus
    replay_blocks, n_replay = None, int((plan < 0).sum())
    if n_replay:
        rp = cpt["replay"]
        if not rp["source"]:
            raise InputError("cpt.replay.rate > 0 needs cpt.replay.source (a local text/JSONL path or a "
                             "Hugging Face dataset id); or set cpt.replay.rate: 0")
        want = min(n_replay * T, rp["max_tokens"])
        replay_blocks = to_blocks(general_tokens(rp["source"], tok, specials, want, text_field=rp["text_field"],
                                                 split=rp["split"], hf_config=rp["hf_config"]), T)
        if len(replay_blocks) == 0:
            raise InputError(f"{rp['source']}: fewer than {T} tokens of general text; a replay block needs one block")
    blocks = Blocks(corpus_blocks, replay_blocks, seed)
    steps = math.ceil(len(plan) / gb)
    warmup = warmup_steps_for(steps, cpt["warmup_ratio"])

    # ---- model, optimizer, distributed set-up
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    acc, precision = make_accelerator(cpt, world_size)
    rank, device = acc.process_index, acc.device
    if device.type == "cpu":
        torch.set_num_threads(cpt["threads"])
    torch.manual_seed(seed)
    model = load_base_model(model_location)
    if cpt["gradient_checkpointing"] and not acc.is_fsdp2:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = configure_optimizer(model, cpt["lr"], cpt["weight_decay"], tuple(cpt["betas"]), cpt["adam_eps"],
                                    fused=not acc.is_fsdp2)
    model, optimizer = acc.prepare(model, optimizer)

    fingerprint = config_hash({"cpt": {k: v for k, v in cpt.items() if k not in OPERATIONAL_KEYS}, "seed": seed,
                               "corpus": manifest["config_hash"], "total": manifest["total_tokens"],
                               "budget": str(budget), "model": model_location, "method": method})
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "train_log.csv"
    probe_blocks = None
    if cpt["probe"]["source"]:
        pt = general_tokens(cpt["probe"]["source"], tok, specials, cpt["probe"]["max_tokens"],
                            text_field=cpt["probe"]["text_field"], split=cpt["probe"]["split"])
        probe_blocks = to_blocks(pt, T) if len(pt) >= T else pt[None, :]

    # ---- resume or start
    ckpt = latest_checkpoint(workdir, fingerprint)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if acc.is_main_process:  # keep the log rows of the steps the checkpoint holds
            rows = [r for r in csv.DictReader(open(log_path))] if log_path.exists() else []
            with open(log_path, "w", newline="") as f:
                w = csv.DictWriter(f, LOG_FIELDS)
                w.writeheader()
                w.writerows(r for r in rows if int(r["step"]) <= state["step"])
        state["resumed_from"].append(state["step"])
        print(f"resuming {ckpt} at step {state['step']}/{steps}", file=sys.stderr)
    else:
        if acc.is_main_process:
            for old in workdir.glob("step_*"):  # checkpoints of other settings
                shutil.rmtree(old, ignore_errors=True)
            with open(log_path, "w", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writeheader()
        t0 = time.time()
        probe = estimate_loss(model, probe_blocks, mb, device) if probe_blocks is not None else None
        state = {"step": 0, "tokens_seen": 0, "replay_sequences": 0, "train_seconds": 0.0, "loss": None,
                 "fingerprint": fingerprint, "probe_loss_before": probe, "probe_seconds": time.time() - t0,
                 "resumed_from": []}
    acc.wait_for_everyone()

    # ---- the training loop
    log_file = open(log_path, "a", newline="") if acc.is_main_process else None
    log = csv.DictWriter(log_file, LOG_FIELDS) if log_file else None
    session_tokens, session_seconds = 0, 0.0
    for step in range(state["step"], steps):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, cpt["lr"], warmup, cpt["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_ids = plan[step * gb:(step + 1) * gb]
        micro = rank_micro_batches(step_ids, rank, acc.num_processes, mb)
        loss_sum = torch.zeros((), device=device)
        for i, ids in enumerate(micro):
            weight = len(ids) * acc.num_processes / len(step_ids)
            x = blocks.batch(ids if len(ids) else step_ids[:1]).to(device)
            with acc.no_sync(model) if i < len(micro) - 1 else nullcontext():
                loss = model(input_ids=x, labels=x).loss
                acc.backward(loss * weight)
            loss_sum += loss.detach() * (len(ids) / len(step_ids))
        grad_norm = acc.clip_grad_norm_(model.parameters(), cpt["grad_clip"]) if cpt["grad_clip"] else None
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(acc.reduce(loss_sum, reduction="sum"))  # every rank's share: the step's mean loss
        dt = time.perf_counter() - t0
        n_tok = len(step_ids) * T
        state["step"], state["tokens_seen"], state["loss"] = step + 1, state["tokens_seen"] + n_tok, loss_value
        state["replay_sequences"] += int((step_ids < 0).sum())
        state["train_seconds"] += dt
        session_tokens, session_seconds = session_tokens + n_tok, session_seconds + dt
        if log:
            log.writerow({"step": step + 1, "epoch": int(step * gb // n_blocks), "loss": f"{loss_value:.6f}",
                          "lr": f"{lr:.6e}", "grad_norm": "" if grad_norm is None else f"{float(grad_norm):.4f}",
                          "sequences": len(step_ids), "replay_sequences": int((step_ids < 0).sum()), "tokens": n_tok,
                          "tokens_seen": state["tokens_seen"], "step_seconds": f"{dt:.4f}",
                          "tokens_per_s": f"{n_tok / dt:.1f}", "elapsed_s": f"{time.time() - t_start:.2f}"})
            log_file.flush()
            if (step + 1) % cpt["log_every"] == 0 or step + 1 == steps:
                print(f"step {step + 1}/{steps} | loss {loss_value:.4f} | lr {lr:.2e} | {n_tok / dt:.0f} tok/s",
                      file=sys.stderr)
        every = cpt["checkpoint_every"]
        if (every and (step + 1) % every == 0 and step + 1 < steps) or step + 1 == stop_after_steps:
            save_checkpoint(acc, workdir, state, cpt["keep_checkpoints"])
            if step + 1 == stop_after_steps:
                if log_file:
                    log_file.close()
                raise Interrupted(f"stopped after step {step + 1} of {steps} (--stop-after-steps); "
                                  f"rerun to resume from {workdir}")
    if log_file:
        log_file.close()

    # ---- forgetting probe after CPT, then the Hugging Face folder
    t0 = time.time()
    probe_after = estimate_loss(model, probe_blocks, mb, device) if probe_blocks is not None else None
    state["probe_seconds"] += time.time() - t0
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)  # full weights on the main process (FSDP gathers them)
    peak, peak_kind = peak_memory_mb(device.type)
    summary = None
    if acc.is_main_process:
        save_dtype = cpt["save_dtype"]
        if save_dtype == "auto":
            save_dtype = "bfloat16" if precision == "bf16" else "float32"
        unwrapped = acc.unwrap_model(model)
        unwrapped.config.dtype = save_dtype
        tmp = output.with_name(output.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict={k: v.to(getattr(torch, save_dtype)) for k, v in state_dict.items()},
                                  safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.copyfile(log_path, tmp / "train_log.csv")
        synthetic_seqs = len(plan) - int((plan < 0).sum())
        wall = time.time() - t_start
        summary = {
            "method": method, "budget": str(budget), "budget_tokens": n_tokens, "budget_capped": capped,
            "corpus": str(corpus), "corpus_total_tokens": int(len(tokens)),
            "corpus_config_hash": manifest["config_hash"],
            "base_model": model_location, "seed": seed, "epochs": epochs, "block_size": T,
            "blocks": n_blocks, "tokens_in_blocks": n_blocks * T, "tail_tokens_dropped": n_tokens - n_blocks * T,
            "steps": steps, "warmup_steps": warmup, "global_batch": gb, "micro_batch": mb,
            "grad_accum": grad_accum_steps(gb, mb, acc.num_processes), "world_size": acc.num_processes,
            "sequences_trained": len(plan), "tokens_seen": state["tokens_seen"],
            "synthetic_tokens_seen": synthetic_seqs * T, "replay_tokens_seen": int((plan < 0).sum()) * T,
            "replay_rate": cpt["replay"]["rate"], "replay_fraction": float((plan < 0).mean()),
            "replay_unique_blocks": 0 if replay_blocks is None else len(replay_blocks), "padding_tokens": 0,
            **source_shares(corpus, manifest, plan, n_blocks),  # realised share of each source (mixtures)
            "final_loss": state["loss"], "lr": cpt["lr"], "precision": precision, "device": str(device),
            "save_dtype": save_dtype, "wall_seconds": round(wall, 2), "train_seconds": round(state["train_seconds"], 2),
            "tokens_per_s": round(session_tokens / session_seconds, 1) if session_seconds else None,
            "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind,
            "resumed_from_steps": state["resumed_from"],
            "forgetting_probe": None if probe_blocks is None else {
                "source": cpt["probe"]["source"], "tokens": int(probe_blocks.size),
                "loss_before": state["probe_loss_before"], "loss_after": probe_after,
                "ppl_before": math.exp(state["probe_loss_before"]), "ppl_after": math.exp(probe_after),
                "seconds": round(state["probe_seconds"], 2)},
            "config_hash": config_hash({"cpt": cpt, "seed": seed}), "fingerprint": fingerprint,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
        }
        write_json_atomic(tmp / "train_summary.json", summary)
        shutil.rmtree(output, ignore_errors=True)
        tmp.rename(output)
        if cpt["delete_checkpoints"]:  # the final model supersedes them
            for old in workdir.glob("step_*"):
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return summary or {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus folder (tokens.npy + manifest.json) or its tokens.npy")
    p.add_argument("--budget", required=True, help="synthetic-token budget, or 'all' for the whole corpus")
    p.add_argument("--model", required=True, help="base model: folder or hub id")
    p.add_argument("--output", required=True, help="output folder (Hugging Face model + log + summary)")
    p.add_argument("--method", default=None, help="method name (default: the corpus manifest's)")
    p.add_argument("--workdir", default=None,
                   help="checkpoints and the live log (default results/checkpoints/METHOD/BUDGET)")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this many steps (exit code 3), as a killed or time-limited job; "
                        "a rerun resumes")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = train(cfg, args.corpus, args.budget, args.model, args.output, args.workdir, args.method,
                        args.stop_after_steps)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 3
    if summary:
        print(json.dumps({k: summary[k] for k in ("method", "budget", "steps", "tokens_seen", "final_loss",
                                                  "tokens_per_s", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
