"""The paper's configuration rehearsed on CPU through profiles/slurm (issue 19): experiments/paper.yaml plus
experiments/paper-rehearsal.yaml on the one-node cluster of scripts/local-slurm.sh, to the end of `rule all` (the
scaling fit and figure, the accuracy table, the RAG rows, the summary-claims table and figure, the examples), then
`snakemake --report`.

It checks that
- every job went through sbatch: each rule that ran has its SLURM log, and every submitted SLURM job id is one the
  cluster ran to COMPLETED (the two cancelled ones: CANCELLED, then COMPLETED on resubmission), except the rules
  the workflow declares local (the per-article copies out of a shard folder);
- every stage of paper.yaml produced its output (the workflow's final targets and each stage's own files);
- a synthesis job and a CPT job cancelled with scancel midway (after the shard's first article / the first
  checkpoint) are resubmitted by the workflow and resume: the synthesis rerun reuses the cached answers, the CPT
  rerun starts from its checkpoint;
- their final outputs equal those of an uninterrupted run of the same jobs: each job's exact command (from its SLURM
  log) is rerun once more into a second results folder, uninterrupted, and the synthesized records, the corpus
  built from them (tokens.npy), and the trained weights are equal. The accuracy table's rows of those models follow:
  evaluation is a deterministic function of identical weights and corpora (seeded sampling), so it is not rerun.

The cluster is started as in tests/test_slurm.py (skipped with the script's reason where it cannot start). The run
needs the CPU build of vLLM (bash scripts/bootstrap.sh --vllm): skipped without it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_profiles import declared_local_rules
from test_slurm import assert_same_training, scontrol_job, slurm_env  # noqa: F401 - the module-scoped cluster fixture

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "experiments" / "paper.yaml", ROOT / "experiments" / "paper-rehearsal.yaml"]
TIMEOUT = 3600


def running_job(env: dict, rule: str, wildcard: str) -> str | None:
    """The SLURM id of a running job of `rule` whose wildcards contain `wildcard` (the plugin's --comment)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    for line in out.splitlines():
        jid, _, comment = line.partition("|")
        if comment.startswith(f"rule_{rule}_wildcards") and wildcard in comment:
            return jid
    return None


def lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def job_command(work: Path, rule: str, module: str) -> list[str]:
    """The arguments of the `python -m MODULE ...` command a rule's job ran (printed in its SLURM logs)."""
    text = "\n".join(p.read_text(errors="replace") for p in (work / ".snakemake" / "slurm_logs" / f"rule_{rule}")
                     .rglob("*.log"))
    m = re.search(rf"-m {re.escape(module)} (.*?)(?= 2> )", text)
    assert m, f"no {module} command in the SLURM logs of rule {rule}"
    return shlex.split(m.group(1))


def swap(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def records(path: Path) -> list[tuple]:
    """The content of a synthesis shard file: id, text, token counts and finish reason of every record."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.append((r["id"], r.get("text"), r.get("completion_tokens"), r.get("finish_reason")))
    return out


@pytest.fixture(scope="module")
def rehearsal(slurm_env, tmp_path_factory):  # noqa: F811 - the imported fixture
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("the rehearsal runs vLLM's CPU build: bash scripts/bootstrap.sh --vllm")
    env, work = slurm_env, tmp_path_factory.mktemp("rehearsal")
    # profiles/slurm as a cluster uses it; the local cluster has no accounting database, so job states come from
    # squeue (docs/cluster.md); status checks start after 5 s instead of 40 and the file system is local.
    base = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", *map(str, CONFIGS)]
    cmd = base + ["--profile", str(ROOT / "profiles" / "slurm"), "--slurm-status-command", "squeue",
                  "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs",
                  "--max-status-checks-per-second", "1", "--latency-wait", "5", "--jobs", "2"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Cancel one synthesis job once the first article of its shard is written (the second is then in progress), and
    # the Raw CPT job once its first checkpoint is complete, as a preemption or a time limit would.
    cancelled: dict[str, tuple[str, str]] = {}
    ckpts = work / "results" / "checkpoints" / "raw" / "all"
    while proc.poll() is None and time.time() - t0 < TIMEOUT and len(cancelled) < 2:
        if "synthesize" not in cancelled:
            for method in ("entigraph", "rephrase"):
                stats = list((work / "results" / "synth" / method / "shards").glob("*/stats/*.json"))
                if len(stats) == 1:  # one article of the shard done, the other not yet
                    jid = running_job(env, "synthesize", method)
                    if jid:
                        subprocess.run(["scancel", jid], env=env, check=True, timeout=60)
                        cancelled["synthesize"] = (jid, method)
                        break
        if "cpt" not in cancelled and list(ckpts.glob("step_*/trainer_state.json")):
            jid = running_job(env, "cpt", "raw")
            if jid:
                subprocess.run(["scancel", jid], env=env, check=True, timeout=60)
                cancelled["cpt"] = (jid, "raw")
        time.sleep(0.2)
    try:
        out, _ = proc.communicate(timeout=max(60, TIMEOUT - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        proc.terminate()  # Snakemake cancels its SLURM jobs on SIGTERM
        out, _ = proc.communicate(timeout=300)
        pytest.fail(f"the rehearsal did not finish within {TIMEOUT} s:\n{out[-6000:]}")
    logs = "\n".join(f"== {p}\n" + p.read_text(errors="replace")[-1500:]
                     for p in sorted((work / "results" / "logs").rglob("*.log")) if "rror" in p.read_text(errors="replace"))
    assert proc.returncode == 0, out[-8000:] + logs[-8000:]
    report = subprocess.run(base + ["--cores", "1", "--report", str(work / "report.html")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    print(f"rehearsal through SLURM: {time.time() - t0:.0f} s", file=sys.stderr)
    return {"env": env, "work": work, "out": out, "cancelled": cancelled}


def test_every_job_went_through_sbatch(rehearsal):
    work, out, env = rehearsal["work"], rehearsal["out"], rehearsal["env"]
    assert set(rehearsal["cancelled"]) == {"synthesize", "cpt"}, ("not cancelled midway", rehearsal["cancelled"],
                                                                  out[-3000:])
    # the rules declared `localrule: True` (the download, copies of one article's file out of a shard, tables and
    # figures drawn from finished results) and `all` run in the workflow's own process by design; every other job
    # is a SLURM job
    local = set(re.findall(r"^localrule (\w+):", out, re.M))
    assert local <= declared_local_rules() | {"all"}, local
    ran = set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)) - local
    logged = {p.name.removeprefix("rule_") for p in (work / ".snakemake" / "slurm_logs").iterdir()}
    assert ran and ran == logged, (sorted(ran), sorted(logged))
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == len(set(submitted))
    states: dict[str, list[str]] = {}
    for jid in submitted:
        rec = scontrol_job(jid, env)
        states.setdefault(rec["Comment"].split("_wildcards")[0].removeprefix("rule_"), []).append(rec["JobState"])
    assert set(states) == ran
    for rule, (jid, _) in rehearsal["cancelled"].items():
        assert jid in submitted and sorted(states[rule]).count("CANCELLED") == 1, (rule, states[rule])
    assert all(s == "COMPLETED" for rule, ss in states.items() for s in ss if s != "CANCELLED"), states
    # the paper's stages, each as a job of its own
    for rule in ("download_quality", "prepare_articles", "extract_entities", "synthesize", "build_corpus", "cpt",
                 "eval_qa", "eval_rag", "aggregate", "aggregate_rag", "fit_scaling", "plot_scaling",
                 "synthesis_report", "instruct_corpus", "instruct_tune", "summarize", "judge_summaries",
                 "instruct_examples", "claims_table"):
        assert rule in ran | local, rule
    assert {"cpt", "eval_qa", "eval_rag", "synthesize", "instruct_tune", "judge_summaries"} <= ran  # the heavy ones


def test_every_stage_of_the_paper_produced_its_output(rehearsal):
    from workflow_scripts import layout
    from workflow_scripts.config import load_config

    work = rehearsal["work"]
    cfg = load_config([ROOT / "config.yaml", *CONFIGS])
    missing = [t for t in layout.final_targets(cfg) if not (work / t).exists()]
    assert not missing, missing
    res = work / "results"
    uids = [json.loads(line)["uid"] for line in (res / "data" / "articles.jsonl").read_text().splitlines()]
    assert len(uids) == 2
    for uid in uids:  # EntiGraph's extraction (ok: the schema-constrained answer parses) and both methods' texts
        assert json.loads((res / "synth" / "entigraph" / "entities" / f"{uid}.json").read_text())["status"] == "ok"
        for method in ("entigraph", "rephrase"):
            assert lines(res / "synth" / method / f"{uid}.jsonl") > 0, (method, uid)
    for method in ("raw", "entigraph", "rephrase"):
        assert np.load(res / "corpus" / method / "tokens.npy").size > 0, method
    for model in layout.eval_models(cfg):  # closed-book CoT with n samples on vLLM, every model
        summary = json.loads((res / "eval" / "qa" / f"{model}.json").read_text())
        assert summary["mode"] == "cot" and summary["n"] == cfg["evaluation"]["max_questions"], model
    with open(res / "tables" / "qa_accuracy.csv") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    assert set(layout.eval_models(cfg)) <= set(table), sorted(table)
    for model in layout.rag_models(cfg):  # RAG with the authors' prompt
        assert json.loads((res / "eval" / "rag" / f"{model}.json").read_text())["n"] > 0, model
    assert (res / "tables" / "rag_accuracy.csv").read_text().count("\n") >= 1 + len(layout.rag_models(cfg))
    fit = json.loads((res / "figures" / "scaling_fit.json").read_text())
    assert fit, fit
    # CPT in 2 gloo processes with FSDP2, the replay pool and its held-out probe
    for model in [layout.model_id(m, b) for m, b in layout.cpt_models(cfg)]:
        summary = json.loads((work / layout.model_dir(model, cfg) / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["fsdp"] is True, model
    for start in cfg["instruct"]["models"]:
        inst = work / layout.model_dir(layout.instruct_id(start), cfg)
        assert json.loads((inst / "train_summary.json").read_text())["world_size"] == 2
    with open(res / "tables" / "summary_claims.csv") as f:
        assert len(list(csv.DictReader(f))) >= len(cfg["instruct"]["models"])
    assert (work / "report.html").stat().st_size > 10_000


def test_cancelled_jobs_resume_and_end_as_an_uninterrupted_run(rehearsal, tmp_path):
    work, env = rehearsal["work"], rehearsal["env"]
    res, ref = work / "results", tmp_path
    py = dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # the reruns start in the project folder

    # synthesis: the resubmitted job reused the first article's answers, then wrote the second article
    _, method = rehearsal["cancelled"]["synthesize"]
    (shard,) = (res / "synth" / method / "shards").iterdir()
    stats = [json.loads(p.read_text()) for p in sorted((shard / "stats").glob("*.json"))]
    assert len(stats) == 2 and any(s["reused"] > 0 for s in stats), stats
    args = job_command(work, "synthesize", "workflow_scripts.synthesis")
    if args[args.index("--method") + 1] != method:  # the log of the other method's job came first
        text = "\n".join(p.read_text(errors="replace")
                         for p in (work / ".snakemake" / "slurm_logs" / "rule_synthesize").rglob("*.log"))
        m = re.search(rf"-m workflow_scripts\.synthesis (synthesize-shard --method {method} .*?)(?= 2> )", text)
        args = shlex.split(m.group(1))
    args = swap(swap(args, "--outdir", str(ref / "shard")), "--work-dir", str(ref / "work"))
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.synthesis", *args], cwd=work, env=py,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    uids = sorted(p.stem for p in (ref / "shard").glob("*.jsonl"))
    assert len(uids) == 2
    for uid in uids:
        assert records(ref / "shard" / f"{uid}.jsonl") == records(shard / f"{uid}.jsonl"), uid
    # the corpus built from those records: the same tokens
    cargs = None
    text = "\n".join(p.read_text(errors="replace") for p in (work / ".snakemake" / "slurm_logs" / "rule_build_corpus")
                     .rglob("*.log"))
    for m in re.finditer(r"-m workflow_scripts\.corpus (build .*?)(?= 2> )", text):
        a = shlex.split(m.group(1))
        if a[a.index("--method") + 1] == method:
            cargs = a
    assert cargs, text[-2000:]
    start = cargs.index("--inputs") + 1
    end = next(i for i in range(start, len(cargs)) if cargs[i].startswith("--"))
    cargs[start:end] = [str(ref / "shard" / Path(p).name) for p in cargs[start:end]]
    cargs = swap(cargs, "--outdir", str(ref / "corpus"))
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.corpus", *cargs], cwd=work, env=py,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.array_equal(np.load(ref / "corpus" / "tokens.npy"), np.load(res / "corpus" / method / "tokens.npy"))

    # CPT: the resubmitted job resumed from its checkpoint and ends with an uninterrupted run's weights
    model = res / "models" / "raw" / "all"
    summary = json.loads((model / "train_summary.json").read_text())
    assert len(summary["resumed_from_steps"]) == 1 and 0 < summary["resumed_from_steps"][0] < summary["steps"]
    targs = job_command(work, "cpt", "workflow_scripts.train")
    i = 0
    text = "\n".join(p.read_text(errors="replace") for p in (work / ".snakemake" / "slurm_logs" / "rule_cpt")
                     .rglob("*.log"))
    for m in re.finditer(r"-m workflow_scripts\.train (.*?)(?= 2> )", text):
        a = shlex.split(m.group(1))
        if a[a.index("--method") + 1] == "raw":
            targs = a
            i += 1
    assert i >= 2  # the cancelled job and its resubmission ran the same command
    targs = swap(swap(targs, "--output", str(ref / "raw")), "--workdir", str(ref / "raw-ckpt"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "workflow_scripts.train", *targs], cwd=work, env=py, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_training(model, summary, ref / "raw")
