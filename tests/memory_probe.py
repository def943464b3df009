"""Measure the peak memory of this project's real CPU training step (workflow_scripts.train: set_up, train_step) in a
fresh process, for tests/test_memory_validation.py.

    python tests/memory_probe.py MODEL_DIR SEQ MICRO_BATCH GLOBAL_BATCH STEPS [CHECKPOINTING]
    python tests/memory_probe.py fake WORLD LAYERS MICRO_BATCH CHECKPOINTING [NO_SYNC]    # torch's FSDPMemTracker

Prints one JSON line: the process's resident set (VmRSS) before the model loads, and its high-water mark (VmHWM)
over the training steps. The weights are copied into resident memory after loading (transformers may map the
safetensors file, whose pages become resident only when first read), then the high-water mark is reset (writing 5
to /proc/self/clear_refs), so the loader's transient copies do not count: peak - loaded is what the training steps
add to the resident weights. Run it with
MALLOC_MMAP_THRESHOLD_ set low, so that freed tensors go back to the OS at once and the high-water mark follows the
live tensors rather than glibc's heap.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace


def status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    model_dir, seq, mb, gb, steps = sys.argv[1], *(int(x) for x in sys.argv[2:6])
    checkpointing = len(sys.argv) > 6 and sys.argv[6] == "1"
    import numpy as np
    import torch

    from workflow_scripts.train import Blocks, set_up, train_step

    torch.set_num_threads(1)
    cpt = {"precision": "fp32", "gradient_checkpointing": checkpointing, "threads": 1, "lr": 1e-4,
           "weight_decay": 0.01, "betas": [0.9, 0.999], "adam_eps": 1e-8,
           "fsdp": {"enabled": True, "reshard_after_forward": True, "cpu_offload": False}}
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(gb * steps, seq)).astype(np.int32)
    baseline = status("VmRSS")
    rt, model, optimizer = set_up(cpt, 0, model_dir)
    with torch.no_grad():  # weights may be pages of the mapped safetensors file: make them resident copies now
        for p in model.parameters():
            p.data = p.data.clone()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the loader's transient copies do not count
    loaded = status("VmRSS")
    run = SimpleNamespace(micro_batch=mb, blocks=Blocks(data, None, 0))
    losses = []
    for step in range(steps):
        loss, _ = train_step(rt, model, optimizer, run, np.arange(step * gb, (step + 1) * gb), 1.0)
        losses.append(loss)
    print(json.dumps({"baseline": baseline, "loaded": loaded, "peak": status("VmHWM"), "losses": losses,
                      "n_params": sum(p.numel() for p in model.parameters())}))


def fake_main() -> None:
    """torch's own FSDP2 memory tracking (torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker) of this
    project's FSDP2 wrapping (train.Runtime.wrap, bf16 MixedPrecisionPolicy) and optimizer, on fake tensors: a Llama
    3 8B shape (full vocabulary and width, LAYERS decoder layers) over WORLD ranks of a fake process group, 2048
    tokens per sequence. Two steps; prints the peak of the second step's forward and backward (states exist); with
NO_SYNC the second step has two micro-batches and the first skips the gradient reduce-scatter."""
    import os

    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_init as fsdp_init
    import torch.distributed.fsdp._fully_shard._fully_shard as fsdp_api
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from workflow_scripts.train import Runtime, configure_optimizer

    world, layers, mb, ckpt = (int(x) for x in sys.argv[2:6])
    no_sync = len(sys.argv) > 6 and sys.argv[6] == "1"  # second step: two micro-batches, the first without sync
    os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # made outside fake mode (its rank list is data)
    fsdp_api._init_default_mesh = fsdp_init._init_default_mesh = lambda *a, **k: mesh
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    cpt = {"precision": "bf16", "gradient_checkpointing": bool(ckpt),
           "fsdp": {"enabled": True, "reshard_after_forward": True, "cpu_offload": False}}
    with FakeTensorMode():
        model = LlamaForCausalLM(cfg)
        model.to = lambda *a, **k: model  # already on the (fake) CPU device; a fake tensor cannot be moved in place
        rt = Runtime(cpt)
        rt.precision = "bf16"  # as on a GPU
        model = rt.wrap(model)
        optimizer = configure_optimizer(model, 1e-5, 0.01, (0.9, 0.999), 1e-8, fused=False)
        x = torch.randint(0, cfg.vocab_size, (mb, 2048))
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((x,))
        with tracker:
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()
            tracker._peak_mem, tracker._peak_mem_snap = {}, {}  # the second step's peak only
            if no_sync:  # as train.Runtime.no_sync with cpt.fsdp.no_sync_accumulation: true
                model.set_requires_gradient_sync(False)
                model(input_ids=x, labels=x).loss.backward()
                model.set_requires_gradient_sync(True)
                tracker.reset_mod_stats()  # per-module stats only; the peak spans both micro-batches
            model(input_ids=x, labels=x).loss.backward()
            peak = list(tracker.get_tracker_snapshot("peak").values())[0]
    print(json.dumps({str(getattr(k, "value", k)): int(v) for k, v in peak.items()}))


if __name__ == "__main__":
    fake_main() if sys.argv[1] == "fake" else main()
