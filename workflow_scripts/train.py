"""Stage 6: continued pretraining (CPT) of a causal LM on a budget-sized prefix of a corpus.

    python -m workflow_scripts.train --corpus results/corpus/entigraph --budget 4096 \\
        --model results/hf_models/smollm2-135m-instruct --output results/models/entigraph/4096 \\
        [--configfile config.yaml]
    torchrun --nproc_per_node 8 -m workflow_scripts.train ... --gpus 8   # several GPUs: FSDP2, one unit per decoder layer

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

Processes. One process, or torchrun with one process per GPU (or per CPU slot: gloo), driven with
torch.distributed directly (`Runtime`): FSDP2 (`fully_shard`, one unit per decoder layer, then the root) when
cpt.fsdp.enabled, else DDP. The same code runs on CPU and GPU, so the CPU tests check the path a GPU job takes.
A job that asked for GPUs (--gpus, from cpt.resources.gpu) on a machine without CUDA fails before any work.

Checkpoints every `checkpoint_every` steps and every `checkpoint_minutes` of wall time under --workdir (default
results/checkpoints/METHOD/BUDGET, outside the Snakemake output folder, which Snakemake deletes before a rerun):
model and optimizer through
torch.distributed.checkpoint (each rank writes its own shards), each rank's RNG state, and trainer_state.json
(step, tokens, probe, fingerprints). The LR schedule is a pure function of the step. A rerun with the same
settings and the same layout (world size, FSDP on/off) resumes from the latest checkpoint; with other settings it
starts afresh; with the same settings under another layout it is refused with a message naming both layouts.

Outputs in --output: the model in Hugging Face format (safetensors) with its tokenizer, train_log.csv (one row per
step: loss, LR, grad norm, tokens/s, ...) and train_summary.json (tokens, steps, wall time, peak memory,
throughput, the forgetting probe: perplexity of held-out general text before and after CPT). With cpt.adapter (LoRA or
QLoRA: workflow_scripts/lora.py) only the adapter trains and checkpoints; the output holds the merged weights in the
same files, and the adapter alone in adapter/.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import stage
from .config import config_hash
from .corpus import budget_tokens, load_corpus
from .derived import RAW
from .io_utils import InputError, write_json_atomic
from . import lora, replay
from .job_keys import resume_config, shaping
from .mixture import curriculum_order, source_shares
from .models import load_base_model, load_tokenizer, save_model

LOG_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "sequences", "replay_sequences", "tokens", "tokens_seen",
              "step_seconds", "tokens_per_s", "elapsed_s"]


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


def peak_memory_mb(device_type: str) -> tuple[float, str]:
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def check_devices(cpt: dict, gpus: int) -> None:
    """Fail before any work when the job asked for GPUs (cpt.resources.gpu, passed as --gpus) or for bf16 and this
    machine has no CUDA: a silent fallback to fp32 on the CPU would run for days instead of hours."""
    import torch

    if torch.cuda.is_available():
        return
    if gpus > 0:  # why CUDA does not answer (CPU torch, no driver, a driver too old for torch's CUDA), as preflight
        from .preflight import decide, gather_facts

        why = decide(gather_facts(), gpus, False) or "run the job on a GPU node"
        raise InputError(f"cpt.resources.gpu is {gpus} but this machine ({platform.node()}) has no CUDA device it "
                         f"can use: {why}; or set cpt.resources.gpu: 0 to train on the CPU")
    if cpt["precision"] == "bf16":
        raise InputError(f"cpt.precision is bf16 but this machine ({platform.node()}) has no CUDA device: "
                         "set cpt.precision: auto (fp32 on CPU) or run on a GPU node")


# ------------------------------------------------------------------------------------ distributed runtime
class Runtime:
    """One process of a training run: its rank, device and precision, and the model wrapper of its layout.

    Driven with torch.distributed directly (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK): world size 1 is a plain
    module; with several processes FSDP2 (`fully_shard`, one unit per decoder layer, then the root) when
    cpt.fsdp.enabled, else DDP. The same code runs on CPU (gloo) and GPU (nccl); accelerate's FSDP plugin falls
    back to DDP on a CPU without saying so, so it cannot be what the CPU tests check."""

    def __init__(self, cpt: dict) -> None:
        import torch
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(local_rank)
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo")
        precision = cpt["precision"]
        if precision == "auto":
            precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
        self.precision, self.cpt = precision, cpt
        self.fsdp = self.world_size > 1 and bool(cpt["fsdp"]["enabled"])
        self.is_main = self.rank == 0

    @property
    def layout(self) -> dict:
        """What a checkpoint's shards depend on: a resume needs the same."""
        return {"world_size": self.world_size, "fsdp": self.fsdp}

    def wrap(self, model):  # type: ignore[no-untyped-def]
        """The model on this device in this run's layout (gradient checkpointing before wrapping)."""
        import torch

        if self.cpt["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.fsdp:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

            bf16 = self.precision == "bf16"
            kw = {"reshard_after_forward": self.cpt["fsdp"]["reshard_after_forward"],
                  "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                                    reduce_dtype=torch.float32 if bf16 else None),
                  "offload_policy": CPUOffloadPolicy() if self.cpt["fsdp"]["cpu_offload"] else OffloadPolicy()}
            if not self.cpt["fsdp"]["cpu_offload"]:
                model.to(self.device)
            units = set(getattr(model, "_no_split_modules", None) or [])  # e.g. LlamaDecoderLayer (the paper's)
            for module in list(model.modules()):
                if type(module).__name__ in units:
                    fully_shard(module, **kw)
            return fully_shard(model, **kw)
        model.to(self.device)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None)
        return model

    def autocast(self):  # type: ignore[no-untyped-def]
        """bf16 autocast outside FSDP (FSDP2's MixedPrecisionPolicy casts the parameters itself)."""
        import torch

        if self.precision == "bf16" and not self.fsdp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def no_sync(self, model, sync: bool):  # type: ignore[no-untyped-def]
        """The gradient communication of one micro-batch (`sync`: it is the step's last). FSDP2 reduce-scatters every
        micro-batch, as torchtitan does, unless cpt.fsdp.no_sync_accumulation (then all but the last skip it and
        every rank keeps an unsharded fp32 gradient meanwhile); DDP skips the all-reduce on all but the last."""
        if self.fsdp:
            if self.cpt["fsdp"]["no_sync_accumulation"]:
                model.set_requires_gradient_sync(sync)
        elif self.world_size > 1 and not sync:
            return model.no_sync()
        return nullcontext()

    def sum(self, value):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def unwrap(self, model):  # type: ignore[no-untyped-def]
        return model.module if self.world_size > 1 and not self.fsdp else model

    def full_state_dict(self, model) -> dict:  # type: ignore[no-untyped-def]
        """The full weights on the main process (FSDP gathers the shards; other ranks get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def close(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_options(model):  # type: ignore[no-untyped-def]
    """What a checkpoint holds: the trainable parameters and their optimizer state (every parameter in full CPT;
    a LoRA run's frozen base is read again from the base model, so loading then skips the frozen keys, while
    dcp.load still requires every trainable key of the run in the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def latest_checkpoint(workdir: Path, fingerprint: str, settings: str | None = None,
                      layout: dict | None = None) -> Path | None:
    """The newest complete checkpoint of this run (same fingerprint), or None. A checkpoint of the same settings
    written by another layout (world size, FSDP on/off) is refused: its shards do not fit this run."""
    for ckpt in sorted(workdir.glob("step_*"), reverse=True):
        path = ckpt / "trainer_state.json"
        if not path.exists():
            continue
        state = json.loads(path.read_text())
        if state["fingerprint"] == fingerprint:
            return ckpt
        if settings is not None and state.get("settings_fingerprint") == settings:
            theirs, ours = state.get("layout", {}), layout or {}
            raise InputError(
                f"{ckpt}: this checkpoint was written with world size {theirs.get('world_size')} and FSDP "
                f"{'on' if theirs.get('fsdp') else 'off'}, this run has world size {ours.get('world_size')} and FSDP "
                f"{'on' if ours.get('fsdp') else 'off'}; rerun with the checkpoint's layout (processes, "
                f"cpt.fsdp.enabled) or delete {workdir} to start afresh")
    return None


def _now() -> float:
    return time.monotonic()


class CheckpointClock:
    """When a checkpoint is due after a step: every `every` steps (0: never by steps) and, with `minutes`, once that
    much wall time has passed since the last checkpoint (or the start). Either kind restarts the wall-time count."""

    def __init__(self, every: int, minutes: float | None, clock=None) -> None:  # type: ignore[no-untyped-def]
        self.every, self.seconds = every, None if minutes is None else 60.0 * minutes
        self.clock = clock or (lambda: _now())
        self.last = self.clock()

    def due(self, steps_done: int) -> bool:
        by_steps = bool(self.every) and steps_done % self.every == 0
        return by_steps or (self.seconds is not None and self.clock() - self.last >= self.seconds)

    def saved(self) -> None:
        self.last = self.clock()


def agree(rt: Runtime, flag: bool) -> bool:
    """True on every process when it is on any (so that all of a job's processes checkpoint together)."""
    import torch

    return bool(rt.sum(torch.tensor(float(flag), device=rt.device)) > 0) if rt.world_size > 1 else flag


def save_checkpoint(rt: Runtime, model, optimizer, workdir: Path, state: dict,  # type: ignore[no-untyped-def]
                    keep: int) -> Path:
    """Model and optimizer (torch.distributed.checkpoint: each rank writes its shards), each rank's RNG state and
    trainer_state.json, in a temporary folder renamed into place when complete."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = workdir / f"step_{state['step']:08d}"
    tmp = workdir / f".{final.name}.partial"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    msd, osd = get_state_dict(model, optimizer, options=checkpoint_options(model))
    with warnings.catch_warnings():  # one process: DCP says it saves without a process group, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if rt.device.type == "cuda" else None}
    torch.save(rng, tmp / f"rng_{rt.rank}.pt")
    rt.barrier()
    if rt.is_main:
        write_json_atomic(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(workdir.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return final


def load_checkpoint(rt: Runtime, model, optimizer, ckpt: Path) -> dict:  # type: ignore[no-untyped-def]
    """Restore what save_checkpoint wrote, in place; returns trainer_state.json."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=checkpoint_options(model))
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=checkpoint_options(model))
    rng = torch.load(ckpt / f"rng_{rt.rank}.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------- train
@dataclass
class Run:
    """What one CPT run trains on: the budget's blocks, the whole run's order, the step count, the probe."""

    method: str
    seed: int
    epochs: int
    block_size: int
    global_batch: int
    micro_batch: int
    n_tokens: int
    capped: bool
    n_blocks: int
    plan: np.ndarray
    blocks: Blocks
    steps: int
    warmup: int
    corpus_tokens: int = 0
    manifest: dict = field(default_factory=dict)
    tokenizer: Any = None
    probe_blocks: np.ndarray | None = None
    probe_overlap: dict | None = None
    n_replay_blocks: int = 0


def prepare_data(cfg: dict, corpus: str | Path, budget: int | str, model_location: str,
                 method: str | None, articles: str | Path | None = None, replay_pool: str | Path | None = None) -> Run:
    """Data: the budget prefix in blocks, the replay and probe blocks, the run's plan. `articles`
    (articles.jsonl) is what the forgetting probe is checked against besides the training tokens. `replay_pool`:
    the run's pool built once (rule replay_pool), memory-mapped instead of tokenizing the source here."""
    cpt, seed = cfg["cpt"], int(cfg["cpt"]["seed"] if cfg["cpt"]["seed"] is not None else cfg["seed"])
    tokens, manifest = load_corpus(corpus)
    method = method or manifest["method"]
    epochs = cpt["raw_epochs"] if method == RAW else cpt["epochs"]
    T, gb = cpt["block_size"], cpt["global_batch"]
    n_tokens, capped = budget_tokens(len(tokens), budget, cpt["allow_budget_cap"], str(corpus))
    n_blocks = n_tokens // T
    if n_blocks == 0:
        raise InputError(f"{corpus}: budget {budget} ({n_tokens} tokens) is shorter than one block of {T} tokens; "
                         "raise the budget or lower cpt.block_size")
    plan = data_plan(n_blocks, epochs, seed, cpt["replay"]["rate"],
                     curriculum_order(corpus, manifest, n_blocks, T))  # None: the seeded shuffle
    tok = load_tokenizer(model_location)
    specials = {k: manifest["tokenizer"][k] for k in ("bos", "eos")}  # general text tokenized like the corpus
    replay_blocks, n_replay = None, int((plan < 0).sum())
    pool = replay.load_pool(replay_pool, cpt, seed, manifest["tokenizer"]) if replay_pool else None
    if n_replay:
        # random blocks of a shuffled pool, the held-out part kept apart (workflow_scripts/replay.py)
        replay_blocks = replay.replay_blocks(cpt["replay"], tok, specials, T, n_replay, seed, pool)
    corpus_blocks = tokens[:n_blocks * T].reshape(n_blocks, T)
    # the probe is refused if it overlaps what this run trains on or the prepared articles (replay.check_probe)
    probe_blocks, probe_overlap = replay.probe_blocks(cpt, tok, specials, T, seed, [corpus_blocks, replay_blocks],
                                                      articles, pool)
    steps = math.ceil(len(plan) / gb)
    return Run(method=method, seed=seed, epochs=epochs, block_size=T, global_batch=gb, micro_batch=cpt["micro_batch"],
               n_tokens=n_tokens, capped=capped, n_blocks=n_blocks, plan=plan,
               blocks=Blocks(corpus_blocks, replay_blocks, seed), steps=steps,
               warmup=warmup_steps_for(steps, cpt["warmup_ratio"]), corpus_tokens=int(len(tokens)),
               manifest=manifest, tokenizer=tok, probe_blocks=probe_blocks, probe_overlap=probe_overlap,
               n_replay_blocks=0 if replay_blocks is None else len(replay_blocks))


def set_up(cpt: dict, seed: int, model_location: str):  # type: ignore[no-untyped-def]
    """Set-up: the process's runtime, the base model in its layout, and its optimizer."""
    import torch

    rt = Runtime(cpt)
    if rt.device.type == "cpu":
        torch.set_num_threads(cpt["threads"])
    torch.manual_seed(seed)
    # LoRA / QLoRA (cpt.adapter): the adapter on the frozen base, workflow_scripts/lora.py
    model = rt.wrap(lora.load_model(model_location, cpt, rt.precision, rt.device) if lora.enabled(cpt)
                    else load_base_model(model_location))
    model.train()
    optimizer = configure_optimizer(model, cpt["lr"], cpt["weight_decay"], tuple(cpt["betas"]), cpt["adam_eps"],
                                    fused=not rt.fsdp)
    return rt, model, optimizer


def fingerprints(cfg: dict, run: Run, budget: int | str, model_location: str, layout: dict) -> tuple[str, str]:
    """(settings, full): the settings that shape the weights, and those plus the process layout (a resume needs
    both to match; same settings under another layout is refused rather than silently restarted)."""
    settings = config_hash({**resume_config(cfg, "cpt"), "seed": run.seed,
                            "corpus": run.manifest["config_hash"], "total": run.manifest["total_tokens"],
                            "budget": str(budget), "model": model_location, "method": run.method})
    return settings, config_hash({"settings": settings, "layout": layout})


def resume_or_start(rt: Runtime, model, optimizer, run: Run, workdir: Path,  # type: ignore[no-untyped-def]
                    fps: tuple[str, str]) -> dict:
    """Resume: the newest checkpoint of this run (its log cut back to its step), or a fresh state with the
    forgetting probe of the base model."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "train_log.csv"
    ckpt = latest_checkpoint(workdir, fps[1], fps[0], rt.layout)
    if ckpt is not None:
        state = load_checkpoint(rt, model, optimizer, ckpt)
        if rt.is_main:  # keep the log rows of the steps the checkpoint holds
            rows = [r for r in csv.DictReader(open(log_path))] if log_path.exists() else []
            with open(log_path, "w", newline="") as f:
                w = csv.DictWriter(f, LOG_FIELDS)
                w.writeheader()
                w.writerows(r for r in rows if int(r["step"]) <= state["step"])
        state["resumed_from"].append(state["step"])
        print(f"resuming {ckpt} at step {state['step']}/{run.steps}", file=sys.stderr)
    else:
        if rt.is_main:
            for old in workdir.glob("step_*"):  # checkpoints of other settings
                shutil.rmtree(old, ignore_errors=True)
            with open(log_path, "w", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writeheader()
        t0 = time.time()
        probe = estimate_loss(model, run.probe_blocks, run.micro_batch, rt.device) if run.probe_blocks is not None \
            else None
        state = {"step": 0, "tokens_seen": 0, "replay_sequences": 0, "train_seconds": 0.0, "loss": None,
                 "fingerprint": fps[1], "settings_fingerprint": fps[0], "layout": rt.layout,
                 "probe_loss_before": probe, "probe_seconds": time.time() - t0, "resumed_from": []}
    rt.barrier()
    return state


def train_step(rt: Runtime, model, optimizer, run: Run, step_ids: np.ndarray,  # type: ignore[no-untyped-def]
               grad_clip: float | None) -> tuple[float, float | None]:
    """One optimizer step over the step's sequences (this rank's share, in micro-batches): (mean loss, grad norm)."""
    import torch

    micro = rank_micro_batches(step_ids, rt.rank, rt.world_size, run.micro_batch)
    loss_sum = torch.zeros((), device=rt.device)
    for i, ids in enumerate(micro):
        weight = len(ids) * rt.world_size / len(step_ids)  # the gradient all-reduce averages over ranks
        x = run.blocks.batch(ids if len(ids) else step_ids[:1]).to(rt.device)
        with rt.no_sync(model, sync=i == len(micro) - 1):
            with rt.autocast():
                loss = model(input_ids=x, labels=x).loss
            (loss * weight).backward()
        loss_sum += loss.detach().float() * (len(ids) / len(step_ids))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(rt.sum(loss_sum)), None if grad_norm is None else float(grad_norm)  # every rank's share


def training_loop(cpt: dict, rt: Runtime, model, optimizer, run: Run, state: dict,  # type: ignore[no-untyped-def]
                  workdir: Path, stop_after_steps: int | None = None) -> tuple[int, float]:
    """Loop: from the state's step to the last, logging every step and checkpointing when CheckpointClock says;
    returns this session's (tokens, seconds)."""
    log_file = open(workdir / "train_log.csv", "a", newline="") if rt.is_main else None
    log = csv.DictWriter(log_file, LOG_FIELDS) if log_file else None
    session_tokens, session_seconds, t_start = 0, 0.0, time.time()
    timer = CheckpointClock(cpt["checkpoint_every"], cpt["checkpoint_minutes"])
    try:
        for step in range(state["step"], run.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, run.steps, cpt["lr"], run.warmup, cpt["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_ids = run.plan[step * run.global_batch:(step + 1) * run.global_batch]
            loss, grad_norm = train_step(rt, model, optimizer, run, step_ids, cpt["grad_clip"])
            dt, n_tok = time.perf_counter() - t0, len(step_ids) * run.block_size
            state.update(step=step + 1, tokens_seen=state["tokens_seen"] + n_tok, loss=loss,
                         replay_sequences=state["replay_sequences"] + int((step_ids < 0).sum()),
                         train_seconds=state["train_seconds"] + dt)
            session_tokens, session_seconds = session_tokens + n_tok, session_seconds + dt
            if log:
                log.writerow({"step": step + 1, "epoch": int(step * run.global_batch // run.n_blocks),
                              "loss": f"{loss:.6f}", "lr": f"{lr:.6e}",
                              "grad_norm": "" if grad_norm is None else f"{grad_norm:.4f}",
                              "sequences": len(step_ids), "replay_sequences": int((step_ids < 0).sum()),
                              "tokens": n_tok, "tokens_seen": state["tokens_seen"], "step_seconds": f"{dt:.4f}",
                              "tokens_per_s": f"{n_tok / dt:.1f}", "elapsed_s": f"{time.time() - t_start:.2f}"})
                log_file.flush()
                if (step + 1) % cpt["log_every"] == 0 or step + 1 == run.steps:
                    print(f"step {step + 1}/{run.steps} | loss {loss:.4f} | lr {lr:.2e} | {n_tok / dt:.0f} tok/s",
                          file=sys.stderr)
            due = timer.due(step + 1)
            if timer.seconds is not None:  # processes' clocks differ: all save when any is due
                due = agree(rt, due)
            if (due and step + 1 < run.steps) or step + 1 == stop_after_steps:
                save_checkpoint(rt, model, optimizer, workdir, state, cpt["keep_checkpoints"])
                timer.saved()
                if step + 1 == stop_after_steps:
                    raise Interrupted(f"stopped after step {step + 1} of {run.steps} (--stop-after-steps); "
                                      f"rerun to resume from {workdir}")
    finally:
        if log_file:
            log_file.close()
    return session_tokens, session_seconds


def finish(cpt: dict, rt: Runtime, model, run: Run, state: dict, output: Path,  # type: ignore[no-untyped-def]
           workdir: Path, session: tuple[int, float], t_start: float) -> dict | None:
    """Finish: the forgetting probe after CPT, then the Hugging Face folder (weights, tokenizer, log, summary),
    renamed into place; returns the summary on the main process."""
    import torch

    t0 = time.time()
    probe_after = estimate_loss(model, run.probe_blocks, run.micro_batch, rt.device) \
        if run.probe_blocks is not None else None
    state["probe_seconds"] += time.time() - t0
    rt.barrier()
    state_dict = rt.full_state_dict(model)
    if not rt.is_main:
        rt.barrier()
        return None
    save_dtype = cpt["save_dtype"]
    if save_dtype == "auto":
        save_dtype = "bfloat16" if rt.precision == "bf16" else "float32"
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = rt.unwrap(model)
    if lora.enabled(cpt):  # the adapter alone in adapter/; the merged weights are saved as any CPT model's
        unwrapped, state_dict, adapter = lora.save(unwrapped, state_dict, cpt, tmp / "adapter", state["base_model"])
    save_model(unwrapped, tmp, {k: v.to(getattr(torch, save_dtype)) for k, v in state_dict.items()}, save_dtype)
    run.tokenizer.save_pretrained(tmp)
    shutil.copyfile(workdir / "train_log.csv", tmp / "train_log.csv")
    summary = summarize(cpt, rt, run, state, probe_after, session, save_dtype, time.time() - t_start)
    if lora.enabled(cpt):
        summary["adapter"] = adapter
    write_json_atomic(tmp / "train_summary.json", summary)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    if cpt["delete_checkpoints"]:  # the final model supersedes them
        for old in workdir.glob("step_*"):
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return summary


def summarize(cpt: dict, rt: Runtime, run: Run, state: dict, probe_after: float | None,
              session: tuple[int, float], save_dtype: str, wall: float) -> dict:
    """train_summary.json: what was trained, how, how fast, and the forgetting probe."""
    import torch

    plan, T = run.plan, run.block_size
    peak, peak_kind = peak_memory_mb(rt.device.type)
    return {
        "method": run.method, "budget": state["budget"], "budget_tokens": run.n_tokens, "budget_capped": run.capped,
        "corpus": state["corpus"], "corpus_total_tokens": run.corpus_tokens,
        "corpus_config_hash": run.manifest["config_hash"],
        "base_model": state["base_model"], "seed": run.seed, "epochs": run.epochs, "block_size": T,
        "blocks": run.n_blocks, "tokens_in_blocks": run.n_blocks * T, "tail_tokens_dropped": run.n_tokens - run.n_blocks * T,
        "steps": run.steps, "warmup_steps": run.warmup, "global_batch": run.global_batch, "micro_batch": run.micro_batch,
        "grad_accum": grad_accum_steps(run.global_batch, run.micro_batch, rt.world_size), "world_size": rt.world_size,
        "fsdp": rt.fsdp, "fsdp_no_sync_accumulation": rt.fsdp and cpt["fsdp"]["no_sync_accumulation"],
        "sequences_trained": len(plan), "tokens_seen": state["tokens_seen"],
        "synthetic_tokens_seen": int((plan >= 0).sum()) * T, "replay_tokens_seen": int((plan < 0).sum()) * T,
        "replay_rate": cpt["replay"]["rate"], "replay_fraction": float((plan < 0).mean()),
        "replay_unique_blocks": run.n_replay_blocks, "padding_tokens": 0,
        **source_shares(state["corpus"], run.manifest, plan, run.n_blocks),  # realised share of each source (mixtures)
        "final_loss": state["loss"], "lr": cpt["lr"], "precision": rt.precision, "device": str(rt.device),
        "save_dtype": save_dtype, "wall_seconds": round(wall, 2), "train_seconds": round(state["train_seconds"], 2),
        "tokens_per_s": round(session[0] / session[1], 1) if session[1] else None,
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind,
        "resumed_from_steps": state["resumed_from"],
        "forgetting_probe": None if run.probe_blocks is None else {
            "source": cpt["probe"]["source"], "tokens": int(run.probe_blocks.size),
            "overlap": run.probe_overlap,
            "loss_before": state["probe_loss_before"], "loss_after": probe_after,
            "ppl_before": math.exp(state["probe_loss_before"]), "ppl_after": math.exp(probe_after),
            "seconds": round(state["probe_seconds"], 2)},
        "config_hash": config_hash({**shaping({"cpt": cpt, "seed": run.seed}, "cpt"), "seed": run.seed}),
        "fingerprint": state["fingerprint"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }


def train(cfg: dict, corpus: str | Path, budget: int | str, model_location: str, output: str | Path,
          workdir: str | Path | None = None, method: str | None = None, stop_after_steps: int | None = None,
          gpus: int = 0, articles: str | Path | None = None, replay_pool: str | Path | None = None) -> dict[str, Any]:
    """Continued pretraining of `model_location` on `budget` tokens of `corpus`; returns the train summary (on the
    main process; {} on the others). `gpus` is what the job asked for (cpt.resources.gpu)."""
    cfg = lora.resolve(cfg)  # a LoRA run's own peak LR (cpt.adapter.lr)
    t_start, cpt = time.time(), cfg["cpt"]
    check_devices(cpt, gpus)
    lora.check(cpt)
    run = prepare_data(cfg, corpus, budget, model_location, method, articles, replay_pool)
    workdir = Path(workdir or Path("results/checkpoints") / run.method / str(budget))
    rt, model, optimizer = set_up(cpt, run.seed, model_location)
    try:
        fps = fingerprints(cfg, run, budget, model_location, rt.layout)
        state = resume_or_start(rt, model, optimizer, run, workdir, fps)
        session = training_loop(cpt, rt, model, optimizer, run, state, workdir, stop_after_steps)
        state.update(budget=str(budget), corpus=str(corpus), base_model=model_location)
        return finish(cpt, rt, model, run, state, Path(output), workdir, session, t_start) or {}
    finally:
        rt.close()


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("train", __doc__, config=True)
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
    p.add_argument("--articles", default=None,
                   help="articles.jsonl: the forgetting probe must not overlap it (nor the training tokens)")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs the job asked for (cpt.resources.gpu; the rule passes it): more than 0 on a machine "
                        "without CUDA is an error before any work")
    p.add_argument("--replay-pool", default=None,
                   help="the run's replay pool (results/replay/pool, rule replay_pool): memory-mapped by every "
                        "process instead of tokenizing cpt.replay.source in each")
    args = p.parse_args(argv)

    def body() -> None:
        summary = train(stage.config(args), args.corpus, args.budget, args.model, args.output, args.workdir,
                        args.method, args.stop_after_steps, args.gpus, args.articles, args.replay_pool)
        if summary:
            print(json.dumps({k: summary[k] for k in ("method", "budget", "steps", "tokens_seen", "final_loss",
                                                      "tokens_per_s", "wall_seconds")}))

    return stage.run(body, exits={Interrupted: ("interrupted", 3)})


if __name__ == "__main__":
    sys.exit(main())
