"""The memory estimate (workflow_scripts/memory.py) against measurements:

- measured peaks of this project's real training step on CPU (workflow_scripts.train: set_up, train_step; fp32, one
  process) for the tiny model and the 135M offline model, in a fresh process (tests/memory_probe.py). The
  measurement is the resident set's high-water mark (/proc/self/status VmHWM, reset after the model is loaded and its
  weights made resident), minus the resident set before the first step: what the step adds to the resident weights
  (gradients, AdamW states, activations, logits). glibc is told to map every allocation above 64 KiB on its own
  (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once. torch's CPU allocator keeps no peak
  statistics; RSS is a real measurement of the same process, including what the estimate leaves out.
- torch's own FSDP2 memory tracking (FSDPMemTracker) on fake tensors of a Llama 3 8B shape over 8 ranks of a fake
  process group, through this project's FSDP2 wrapping and optimizer: the peak of a step's forward and backward.

Tolerance: the estimate is within 15% of each measurement (STATED here; docs/cluster.md "Memory" quotes it).
Marked e2e: the 135M steps take about a minute of CPU, the 8B fake-tensor runs about 15 s each; the snakemake test
runs the workflow's onstart check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from workflow_scripts import memory as M

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "memory_probe.py"
TOLERANCE = 0.15


def probe(*args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.engine
@pytest.mark.parametrize("which,seq,mb,gb", [("tiny", 512, 2, 4), ("smollm", 512, 1, 2)])
def test_cpu_training_step_peak_matches_the_estimate(which, seq, mb, gb, tiny_model_dir, smollm_dir):
    folder = tiny_model_dir if which == "tiny" else smollm_dir
    shape = M.ModelShape.from_hf_config(json.loads((folder / "config.json").read_text()))
    got = probe(str(folder), str(seq), str(mb), str(gb), "2")
    assert got["n_params"] == shape.n_params
    # two micro-batches per step, two steps: the second step runs with the gradients and AdamW states allocated
    est = M.estimate_train_memory(shape, M.TrainShape(seq, mb, 1, gb // mb, param_bytes=4, fsdp=False))
    added = got["peak"] - got["loaded"]
    expected = est.total_bytes - est.parts["weights"]  # the weights were resident before the steps
    print(f"{which}: measured {added / 2**20:,.0f} MiB, estimated {expected / 2**20:,.0f} MiB "
          f"({expected / added - 1:+.1%}); parts {est.parts}")
    assert abs(expected / added - 1) <= TOLERANCE


@pytest.mark.engine
@pytest.mark.parametrize("checkpointing,no_sync", [(0, 0), (1, 0), (0, 1)])
def test_fsdp2_estimate_matches_torch_fsdp_mem_tracker_at_an_8b_shape(checkpointing, no_sync):
    """Four Llama 3 8B decoder layers with the full 128K vocabulary (the embeddings, head and logits of the real
    model: the root unit and the loss are the same as at 32 layers), 8 ranks, micro-batch 2 x 2048 tokens. With
    no_sync the measured step has two micro-batches, the first without the gradient reduce-scatter (train.py's
    cpt.fsdp.no_sync_accumulation: true): every rank then holds the unsharded fp32 gradient, 4 bytes per parameter."""
    try:
        got = probe("fake", "8", "4", "2", str(checkpointing), str(no_sync))
    except AssertionError as e:  # pragma: no cover - a torch without the tracker or fake process groups
        pytest.skip(f"FSDPMemTracker on fake tensors did not run here: {str(e)[-300:]}")
    shape = replace(M.KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], n_layers=4)
    t = M.TrainShape(2048, 2, 8, 2 if no_sync else 1, activation_checkpointing=bool(checkpointing),
                     no_sync_accumulation=bool(no_sync))
    est = M.estimate_train_memory(shape, t)
    # the tracker's second-step forward/backward peak: the optimizer states exist
    print(f"tracker {got['Total'] / 2**30:.2f} GiB {got}; estimate {est.gib():.2f} GiB {est.parts}")
    assert abs(est.total_bytes / got["Total"] - 1) <= TOLERANCE
    assert est.parts["optimizer"] == pytest.approx(got["OptState"], rel=0.01)
    if no_sync:  # Temp: the loss's two fp32 gradients of the logits (8 bytes per token and vocabulary entry) and
        # the accumulated unsharded fp32 gradients of every parameter
        assert got["Temp"] - 8 * 2 * 2048 * shape.vocab == pytest.approx(4 * shape.n_params, rel=0.01)
    else:
        assert est.parts["logits"] + est.parts["activations"] == pytest.approx(got["Activation"] + got["Temp"],
                                                                               rel=TOLERANCE)


@pytest.mark.e2e
def test_snakemake_refuses_a_run_whose_jobs_cannot_fit(tmp_path):
    """A real (not dry) run stops in onstart, before any job, with one line naming the job and the fix; a dry run
    of the same config still plans; planner.memory_check: false lets the run start."""
    over = {"cpt": {"resources": {"gpu": 1}}, "planner": {"gpu_type": "test GPU", "gpu_memory_gib": 1.5,
                                                      "memory_reserve_gib": 0}}
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    base = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--cores", "1", "--configfile", str(tmp_path / "over.yaml")]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    dry = run("-n", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr[-2000:]
    real = run()
    assert real.returncode != 0
    lines = [x for x in real.stderr.splitlines() if x.startswith("error: cpt (")]
    assert len(lines) == 1, real.stderr[-3000:]
    # the demo's 135M model needs about 2.4 GiB on one GPU: checkpointing, micro-batch 1 are not enough, 2 GPUs are
    assert "needs about 2.4 GiB" in lines[0] and "fix: cpt.resources.gpu: 2" in lines[0]
    assert "planner.memory_check: false" in lines[0]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.jsonl"))
    allowed = run("--config", "planner={memory_check: false}", "--until", "prepare_articles")
    assert "error: cpt (" not in allowed.stderr
