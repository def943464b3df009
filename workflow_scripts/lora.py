"""LoRA and QLoRA continued pretraining (cpt.adapter; docs/cpt.md "LoRA CPT"), with the peft library.

train.py runs the same loop for every run; with `cpt.adapter.kind` lora or qlora it calls this module three times:
- `resolve`: the run's cpt settings (the adapter's own peak LR, cpt.adapter.lr, replaces cpt.lr);
- `prepare`: the base model with LoRA matrices (rank r, scaling alpha / r) on the target linear layers; only they
  train, plus trained copies of the embeddings and the head when asked. The frozen base is kept in the compute
  dtype (bf16 on a GPU: 2 bytes a parameter, as workflow_scripts/memory.py plans), or in 4 bits (qlora);
- `save`: the adapter alone in OUTPUT/adapter/ (peft's adapter_config.json + adapter_model.safetensors), and the
  merged full weights, W + (alpha / r) B A, returned for train.py to save like any CPT model: evaluation reads
  the same files whatever trained them.

Checkpoints hold the trainable parameters and their optimizer state only (train.py saves with
`ignore_frozen_params`, which changes nothing for full CPT, where no parameter is frozen); the resume fingerprint
covers cpt.adapter like every other shaping cpt key (workflow_scripts/job_keys.py).

QLoRA (Dettmers et al., 2023, arXiv 2305.14314: a 4-bit NF4 base with double quantization, bf16 compute) needs
bitsandbytes' CUDA kernels. It is offered but untested here (no GPU in this project's CI); on a machine without
CUDA it stops before any work. Its merged weights add the adapter to the unquantized base read again from disk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .io_utils import InputError

KINDS = ("lora", "qlora")
ADAPTER_NAME = "default"  # peft's name of a model's one adapter (the lora_A.default.weight keys)
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's prefix of the wrapped model's keys
EMBEDDINGS, HEAD = "embed_tokens", "lm_head"  # Llama/Qwen2/SmolLM2 module names


def enabled(cpt: dict) -> bool:
    """Whether this run trains an adapter (cpt.adapter.kind is lora or qlora)."""
    return (cpt.get("adapter") or {}).get("kind", "none") in KINDS


def resolve(cfg: dict) -> dict:
    """The config the run trains with: with an adapter whose lr is set, cpt.lr is that LR (LoRA wants a peak LR
    one or two orders above full CPT's). The input is not modified."""
    adapter = cfg["cpt"].get("adapter") or {}
    if not enabled(cfg["cpt"]) or adapter.get("lr") is None:
        return cfg
    out = {**cfg, "cpt": copy.deepcopy(cfg["cpt"])}
    out["cpt"]["lr"] = adapter["lr"]
    return out


def check(cpt: dict) -> None:
    """Refuse, in one line and before any work, what cannot run here: QLoRA without CUDA or bitsandbytes."""
    import torch

    if not enabled(cpt) or cpt["adapter"]["kind"] != "qlora":
        return
    if not torch.cuda.is_available():
        raise InputError("cpt.adapter.kind is qlora, whose 4-bit base needs bitsandbytes' CUDA kernels, and this "
                         "machine has no CUDA device: use cpt.adapter.kind: lora on a CPU (QLoRA is untested here)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("cpt.adapter.kind is qlora but bitsandbytes is not installed: pip install bitsandbytes "
                         "into the training environment (QLoRA is untested here), or use cpt.adapter.kind: lora") \
            from None


def lora_config(adapter: dict, tied: bool):  # type: ignore[no-untyped-def]
    """peft's LoraConfig of cpt.adapter. Trained embeddings or head are peft's modules_to_save (a trained copy of
    the module); with tied embeddings the two are one matrix, so asking for either trains both, kept tied."""
    from peft import LoraConfig

    save = [m for m, on in ((EMBEDDINGS, adapter["train_embeddings"]), (HEAD, adapter["train_head"])) if on]
    if tied and save:
        save = [EMBEDDINGS, HEAD]
    return LoraConfig(r=adapter["rank"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
                      target_modules=list(adapter["target_modules"]), modules_to_save=save or None,
                      ensure_weight_tying=bool(save) and tied, bias="none", task_type="CAUSAL_LM")


def load_quantized(location: str, device):  # type: ignore[no-untyped-def]
    """The base model in 4-bit NF4 with double quantization and bf16 compute (QLoRA's recipe), on `device`."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(location, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # train.py's own setting


def load_model(location: str, cpt: dict, precision: str, device):  # type: ignore[no-untyped-def]
    """The base model of `location` with the adapter of cpt.adapter (qlora: loaded in 4 bits on `device`)."""
    from .models import load_base_model

    base = load_quantized(location, device) if cpt["adapter"]["kind"] == "qlora" else load_base_model(location)
    return prepare(base, cpt, precision)


def prepare(model, cpt: dict, precision: str):  # type: ignore[no-untyped-def]
    """The base `model` (fp32 as loaded, or 4-bit) wrapped with the adapter of cpt.adapter: only the LoRA matrices
    (fp32) and any trained embeddings/head copies require gradients; with bf16 compute the frozen weights are
    cast to bf16. A target module that is not a linear layer is an error naming it."""
    import torch
    from peft import get_peft_model

    adapter = cpt["adapter"]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in adapter["target_modules"] if t not in linear]
    if missing:
        raise InputError(f"cpt.adapter.target_modules: {', '.join(missing)} is not a linear layer of "
                         f"{type(model).__name__} (its linear layers: {', '.join(sorted(linear))}); the embeddings "
                         "and the head are trained with cpt.adapter.train_embeddings / train_head")
    peft_model = get_peft_model(model, lora_config(adapter, tied))
    if precision == "bf16":
        for p in peft_model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    for p in peft_model.parameters():  # the trained parameters stay fp32 (the optimizer's master copy)
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def trainable_parameters(model) -> int:  # type: ignore[no-untyped-def]
    """Parameters the run trains (a shared tensor counted once), for the train summary."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# ------------------------------------------------------------------------------------------------ merging
def merge_state_dict(state_dict: dict, scaling: float, base: dict | None = None) -> dict:
    """The merged model's weights under the plain (Hugging Face) keys, from a PeftModelForCausalLM state dict:
    each LoRA layer's W + scaling x (B @ A) (computed in fp32), each trained copy in place of its original module.
    `base` (plain keys) replaces the frozen weights: QLoRA merges into the unquantized base, not the 4-bit one.
    Pure: the tensors in, new tensors out."""
    frozen, trained, lora_a, lora_b = {}, {}, {}, {}
    for key, value in state_dict.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if f".lora_A.{ADAPTER_NAME}." in k:
            lora_a[k.split(".lora_A.")[0]] = value
        elif f".lora_B.{ADAPTER_NAME}." in k:
            lora_b[k.split(".lora_B.")[0]] = value
        elif f".modules_to_save.{ADAPTER_NAME}." in k:
            trained[k.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")] = value
        elif ".original_module." not in k:
            frozen[k.replace(".base_layer.", ".")] = value
    if set(lora_a) != set(lora_b):
        raise ValueError(f"LoRA layers without both matrices: {sorted(set(lora_a) ^ set(lora_b))}")
    out = {**(frozen if base is None else base), **trained}
    for module, a in lora_a.items():
        w = out[f"{module}.weight"]
        out[f"{module}.weight"] = w.float() + scaling * (lora_b[module].float() @ a.float())
    return out


def save(peft_model, state_dict: dict, cpt: dict, adapter_dir: Path, base_location: str):  # type: ignore[no-untyped-def]
    """Write the adapter alone to `adapter_dir` and return (the plain model to save, its merged state dict, the
    adapter's entry of the train summary). `state_dict` is the PeftModel's full state dict (gathered on the main
    process under FSDP)."""
    adapter = cpt["adapter"]
    info = {**adapter, "trainable_parameters": trainable_parameters(peft_model)}
    peft_model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
    base = None
    if adapter["kind"] == "qlora":  # merge into the unquantized base, as the 4-bit weights are only an approximation
        from .models import load_base_model

        base = load_base_model(base_location).state_dict()
    merged = merge_state_dict(state_dict, adapter["alpha"] / adapter["rank"], base)
    return peft_model.unload(), merged, info  # the model without the LoRA layers: its structure and config
