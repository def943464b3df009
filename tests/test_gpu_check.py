"""The one-shot GPU check (scripts/gpu_check.sh, workflow_scripts/gpu_check.py) in its CPU dry-run mode: the same
steps as on the GPU (the project's training loop against a bare PyTorch loop on the same batches, then the
log-likelihood evaluation path on the saved model) with a tiny model in fp32."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_the_training_loop_and_the_eval_path(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--steps", "4",
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train, project loop" in r.stdout and "ratio project / bare" in r.stdout and "eval loglik" in r.stdout
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


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; run on the GPU machine, or use --dry-run for the CPU mode"]
