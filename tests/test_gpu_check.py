"""The one-shot GPU check (scripts/gpu_check.sh, workflow_scripts/gpu_check.py) in its CPU dry-run mode: the same
steps as on the GPU (the project's training loop against a bare PyTorch loop on the same batches, the
log-likelihood evaluation path on the saved model, then FSDP2 forced on at world size 1 under torchrun with a
distributed-checkpoint save and resume, and the peak memory against workflow_scripts.memory's estimate) with a tiny
model in fp32 over gloo instead of bf16 over NCCL."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.engine
def test_gpu_check_dry_run_runs_the_training_loop_the_eval_path_and_fsdp(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--steps", "4",
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train, project loop" in r.stdout and "ratio project / bare" in r.stdout and "eval loglik" in r.stdout
    assert "FSDP2 (" in r.stdout and "DCP save/resume" in r.stdout and "EQUAL" in r.stdout
    res = json.loads(out.read_text())
    assert res["run"]["steps"] == 4 and res["project_loop"]["steps"] == 4
    # both loops start from the same weights on the same first batch: the same first loss
    assert res["first_loss_diff"] < 1e-5
    assert res["project_loop"]["tokens_per_s"] > 0 and res["bare_loop"]["tokens_per_s"] > 0
    assert res["ratio_project_to_bare"] > 0 and res["project_loop"]["mfu"] is None  # no peak FLOP/s for a CPU
    ev = res["eval"]
    assert ev["all_finite"] and ev["items"] == 4 and ev["tokens_per_s"] > 0
    assert ev["max_abs_diff_vs_uncached"] < 1e-3  # the cached, batched scorer equals the plain forward pass (fp32)
    assert math.isclose(res["flops_per_token"], 6 * res["params"] + 12 * 2 * 64 * 32)

    f = res["fsdp"]
    assert f["ok"], f.get("error")
    # FSDP2 really wrapped the model in its own process group at world size 1: sharded DTensor parameters
    assert f["backend"] == "gloo" and f["world_size"] == 1
    assert f["wrapper"].startswith("FSDP") and f["param_type"] == "DTensor" and f["compute_dtype"] == "float32"
    assert f["steps"] == 4 and len(f["losses"]) == 4 and all(math.isfinite(x) for x in f["losses"])
    # under FSDP the same run (same weights, same batches) as the project loop without it
    assert abs(f["losses"][0] - res["project_loop"]["first_loss"]) < 1e-4
    rs = f["resume"]
    assert rs["stopped_at"] == 2 and rs["checkpoint"] == "step_00000002"
    assert {"trainer_state.json", "rng_0.pt", ".metadata"} <= set(rs["files"])  # DCP's files and the trainer state
    assert len(rs["losses"]) == 4 and rs["losses"][:2] == f["losses"][:2]
    # resumed into a model of other initial weights: only a complete restore gives the same next-step loss
    assert rs["equal"] and rs["next_step_loss_diff"] <= 1e-5 and rs["final_loss_diff"] < 1e-5
    mem = f["memory"]
    assert mem["measured_bytes"] > 0 and mem["tolerance"] == 0.25
    assert mem["estimate_bytes"] > 0 and mem["ratio"] > 0
    assert mem["within_tolerance"] is None  # a CPU's RSS holds the Python runtime: reported, not judged


@pytest.mark.unit
def test_memory_estimate_is_the_planners_for_this_run():
    """The check sets its measured peak against the planner's own estimate (workflow_scripts/memory.py) of the same
    shape: FSDP2 forced on at world size 1, bf16 with fp32 masters, the run's accumulation."""
    from workflow_scripts import gpu_check as G
    from workflow_scripts.memory import ModelShape, TrainShape, estimate_train_memory

    spec = G.RUNS["gpu"]
    cpt = G.check_cpt(True, dict(spec))
    config = dict(G.SHAPES["1b"])  # build_config's transformers dict reads the same: the engine test below
    est = G.memory_estimate(config, spec, cpt, bf16=True)
    shape = ModelShape.from_hf_config(config)
    assert (shape.n_layers, shape.hidden, shape.vocab) == (16, 2048, 128256)
    want = estimate_train_memory(shape, TrainShape(
        seq_len=2048, micro_batch=4, world_size=1, grad_accum=4, param_bytes=2, master_fp32=True, fsdp=True,
        reshard_after_forward=bool(cpt["fsdp"]["reshard_after_forward"]),
        activation_checkpointing=bool(cpt["gradient_checkpointing"]), force_fsdp=True))
    assert est["estimate_bytes"] == want.total_bytes > 0
    assert set(est["parts"]) >= {"weights", "grads", "optimizer", "activations", "logits"}
    # fp32 masters, grads and two AdamW states of ~1.24B parameters: at least 16 bytes a parameter
    assert est["estimate_bytes"] > 16 * shape.n_params


@pytest.mark.engine
def test_the_check_models_config_has_the_shape_tables_shape():
    """build_config goes through transformers' LlamaConfig (which imports torch, hence this tier): the shape and the
    planner's estimate it gives are those of the SHAPES table the unit test above uses."""
    from workflow_scripts import gpu_check as G
    from workflow_scripts.memory import ModelShape

    spec = G.RUNS["gpu"]
    cpt = G.check_cpt(True, dict(spec))
    for name, table in G.SHAPES.items():
        config = G.build_config(name)
        shape = ModelShape.from_hf_config(config)
        assert shape.head_dim in (None, shape.hidden // shape.n_heads), name  # transformers fills in the default
        assert dataclasses.replace(shape, head_dim=None) == ModelShape.from_hf_config(dict(table)), name
        assert G.memory_estimate(config, spec, cpt, bf16=True) == G.memory_estimate(dict(table), spec, cpt, True)


@pytest.mark.engine
def test_gpu_check_without_a_gpu_says_why_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 1 and line.startswith("gpu_check: ") and "no CUDA device" not in line
    assert line.endswith("; run on the GPU machine, or use --dry-run for the CPU mode")
    if torch.version.cuda is None:  # this machine's torch: the pre-flight check's reason, not a vague one
        assert "is a CPU build" in line


@pytest.mark.unit
@pytest.mark.parametrize("name,variant,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4), ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5), ("NVIDIA H200", "H200 SXM", 989.4), ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A100 80GB PCIe", "A100", 312.0), ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L4", "L4", 121.0), ("NVIDIA GH200 480GB", "H100 SXM", 989.4), ("NVIDIA H100 80GB SXM", "H100 SXM", 989.4),
])
def test_mfu_peak_per_gpu_variant(name, variant, tflops):
    from workflow_scripts.gpu_specs import peak_bf16

    got = peak_bf16(name)
    assert got is not None and got[0] == variant and math.isclose(got[1], tflops * 1e12)
    assert peak_bf16("NVIDIA L40") is None and peak_bf16("Quadro RTX 8000") is None
