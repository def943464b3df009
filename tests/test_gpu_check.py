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
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


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
    try:
        import workflow_scripts.memory  # noqa: F401 - helper i18-mem's module (issue 18 item 3)
    except ImportError:
        assert mem["available"] is False and "workflow_scripts.memory" in mem["reason"]
    else:
        assert mem["available"] and mem["estimate_bytes"] > 0 and mem["ratio"] > 0
        assert mem["within_tolerance"] is None  # a CPU's RSS holds the Python runtime: reported, not judged


def test_memory_estimate_is_called_with_the_agreed_interface(monkeypatch):
    """workflow_scripts.memory (interface in /work/notes/api.md) stood in by dataclasses of exactly the agreed fields:
    the check's call must construct them by those names and read total_bytes and parts."""
    from workflow_scripts import gpu_check as G

    @dataclasses.dataclass
    class ModelShape:
        n_layers: int
        hidden: int
        intermediate: int
        n_heads: int
        n_kv_heads: int
        vocab: int
        tie_embeddings: bool

        @classmethod
        def from_hf_config(cls, d: dict) -> "ModelShape":
            return cls(d["num_hidden_layers"], d["hidden_size"], d["intermediate_size"], d["num_attention_heads"],
                       d["num_key_value_heads"], d["vocab_size"], d["tie_word_embeddings"])

    @dataclasses.dataclass
    class TrainShape:
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

    seen = {}

    def estimate_train_memory(model, train):
        seen.update(model=model, train=train)
        return types.SimpleNamespace(parts={"weights": 1, "grads": 2}, total_bytes=3)

    fake = types.ModuleType("workflow_scripts.memory")
    fake.ModelShape, fake.TrainShape, fake.estimate_train_memory = ModelShape, TrainShape, estimate_train_memory
    monkeypatch.setitem(sys.modules, "workflow_scripts.memory", fake)
    spec = G.RUNS["gpu"]
    cpt = G.check_cpt(True, dict(spec))
    est = G.memory_estimate(G.build_config("1b"), spec, cpt, bf16=True)
    assert est == {"available": True, "estimate_bytes": 3, "parts": {"weights": 1, "grads": 2}}
    assert seen["model"] == ModelShape(16, 2048, 8192, 32, 8, 128256, True)
    t = seen["train"]
    assert (t.seq_len, t.micro_batch, t.world_size, t.grad_accum) == (2048, 4, 1, 4)
    assert t.param_bytes == 2 and t.master_fp32 and t.fsdp and not t.cpu_offload


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
