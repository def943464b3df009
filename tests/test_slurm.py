"""A slice of the DAG submitted through profiles/slurm to a real one-node SLURM cluster on this machine (issue 11):
download -> prepare -> model conversion -> Raw corpus -> CPT -> closed-book QA of the CPT model.

The cluster is started by scripts/local-slurm.sh (installing slurm-wlm and munge with apt when missing, as root);
where it cannot start (not root, no apt) the test is skipped with the script's reason. It checks that every job
went through sbatch (the executor's SLURM logs and the cluster's own job records), that each rule's resources
became its sbatch options (memory, time limit, CPUs, as `scontrol show job` reports them), and that a CPT job
cancelled with scancel midway is resubmitted by the workflow, resumes from its checkpoint and ends with the
weights of an uninterrupted run of the same command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
CLUSTER_DIR = Path(os.environ.get("SCPT_SLURM_DIR", "/tmp/scpt-slurm"))

# The slice's config: one article cut to 600 characters, the packaged SmolLM2 converted by its rule and trained on
# the Raw corpus in 16-token blocks with a checkpoint every 2 steps (so there is a checkpoint to resume from when
# the job is cancelled), scored on 2 questions. Resources are distinct per rule so that the sbatch options can be
# traced back to them.
OVERLAY = {
    "run_name": "slurm-slice",
    "data": {"max_articles": 1, "max_article_chars": 600},
    "cpt": {"block_size": 16, "global_batch": 2, "micro_batch": 2, "raw_epochs": 1, "threads": 2,
            "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "probe": {"max_tokens": 32},
            "resources": {"gpu": 0, "mem_mb": 3000, "runtime": 25}},
    "evaluation": {"max_questions": 2, "threads": 1, "resources": {"gpu": 0, "mem_mb": 2500, "runtime": 15}},
}
# What each rule asks for: the rule's resources, else profiles/slurm's default-resources (runtime 120, mem 8000).
# download_quality is a local rule (it runs where Snakemake runs, which has the network): not a SLURM job
EXPECTED = {"prepare_articles": (8000, 120, 1),
            "convert_packaged_model": (8000, 120, 1), "build_corpus": (8000, 120, 1),
            "replay_pool": (3000, 25, 1), "cpt": (3000, 25, 2), "eval_qa": (2500, 15, 1)}
TARGET = "results/eval/qa/raw-all.json"


def cluster(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def slurm_env():
    """SLURM_CONF of the local cluster, started for this module (and stopped again if it was not running)."""
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster needs Linux")
    was_running = cluster("status").returncode == 0
    r = cluster("start")
    if r.returncode == 3:
        pytest.skip(f"local SLURM cluster cannot start here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_SLURM_"))}
    # as `eval "$(scripts/local-slurm.sh env)"`: the cluster's config, and its client wrappers first on PATH
    env.update(SLURM_CONF=str(CLUSTER_DIR / "slurm.conf"), PATH=f"{CLUSTER_DIR / 'bin'}:{env['PATH']}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield env
    if not was_running:
        cluster("stop")


def scontrol_job(job_id: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def cpt_job_running(env: dict) -> str | None:
    """The SLURM id of the running CPT job (the plugin submits each job with --comment rule_<name>...)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True,
                         env=env, timeout=60).stdout
    ids = [line.split("|")[0] for line in out.splitlines() if "rule_cpt" in line]
    return ids[0] if ids else None


def test_a_dag_slice_runs_through_sbatch_and_a_cancelled_cpt_job_resumes(slurm_env, tmp_path):
    env, work = slurm_env, tmp_path / "slice"
    work.mkdir()
    (work / "slice.yaml").write_text(yaml.safe_dump(OVERLAY))
    # profiles/slurm as a real cluster uses it; the local cluster has no accounting database, so job states come
    # from squeue (docs/cluster.md); the first status check after 5 s instead of 40 keeps the test short.
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--profile", str(ROOT / "profiles" / "slurm"), "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs",
           "--max-status-checks-per-second", "1", "--latency-wait", "5", "--jobs", "2",
           "--configfile", "slice.yaml", "--", TARGET]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Cancel the CPT job once its first checkpoint is complete, as a preemption or a time limit would.
    ckpts, cancelled = work / "results" / "checkpoints" / "raw" / "all", None
    while proc.poll() is None and time.time() - t0 < 900 and cancelled is None:
        if list(ckpts.glob("step_*/trainer_state.json")):
            cancelled = cpt_job_running(env)
            if cancelled:
                subprocess.run(["scancel", cancelled], env=env, check=True, timeout=60)
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=max(60, 900 - (time.time() - t0)))
    assert proc.returncode == 0, out[-6000:]
    assert cancelled, "the CPT job finished before it could be cancelled:\n" + out[-3000:]

    # every job went through sbatch: one SLURM log per job, and each job id is a job the cluster ran
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", out)
    logs = {p.parent.relative_to(work / ".snakemake" / "slurm_logs").parts[0]: p
            for p in (work / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(logs) == {f"rule_{r}" for r in EXPECTED}, sorted(logs)
    assert len(list((work / ".snakemake" / "slurm_logs" / "rule_cpt").rglob("*.log"))) == 2  # cancelled + rerun
    assert len(submitted) == len(EXPECTED) + 1 and cancelled in submitted
    records = {jid: scontrol_job(jid, env) for jid in submitted}
    seen = {}
    for jid, rec in records.items():
        rule = rec["Comment"].split("_wildcards")[0].removeprefix("rule_")
        seen.setdefault(rule, []).append(rec["JobState"])
        # the rule's resources as sbatch options: --mem (MB), -t (minutes), --cpus-per-task (threads)
        mem, minutes, cpus = EXPECTED[rule]
        assert rec["MinMemoryNode"] == f"{mem}M", (rule, rec)
        assert rec["TimeLimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00", (rule, rec)
        assert rec["NumCPUs"] == str(cpus), (rule, rec)
    assert sorted(seen["cpt"]) == ["CANCELLED", "COMPLETED"], seen
    assert all(states == ["COMPLETED"] for rule, states in seen.items() if rule != "cpt"), seen

    # the rerun resumed from the checkpoint and ended where an uninterrupted run of the same command ends
    model = work / "results" / "models" / "raw" / "all"
    summary = json.loads((model / "train_summary.json").read_text())
    assert len(summary["resumed_from_steps"]) == 1 and 0 < summary["resumed_from_steps"][0] < summary["steps"]
    log_steps = [int(line.split(",")[0]) for line in (model / "train_log.csv").read_text().splitlines()[1:]]
    assert log_steps == list(range(1, summary["steps"] + 1))
    # the exact command the rule ran (printed by the job in its SLURM log), with another output and checkpoint folder
    job_logs = "\n".join(p.read_text() for p in (work / ".snakemake" / "slurm_logs" / "rule_cpt").rglob("*.log"))
    shell = re.search(r"python -m workflow_scripts\.train .*?(?= 2> )", job_logs + out).group(0)
    args = shlex.split(shell)[3:]
    for flag, value in (("--output", str(tmp_path / "ref")), ("--workdir", str(tmp_path / "ref-ckpt"))):
        args[args.index(flag) + 1] = value
    ref = subprocess.run([sys.executable, "-m", "workflow_scripts.train", *args], cwd=work, capture_output=True,
                         text=True, env={**env, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)},  # as the rule's prefix
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_training(model, summary, tmp_path / "ref")

    # and the evaluation stage scored that model
    result = json.loads((work / TARGET).read_text())
    assert result["n"] == 2 or result.get("accuracy", {}).get("n") == 2, result
    print(f"SLURM slice: {time.time() - t0:.0f} s, jobs {len(submitted)}", file=sys.stderr)
    shutil.rmtree(work / "results" / "checkpoints", ignore_errors=True)


def test_the_cluster_script_is_idempotent_and_keeps_to_its_folder(slurm_env):
    pids = {n: (CLUSTER_DIR / f"{n}.pid").read_text().strip() for n in ("munged", "slurmctld", "slurmd")}
    r = cluster("start")
    assert r.returncode == 0 and "running" in r.stdout
    assert {n: (CLUSTER_DIR / f"{n}.pid").read_text().strip() for n in pids} == pids  # no second set of daemons
    assert cluster("status").returncode == 0
    assert cluster("env").stdout.strip() == f"export SLURM_CONF={CLUSTER_DIR}/slurm.conf PATH={CLUSTER_DIR}/bin:$PATH"
    conf = (CLUSTER_DIR / "slurm.conf").read_text()
    paths = re.findall(r"=(/\S+)", conf)
    assert paths and all(p.startswith(str(CLUSTER_DIR)) for p in paths), paths  # state, spool, logs, pids, socket
    assert "AccountingStorageType=accounting_storage/none" in conf and "MinJobAge=3600" in conf


def assert_same_training(model: Path, summary: dict, ref: Path) -> None:
    """A resumed CPT job (its model folder and train_summary) ended as the uninterrupted reference run in `ref`:
    same fingerprint, no resume there, the same final loss and the same weights."""
    from safetensors.torch import load_file

    ref_summary = json.loads((ref / "train_summary.json").read_text())
    assert ref_summary["fingerprint"] == summary["fingerprint"] and ref_summary["resumed_from_steps"] == []
    assert ref_summary["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-6)
    a, b = load_file(model / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), k
