"""GPU memory, planned before a job is submitted: the estimated peak per GPU of every GPU job of a config.

    python -m workflow_scripts.plan --configfile experiments/paper.yaml     # prints the memory table too

The estimate models what THIS project's jobs hold (docs/cluster.md "Memory" gives the formulae):
- training (workflow_scripts/train.py, also instruction tuning): fp32 master weights (load_base_model loads fp32),
  bf16 compute on GPU (FSDP2's MixedPrecisionPolicy with fp32 gradient reduction, or autocast without FSDP), AdamW's
  two fp32 states, fp32 gradients, the activations a decoder layer saves for backward, the logits and the loss's
  fp32 log-softmax, FSDP2 units per decoder layer plus the root (embeddings and head, never resharded after
  forward), gradient accumulation with or without the per-micro-batch reduce-scatter, CPU offload, activation
  checkpointing, and LoRA adapters (frozen bf16 or 4-bit base, the activations each LoRA branch saves);
- vLLM: gpu_memory_utilization x the GPU's memory, of which the weights / tensor_parallel_size, the profiled
  activations and the CUDA graphs; the rest is KV cache, which must hold at least one max_model_len sequence;
- transformers inference (the log-likelihood scorer, generation with the transformers backend): bf16 weights, the
  KV cache of a batch and one layer's transient activations.

The peak is the largest of a training step's phases (the loss backward, a layer's backward, the root's gradient
reduction, the optimizer step); `MemoryEstimate.parts` is that phase's composition. The tests check the estimate
against measured peaks on CPU (tests/test_memory_validation.py) and against torch's FSDPMemTracker on fake tensors.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GIB = 2**30
PARTS = ("weights", "grads", "optimizer", "activations", "logits", "other")

# Memory of each GPU type in GiB, as the driver reports it (nvidia-smi's MiB / 1024, rounded down to 0.1). Matched
# against planner.gpu_type by the longest key whose words all occur in it (case-insensitive); planner.gpu_memory_gib
# overrides. "80GB"/"40GB" in the label also pick the A100 variant.
GPU_TYPES: dict[str, float] = {
    "H100 NVL": 93.5, "H100 PCIe": 79.6, "H100": 79.6, "H200": 140.3, "GH200": 94.5, "B200": 179.0,
    "A100 80GB": 80.0, "A100 40GB": 40.0, "A100": 40.0, "L40S": 44.9, "L40": 44.9, "L4": 22.4, "A10G": 22.4,
    "A10": 22.4, "A6000": 47.9, "RTX 4090": 23.9, "RTX 3090": 24.0, "V100 32GB": 32.0, "V100": 16.0, "T4": 15.0,
}


def gpu_memory_gib(gpu_type: str, override: float | None = None) -> tuple[float, str]:
    """(GiB, source) of one GPU: planner.gpu_memory_gib when set, else the GPU_TYPES entry the label names."""
    if override is not None:
        return float(override), "planner.gpu_memory_gib"
    label = gpu_type.upper().replace("-", " ")
    hits = [k for k in GPU_TYPES if all(w.upper() in label.split() or w.upper() in label for w in k.split())]
    if not hits:
        raise ValueError(f"planner.gpu_type {gpu_type!r} is not in the memory table (workflow_scripts/memory.py "
                         "GPU_TYPES): set planner.gpu_memory_gib to its memory in GiB")
    key = max(hits, key=len)
    return GPU_TYPES[key], f"GPU_TYPES[{key!r}]"


# ------------------------------------------------------------------------------------------------- shapes
@dataclass
class ModelShape:
    """A dense decoder (Llama, Qwen2, SmolLM2): what memory depends on."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tie_embeddings: bool
    max_position: int | None = None
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * (self.head_dim or self.hidden // self.n_heads)

    @property
    def q_dim(self) -> int:
        return self.n_heads * (self.head_dim or self.hidden // self.n_heads)

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return h * self.q_dim * 2 + 2 * h * self.kv_dim + 3 * h * i + 2 * h

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (FSDP2's root unit): embeddings, head (when untied), final norm."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden

    @property
    def n_params(self) -> int:
        return self.n_layers * self.layer_params + self.root_params

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.kv_dim * dtype_bytes

    def lora_params(self, adapter: dict) -> int:
        """Trainable parameters of a LoRA adapter (rank r on each target module: r x (in + out)), plus the
        embeddings and the head when the adapter trains them."""
        h, i, r = self.hidden, self.intermediate, int(adapter["rank"])
        dims = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        targets = adapter["target_modules"]
        n = self.n_layers * sum(r * sum(dims[t]) for t in targets if t in dims)
        n += self.vocab * h if adapter["train_embeddings"] else 0
        n += self.vocab * h if adapter["train_head"] and not self.tie_embeddings else 0
        return n

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelShape":
        """From a transformers config.json dict (text_config of a multimodal one)."""
        d = d.get("text_config") or d
        heads = int(d["num_attention_heads"])
        return cls(n_layers=int(d["num_hidden_layers"]), hidden=int(d["hidden_size"]),
                   intermediate=int(d["intermediate_size"]), n_heads=heads,
                   n_kv_heads=int(d.get("num_key_value_heads") or heads), vocab=int(d["vocab_size"]),
                   tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                   max_position=d.get("max_position_embeddings"), head_dim=d.get("head_dim"))


# The models the overlays name, from their config.json files on the Hugging Face Hub (so that a laptop plans a GPU
# config without downloading 16 GB); any other model is read from its folder or the Hugging Face cache.
_LLAMA3 = dict(n_layers=32, hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8, vocab=128256,
               tie_embeddings=False)
KNOWN_SHAPES: dict[str, ModelShape] = {
    "meta-llama/Meta-Llama-3-8B": ModelShape(**_LLAMA3, max_position=8192),
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelShape(**_LLAMA3, max_position=8192),
    "meta-llama/Llama-3.1-8B": ModelShape(**_LLAMA3, max_position=131072),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ModelShape(**_LLAMA3, max_position=131072),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(**_LLAMA3, max_position=131072),
    "zitongyang/llama-3-8b-entigraph-quality": ModelShape(**_LLAMA3, max_position=8192),
    "Qwen/Qwen2.5-0.5B": ModelShape(24, 896, 4864, 14, 2, 151936, True, 32768),
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(24, 896, 4864, 14, 2, 151936, True, 32768),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(28, 1536, 8960, 12, 2, 151936, True, 32768),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(28, 3584, 18944, 28, 4, 152064, False, 32768),
    "smollm2-135m-instruct": ModelShape(30, 576, 1536, 9, 3, 49152, True, 8192),
}


def model_shape(location: str, root: Path | None = None) -> tuple[ModelShape | None, str]:
    """(shape, source) of a model folder or hub id: its config.json (folder, then the Hugging Face cache), else
    KNOWN_SHAPES; (None, why) when none of them knows it."""
    candidates = [Path(location)] + ([root / location] if root is not None else [])
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    snaps = sorted(glob.glob(os.path.join(hub, "models--" + location.replace("/", "--"), "snapshots", "*")))
    for folder in candidates + [Path(p) for p in snaps]:
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                return ModelShape.from_hf_config(json.loads(cfg.read_text(encoding="utf-8"))), str(cfg)
            except (KeyError, ValueError, TypeError):
                continue
    short = location.rstrip("/").split("/")[-1]
    for key, shape in KNOWN_SHAPES.items():
        if location == key or short == key.split("/")[-1]:
            return shape, f"workflow_scripts/memory.py KNOWN_SHAPES[{key!r}]"
    return None, (f"no config.json for {location!r} (folder or Hugging Face cache) and not in KNOWN_SHAPES: "
                  "download the model (or its config.json) first")


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainShape:
    """One training process: sequence length, micro-batch, the process layout and the precision policy.
    param_bytes is the compute dtype (2 = bf16 mixed precision; 4 = fp32, the CPU path)."""

    seq_len: int
    micro_batch: int
    world_size: int
    grad_accum: int
    param_bytes: int = 2
    master_fp32: bool = True
    fsdp: bool = True
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    no_sync_accumulation: bool = False
    adapter: dict | None = None
    # FSDP2 even at world size 1 (train.py wraps only when world_size > 1; the GPU check forces it)
    force_fsdp: bool = False


@dataclass
class MemoryEstimate:
    """Peak bytes per GPU (or process), by part, at the phase where the peak occurs."""

    parts: dict[str, int]
    phase: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()))

    def gib(self, part: str | None = None) -> float:
        return (self.total_bytes if part is None else self.parts.get(part, 0)) / GIB


def layer_activation_bytes(model: ModelShape, tokens: int, act_bytes: int) -> int:
    """Bytes one decoder layer saves for backward for `tokens` tokens (HF Llama/Qwen2 layers, SDPA attention with
    no score matrix): per token, each RMSNorm its fp32 input and normalised output plus the bf16 result (4h +
    2a h), q/k/v after RoPE (a (q + 2 kv)), the attention output and o_proj's input (2a q), the MLP's gate, SiLU,
    up and product (4a I), with a the activation dtype's bytes."""
    h, a = model.hidden, act_bytes
    per_token = 2 * (4 * h + 2 * a * h) + a * (model.q_dim + 2 * model.kv_dim) + 2 * a * model.q_dim \
        + 4 * a * model.intermediate
    return per_token * tokens


def lora_activation_bytes(model: ModelShape, adapter: dict, tokens: int, act_bytes: int) -> int:
    """Bytes one decoder layer's LoRA branches save for backward (peft's lora.Linear: the input cast to the adapter's
    fp32, dropout, then lora_A under autocast): per target and token, the input of lora_A in the compute dtype (a
    bytes per input feature), the dropout mask (1 byte, when dropout > 0) and lora_A's output (a r)."""
    h, r = model.hidden, int(adapter["rank"])
    fan_in = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": model.q_dim, "gate_proj": h, "up_proj": h,
              "down_proj": model.intermediate}
    mask = 1 if adapter["dropout"] > 0 else 0
    return tokens * sum((act_bytes + mask) * fan_in[t] + act_bytes * r for t in adapter["target_modules"]
                        if t in fan_in)


def logits_bytes(model: ModelShape, tokens: int) -> int:
    """The loss's peak over the logits: the fp32 log-softmax saved by the cross entropy, the gradient arriving at
    it and the gradient it returns (3 x 4 bytes per token and vocabulary entry; in forward, bf16 logits + their
    fp32 copy + the log-softmax are 10 bytes). transformers' ForCausalLMLoss upcasts the logits to fp32."""
    return 12 * tokens * model.vocab


def _weights(model: ModelShape, t: TrainShape) -> dict[str, float]:
    """Per-process weight bytes: the (sharded) stored copy and the compute copies gathered or cast for use."""
    n, w = model.n_params, t.world_size if t.fsdp else 1
    if t.adapter:
        quant = t.adapter["kind"] == "qlora"  # 4-bit NF4 with double quantization: about 0.56 bytes a weight
        frozen = model.n_params - model.root_params
        base = frozen * (0.5 + 4 / 64) + model.root_params * t.param_bytes if quant else n * t.param_bytes
        lora = model.lora_params(t.adapter)
        return {"stored": (base + 4 * lora) / w, "compute": 0.0, "trainable": lora, "layer_gather": 0.0,
                "root_gather": 0.0}
    stored = (4 if t.master_fp32 else t.param_bytes) * n / w
    if t.cpu_offload and t.fsdp:
        stored = 0.0
    layer = model.layer_params * t.param_bytes
    if t.fsdp:  # (estimate_train_memory passes fsdp=False when the layout does not shard)
        root = model.root_params * t.param_bytes  # the root unit is not resharded after forward
        gathered = model.n_layers * layer if not t.reshard_after_forward else 2 * layer  # current + prefetched
        return {"stored": stored, "compute": root + gathered, "trainable": n, "layer_gather": layer,
                "root_gather": root}
    # one process or DDP: autocast's bf16 copies of the matmul weights are saved for backward
    cast = (n - model.vocab * model.hidden * (1 if model.tie_embeddings else 0)) * t.param_bytes \
        if t.param_bytes < 4 else 0
    return {"stored": stored, "compute": cast, "trainable": n, "layer_gather": 0.0, "root_gather": 0.0}


def estimate_train_memory(model: ModelShape, train: TrainShape) -> MemoryEstimate:
    """Peak per GPU/process of one training step of workflow_scripts/train.py (see the module docstring)."""
    t = train
    fsdp = t.fsdp and (t.world_size > 1 or t.force_fsdp)
    w = t.world_size if fsdp else 1
    wt = _weights(model, replace(t, fsdp=fsdp))
    trainable = wt["trainable"]
    tokens = t.seq_len * t.micro_batch
    offload = t.cpu_offload and fsdp
    grads = 0.0 if offload else 4 * trainable / w
    if t.no_sync_accumulation and fsdp and t.grad_accum > 1:
        grads += 4 * trainable  # the unsharded fp32 gradient kept between micro-batches
    if t.world_size > 1 and not fsdp:
        grads += 4 * trainable  # DDP's gradient buckets
    optimizer = 0.0 if offload else 8 * trainable / w
    layer_act = layer_activation_bytes(model, tokens, t.param_bytes)
    if t.adapter:
        layer_act += lora_activation_bytes(model, t.adapter, tokens, t.param_bytes)
    if t.activation_checkpointing:
        acts = model.n_layers * tokens * model.hidden * t.param_bytes + layer_act  # inputs + one recomputed layer
    else:
        acts = model.n_layers * layer_act
    static = {"weights": wt["stored"] + wt["compute"], "grads": grads, "optimizer": optimizer}
    lora = bool(t.adapter)
    layer_grad = 0.0 if lora else wt["layer_gather"] / t.param_bytes * (t.param_bytes + 4)  # bf16 grad + fp32 copy
    # the first micro-batch of a step starts without gradients (zero_grad(set_to_none=True) after each step)
    phases = {
        "loss backward": {**static, "grads": grads if t.grad_accum > 1 else 0.0, "activations": acts,
                          "logits": logits_bytes(model, tokens),
                          "other": tokens * model.hidden * 4 * 2},
        "layer backward": {**static, "activations": acts + layer_act, "logits": 0,
                           "other": layer_grad + tokens * model.hidden * 4 * 2},
        "root gradient reduction": {**static, "activations": 0, "logits": 0,
                                    "other": 0.0 if lora else wt["root_gather"] / t.param_bytes * (t.param_bytes + 4)},
        # foreach AdamW (FSDP2's DTensors) makes one temporary per state list; the fused step (one process) none
        "optimizer step": {**static, "weights": wt["stored"], "activations": 0, "logits": 0,
                           "other": 0.0 if offload or not fsdp else 4 * trainable / w},
    }
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    parts = {k: int(phases[phase].get(k, 0)) for k in PARTS}
    notes = [f"{trainable / 1e6:,.1f}M trainable parameters"] if lora else []
    return MemoryEstimate(parts=parts, phase=phase, notes=notes)


# ------------------------------------------------------------------------------------------------ inference
@dataclass
class VllmSettings:
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_model_len: int | None
    enforce_eager: bool = False
    dtype_bytes: int = 2
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256


def estimate_vllm_memory(model: ModelShape, gpu_bytes: float, s: VllmSettings) -> tuple[MemoryEstimate, int, int]:
    """vLLM on one GPU of a tensor-parallel group: (estimate, KV-cache tokens it holds, tokens one max_model_len
    sequence needs). vLLM takes gpu_memory_utilization x the GPU's memory: the weights / tp, the activations of its
    profiling run (max_num_batched_tokens through one layer, and the sampler's fp32 logits of max_num_seqs rows),
    the CUDA graphs (about 1 GiB unless enforce_eager), and the rest is KV cache, which must hold one whole
    max_model_len sequence or the engine refuses to start."""
    tp = max(1, s.tensor_parallel_size)
    weights = model.n_params * s.dtype_bytes / tp
    tok = s.max_num_batched_tokens
    acts = (tok * (4 * model.hidden + 3 * model.intermediate // tp) * s.dtype_bytes
            + s.max_num_seqs * model.vocab * 4 * 2)
    other = (0 if s.enforce_eager else GIB) + GIB // 2  # CUDA graphs; NCCL and non-torch allocations
    budget = s.gpu_memory_utilization * gpu_bytes
    kv = max(0.0, budget - weights - acts - other)
    per_token = model.kv_bytes_per_token(s.dtype_bytes) / tp
    need = int(s.max_model_len or model.max_position or 8192)
    parts = {"weights": int(weights), "activations": int(acts), "other": int(other), "kv_cache": int(kv)}
    return MemoryEstimate(parts=parts, phase="engine"), int(kv // per_token), need


def estimate_hf_inference(model: ModelShape, rows: int, context: int, scored: int,
                          dtype_bytes: int = 2) -> MemoryEstimate:
    """transformers on GPU (the log-likelihood scorer, generation with the transformers backend): bf16 weights,
    the KV cache of `rows` sequences of `context` tokens, one layer's transient activations of the rows being
    run, and fp32 logits (with log-softmax) at `scored` positions per row."""
    weights = model.n_params * dtype_bytes
    kv = rows * context * model.kv_bytes_per_token(dtype_bytes)
    acts = rows * context * (4 * model.hidden + 3 * model.intermediate) * dtype_bytes
    logits = rows * scored * model.vocab * 4 * 2
    return MemoryEstimate(parts={"weights": int(weights), "kv_cache": int(kv), "activations": int(acts),
                                 "logits": int(logits), "other": GIB // 2}, phase="forward")


# ------------------------------------------------------------------------------------------------ fixes
def fits(total_bytes: float, gpu_bytes: float, reserve_gib: float, fragmentation: float) -> bool:
    """A job fits when its estimate plus the allocator's fragmentation and a fixed reserve (CUDA context, NCCL
    buffers) is within the GPU's memory."""
    return total_bytes * (1 + fragmentation) + reserve_gib * GIB <= gpu_bytes


def train_fix(model: ModelShape, train: TrainShape, check, section: str = "cpt",  # type: ignore[no-untyped-def]
              resources: str = "cpt.resources.gpu") -> tuple[str | None, MemoryEstimate | None]:
    """The cheapest change that makes a training job fit (`check(estimate) -> bool`), as config keys of `section`,
    in this order: activation checkpointing, a smaller micro-batch, CPU offload (FSDP only), more GPUs (FSDP; the
    smallest count that fits, up to 64). (None, None) when nothing does."""
    t, tried = train, []
    if not t.activation_checkpointing:
        t = replace(t, activation_checkpointing=True)
        tried.append(f"{section}.gradient_checkpointing: true")
        if check(est := estimate_train_memory(model, t)):
            return ", ".join(tried), est
    for mb in range(t.micro_batch - 1, 0, -1):
        if check(est := estimate_train_memory(model, replace(t, micro_batch=mb))):
            return ", ".join(tried + [f"{section}.micro_batch: {mb}"]), est
    if t.micro_batch > 1:
        t = replace(t, micro_batch=1)
        tried.append(f"{section}.micro_batch: 1")
    if t.fsdp and (t.world_size > 1 or t.force_fsdp) and not t.cpu_offload:
        t = replace(t, cpu_offload=True)
        tried.append(f"{section}.fsdp.cpu_offload: true")
        if check(est := estimate_train_memory(model, t)):
            return ", ".join(tried), est
    base = replace(train, fsdp=True)
    for gpus in range(train.world_size + 1, 65):
        for shape in (base, replace(base, activation_checkpointing=True)):
            if check(est := estimate_train_memory(model, replace(shape, world_size=gpus))):
                extra = f", {section}.gradient_checkpointing: true" if shape.activation_checkpointing and \
                    not train.activation_checkpointing else ""
                fsdp = "" if train.fsdp else f", {section}.fsdp.enabled: true"
                return f"{resources}: {gpus}{fsdp}{extra}", est
    return None, None


# ------------------------------------------------------------------------------------------------ a config's jobs
@dataclass
class JobMemory:
    """One GPU job kind of a config: its estimated peak per GPU, whether it fits and the cheapest fix."""

    job: str
    engine: str
    model: str
    gpus: int
    estimate: MemoryEstimate | None
    gpu_bytes: float
    fits: bool | None  # None: the model's shape is unknown, not checked
    fix: str | None = None
    fixed_estimate: MemoryEstimate | None = None
    note: str = ""


def train_shape(tcfg: dict, gpus: int) -> TrainShape:
    """The TrainShape of a cpt section (or instruction tuning's merged one) run on `gpus` GPUs. The keys that helper
    branches add (cpt.fsdp.no_sync_accumulation) are read with their schema defaults when absent; cpt.adapter (its
    kind lora or qlora: workflow_scripts/lora.py) comes with the schema's defaults filled in."""
    world = max(1, gpus)
    fsdp_cfg = tcfg.get("fsdp") or {}
    adapter = tcfg.get("adapter") or {"kind": "none"}
    grad_accum = math.ceil(math.ceil(int(tcfg["global_batch"]) / world) / int(tcfg["micro_batch"]))
    return TrainShape(seq_len=int(tcfg["block_size"]), micro_batch=int(tcfg["micro_batch"]), world_size=world,
                      grad_accum=grad_accum, param_bytes=2 if tcfg.get("precision", "auto") != "fp32" else 4,
                      fsdp=bool(fsdp_cfg.get("enabled", True)),
                      reshard_after_forward=bool(fsdp_cfg.get("reshard_after_forward", True)),
                      cpu_offload=bool(fsdp_cfg.get("cpu_offload", False)),
                      activation_checkpointing=bool(tcfg.get("gradient_checkpointing", False)),
                      no_sync_accumulation=bool(fsdp_cfg.get("no_sync_accumulation", False)),
                      adapter=adapter if adapter["kind"] in ("lora", "qlora") else None)


class _Ctx:
    """What every job's estimate needs from the config: the GPU, the fit rule, model shapes."""

    def __init__(self, cfg: dict, root: Path | None) -> None:
        p = cfg["planner"]
        try:
            gib, self.gpu_src = gpu_memory_gib(p["gpu_type"], p.get("gpu_memory_gib"))
        except ValueError as e:  # raised when a GPU job needs it (a CPU-only config never asks)
            gib, self.gpu_src, self.error = float("nan"), str(e), e
        else:
            self.error = None
        self.gpu_bytes = gib * GIB
        self.reserve, self.frag = float(p.get("memory_reserve_gib", 1.5)), float(p.get("memory_fragmentation", 0.05))
        self.cfg, self.root = cfg, root
        self.sources: dict[str, str] = {}

    def check(self, est: MemoryEstimate) -> bool:
        if self.error is not None:
            raise self.error
        return fits(est.total_bytes, self.gpu_bytes, self.reserve, self.frag)

    def shape(self, location: str) -> ModelShape | None:
        if self.error is not None:
            raise self.error
        shape, src = model_shape(location, self.root)
        self.sources[location] = src
        return shape


def _train_job(ctx: _Ctx, job: str, tcfg: dict, gpus: int, location: str, keys: tuple[str, str]) -> JobMemory:
    shape = ctx.shape(location)
    if shape is None:
        return JobMemory(job, "train", location, gpus, None, ctx.gpu_bytes, None, note=ctx.sources[location])
    t = train_shape(tcfg, gpus)
    est = estimate_train_memory(shape, t)
    out = JobMemory(job, "train", location, gpus, est, ctx.gpu_bytes, ctx.check(est),
                    note=f"micro-batch {t.micro_batch} x {t.seq_len} tokens, {t.grad_accum} micro-batches per step, "
                         f"{'FSDP' if t.fsdp and t.world_size > 1 else 'one process'}" + "".join(
                             f"; {n}" for n in est.notes))
    if not out.fits:
        out.fix, out.fixed_estimate = train_fix(shape, t, ctx.check, *keys)
    return out


def _vllm_job(ctx: _Ctx, job: str, location: str, gpus: int, needed: int) -> JobMemory:
    """A vLLM job: it fits when the KV cache holds one max_model_len sequence (and `needed` tokens, the job's
    longest request); the fixes: a shorter max_model_len, a higher gpu_memory_utilization, tensor parallelism."""
    shape = ctx.shape(location)
    if shape is None:
        return JobMemory(job, "vllm", location, gpus, None, ctx.gpu_bytes, None, note=ctx.sources[location])
    v = ctx.cfg["backends"]["vllm"]
    s = VllmSettings(float(v["gpu_memory_utilization"]), int(v["tensor_parallel_size"]), v["max_model_len"],
                     bool(v.get("enforce_eager", False)))
    est, holds, need = estimate_vllm_memory(shape, ctx.gpu_bytes, s)
    ok = holds >= need and est.total_bytes + ctx.reserve * GIB / 2 <= ctx.gpu_bytes
    out = JobMemory(job, "vllm", location, max(gpus, s.tensor_parallel_size), est, ctx.gpu_bytes, ok,
                    note=f"KV cache holds {holds:,} tokens; max_model_len {need:,}")
    if not ok:
        if holds >= needed:
            out.fix = f"backends.vllm.max_model_len: {holds // 256 * 256}"
        elif estimate_vllm_memory(shape, ctx.gpu_bytes, replace(s, gpu_memory_utilization=0.95))[1] >= need:
            out.fix = "backends.vllm.gpu_memory_utilization: 0.95"
        else:
            for tp in (2, 4, 8):
                if estimate_vllm_memory(shape, ctx.gpu_bytes, replace(s, tensor_parallel_size=tp))[1] >= need:
                    out.fix = f"backends.vllm.tensor_parallel_size: {tp} (and {tp} GPUs per job)"
                    break
    return out


def _hf_job(ctx: _Ctx, job: str, location: str, gpus: int, rows: int, context: int, scored: int,
            engine: str = "transformers") -> JobMemory:
    shape = ctx.shape(location)
    if shape is None:
        return JobMemory(job, engine, location, gpus, None, ctx.gpu_bytes, None, note=ctx.sources[location])
    est = estimate_hf_inference(shape, rows, context, scored)
    out = JobMemory(job, engine, location, gpus, est, ctx.gpu_bytes, ctx.check(est),
                    note=f"{rows} row(s) x {context:,} tokens")
    if not out.fits:
        out.fix = "a smaller backends.transformers.batch_size, or the vllm engine"
    return out


def _generation_job(ctx: _Ctx, job: str, engine: str, location: str, gpus: int, prompt: float,
                    new: float) -> JobMemory | None:
    """A generating job on a local engine (vLLM or transformers); None for an API engine (no GPU)."""
    if engine == "vllm":
        return _vllm_job(ctx, job, location, gpus, int(prompt + new))
    if engine == "transformers":
        rows = int(ctx.cfg["backends"]["transformers"]["batch_size"])
        return _hf_job(ctx, job, location, gpus, rows, int(prompt + new), 1)
    return None


def _eval_jobs(ctx: _Ctx, label: str, location: str, gpus: int, extra_prompt: float, modes: list[str]) -> list:
    """QA jobs (closed-book, or RAG with `extra_prompt` retrieved tokens): loglik with the scorer, cot on its engine.
    A job with both modes scores first and frees the scorer, then starts the engine: its peak is the larger."""
    cfg, a = ctx.cfg, ctx.cfg["planner"]["assume"]
    ev = cfg["evaluation"]
    prefix, question = float(a["qa_fewshot_tokens"]), float(a["qa_question_tokens"]) + extra_prompt
    jobs = []
    if "loglik" in modes:
        bq = int(ev["loglik"]["batch_questions"])
        option = 32  # tokens of one option continuation (QuALITY options are a sentence)
        jobs.append(_hf_job(ctx, f"{label} loglik", location, gpus, 1, int(prefix + bq * (question + 4 * option)),
                            bq * 4 * option))
    if "cot" in modes:
        j = _generation_job(ctx, f"{label} cot", ev["cot"]["engine"], location, gpus, prefix + question,
                            float(ev["cot"]["max_new_tokens"]))
        jobs.append(j)
    return [j for j in jobs if j is not None]


def plan_memory(cfg: dict, root: Path | None = None) -> list[JobMemory]:
    """Every GPU job kind of a validated config (jobs with resources.gpu > 0 and a local engine), one line per kind:
    the CPT runs (one shape for every budget), instruction tuning, synthesis, closed-book QA, RAG, summaries and
    the judge when local."""
    from .instruct import train_section
    from .layout import cpt_models, instruct_models, model_location, rag_models, synth_methods
    from .preflight import judge_gpus

    ctx = _Ctx(cfg, root)
    a = cfg["planner"]["assume"]
    base, gen = model_location(cfg["models"]["base"]), model_location(cfg["models"]["generator"])
    jobs: list[JobMemory | None] = []
    syn = cfg["synthesis"]
    if synth_methods(cfg) and int(syn["resources"]["gpu"]) > 0:
        prompt = float(a["tokens_per_article"]) + float(a["system_prompt_tokens"])
        new = max(int(syn["sampling"]["max_new_tokens"]), int(syn.get("entigraph", {}).get("max_new_tokens") or 0))
        jobs.append(_generation_job(ctx, "synthesis", syn["backend"], gen, int(syn["resources"]["gpu"]), prompt, new))
    gpus = int(cfg["cpt"]["resources"]["gpu"])
    if gpus > 0:
        jobs.append(_train_job(ctx, f"cpt ({len(cpt_models(cfg))} runs)", cfg["cpt"], gpus, base,
                               ("cpt", "cpt.resources.gpu")))
    ins = cfg["instruct"]
    if ins["enabled"] and int(ins["resources"]["gpu"]) > 0:
        # unvalidated: the cpt section is already complete
        jobs.append(_train_job(ctx, "instruct tuning", train_section(cfg), int(ins["resources"]["gpu"]),
                               base, ("instruct.train", "instruct.resources.gpu")))
    ev = cfg["evaluation"]
    if int(ev["resources"]["gpu"]) > 0:
        jobs += _eval_jobs(ctx, "QA", base, int(ev["resources"]["gpu"]), 0.0, list(ev["modes"]))
        rag = ev["rag"]
        if rag["enabled"] and rag_models(cfg):
            top_k = max([int(rag["top_k"])] + [int(v.get("top_k") or 0) for v in (rag.get("per_model") or {}).values()])
            chunks = top_k * float(rag["chunk_size"]) / float(a["chars_per_token"])
            jobs += _eval_jobs(ctx, "RAG", base, int(ev["resources"]["gpu"]), chunks, list(rag["modes"] or ev["modes"]))
    sres = int(ins["summaries"]["resources"]["gpu"])
    if ins["enabled"] and sres > 0 and instruct_models(cfg):
        new = float(max(ins["summaries"]["max_new_tokens"].values()))
        jobs.append(_generation_job(ctx, "summaries", ins["summaries"]["engine"], base, sres, 512.0, new))
        judge = ins["judge"]
        if judge_gpus(cfg):  # a local engine (an API judge asks for no GPU)
            loc = model_location(judge["model"]) if judge.get("model") else gen
            jobs.append(_generation_job(ctx, "judge", judge["engine"], loc, sres,
                                        float(a["tokens_per_article"]) + new, float(judge["split_max_new_tokens"])))
    return [j for j in jobs if j is not None]


def memory_problems(cfg: dict, root: Path | None = None) -> list[str]:
    """One line per GPU job kind that does not fit planner.gpu_type (empty when all fit, or when
    planner.memory_check is false): the job, its estimate, and the cheapest fix."""
    if not cfg["planner"].get("memory_check", True):
        return []
    out = []
    try:
        jobs = plan_memory(cfg, root)
    except ValueError as e:
        return [str(e)]
    for j in jobs:
        if j.fits is False:
            fix = f"fix: {j.fix}" if j.fix else "no single setting fixes it"
            out.append(f"{j.job} ({j.engine}, {j.model}) needs about {j.estimate.gib():.1f} GiB per GPU, more than "
                       f"the {j.gpu_bytes / GIB:.1f} GiB of planner.gpu_type {cfg['planner']['gpu_type']!r}; {fix} "
                       "(or planner.memory_check: false to run anyway)")
    return out
