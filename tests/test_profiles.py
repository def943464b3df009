"""Snakemake profiles (issue 7): both parse as Snakemake parses them, a dry run with each plans the DAG, and a
multi-GPU rule under profiles/slurm is submitted as ONE task that sees all N GPUs.

The SLURM command lines are built by the installed snakemake-executor-plugin-slurm's own functions from the
resources a dry run prints, so the tests follow the plugin's real behaviour (no cluster is needed).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILES = {name: ROOT / "profiles" / name / "config.v8+.yaml" for name in ("slurm", "local")}
SLURM_ENV_VARS = ("SNAKEMAKE_SLURM_ACCOUNT", "SBATCH_ACCOUNT", "SNAKEMAKE_SLURM_PARTITION", "SBATCH_PARTITION",
                  "SCPT_GPU_PARTITION", "SCPT_GPU_MODEL", "SCPT_LOCAL_GPUS")


def parse_profile(path: Path, env: dict[str, str] | None = None) -> dict:
    """The profile as Snakemake reads it (its own parser: YTE templating, then key=value CLI arguments)."""
    from snakemake.profiles import ProfileConfigFileParser

    saved = {k: os.environ.pop(k) for k in SLURM_ENV_VARS if k in os.environ}
    os.environ.update(env or {})
    try:
        with open(path) as f:
            return dict(ProfileConfigFileParser().parse(f))
    finally:
        for k in env or {}:
            os.environ.pop(k, None)
        os.environ.update(saved)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SLURM_ENV_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def dry_run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([*SNAKEMAKE, "-n", *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "This was a dry-run" in out, out[-2000:]
    return out


def planned_jobs(out: str) -> list[dict]:
    """(rule, resources) of every job a dry run prints."""
    jobs, cur = [], None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if m:
            cur = {"rule": m.group(1), "resources": {}}
            jobs.append(cur)
        elif cur is not None and line.strip().startswith("resources:"):
            for item in line.split("resources:", 1)[1].split(", "):
                key, _, val = item.strip().partition("=")
                try:
                    cur["resources"][key] = ast.literal_eval(val)
                except (ValueError, SyntaxError):
                    cur["resources"][key] = val
    return jobs


class Resources(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def slurm_commands(rule: str, resources: dict, threads: int = 1) -> tuple[str, str]:
    """(sbatch command, job-step srun prefix) the SLURM plugin builds for a job with these resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra
    from snakemake_executor_plugin_slurm_jobstep import get_cpu_setting, get_gpu_setting, get_node_setting

    job = SimpleNamespace(name=rule, threads=threads, resources=Resources(resources))
    validate_slurm_extra(job)
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": f"rule_{rule}",
              "account": f"-A '{resources['slurm_account']}'" if resources.get("slurm_account") else "",
              "partition": f"-p '{resources['slurm_partition']}'" if resources.get("slurm_partition") else "",
              "workdir": "/work"}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    gpu_job = bool(resources.get("gpu"))
    # the plugin's job step: `srun -n1 --cpu-bind=q <cpus> <gpus> <nodes> snakemake ...` (jobstep run_job)
    step = f"srun -n1 --cpu-bind=q {get_cpu_setting(job, gpu_job)} {get_gpu_setting(job)} {get_node_setting(job)}"
    return sbatch, step


def rule_blocks():
    """(name, text) of every rule and checkpoint in rules/*.smk."""
    for smk in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M):
            m = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if m:
                yield m.group(1), block


def declared_local_rules() -> set[str]:
    """The rules of the workflow declared `localrule: True`: they run where Snakemake runs."""
    return {name for name, block in rule_blocks() if re.search(r"^    localrule: True$", block, re.M)}


@pytest.mark.unit
def test_only_the_light_rules_run_where_snakemake_runs():
    """Under a cluster profile the download (compute nodes often have no network), the tables, the fit, the
    figures and the per-article copies run in Snakemake's own process (docs/cluster.md section 4); a rule that
    loads a model or asks for resources is always a job."""
    local = declared_local_rules()
    assert local == {"download_quality", "aggregate", "aggregate_rag", "fit_scaling", "plot_scaling",
                     "plot_diversity", "synthesis_summary", "claims_table", "entities_of_article",
                     "synthesis_of_article"}, sorted(local)
    for name, block in rule_blocks():
        if name in local:
            assert not re.search(r"^    (resources|threads):", block, re.M), name


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.e2e
def test_slurm_profile_parses_and_takes_account_and_partition_from_the_environment():
    bare = parse_profile(PROFILES["slurm"])
    assert bare["executor"] == "slurm"
    assert "tasks_per_gpu=0" in bare["default-resources"]
    assert not any(x.startswith(("slurm_account", "slurm_partition")) for x in bare["default-resources"])
    assert "cpt:cpus_per_gpu=8" in bare["set-resources"]
    for rule in ("extract_entities", "synthesize", "cpt", "eval_qa", "eval_rag"):  # GPU jobs never span nodes
        assert f"{rule}:nodes=1" in bare["set-resources"]
    assert not any("gpu_model" in x for x in bare["set-resources"])

    env = {"SBATCH_ACCOUNT": "proj42", "SBATCH_PARTITION": "cpu", "SCPT_GPU_PARTITION": "gpu",
           "SCPT_GPU_MODEL": "h100"}
    full = parse_profile(PROFILES["slurm"], env)
    assert {"slurm_account=proj42", "slurm_partition=cpu"} <= set(full["default-resources"])
    for rule in ("extract_entities", "synthesize", "cpt", "eval_qa"):
        assert {f"{rule}:slurm_partition=gpu", f"{rule}:gpu_model=h100"} <= set(full["set-resources"])
    # Snakemake-specific names win over sbatch's own variables
    assert "slurm_account=snk" in parse_profile(PROFILES["slurm"], {**env, "SNAKEMAKE_SLURM_ACCOUNT": "snk"})[
        "default-resources"]


@pytest.mark.e2e
def test_local_profile_counts_the_machines_gpus():
    if shutil.which("nvidia-smi") is None:  # no GPU listed: 1, so that GPU configs still plan (their jobs stop early)
        assert parse_profile(PROFILES["local"])["resources"] == ["gpu=1"]
    prof = parse_profile(PROFILES["local"], {"SCPT_LOCAL_GPUS": "4"})
    assert prof["resources"] == ["gpu=4"] and prof["cores"] == "all"


@pytest.mark.e2e
def test_profile_headers_name_the_pinned_versions():
    """The SLURM profile's header names the Snakemake and plugin versions that requirements.txt pins."""
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    header = PROFILES["slurm"].read_text().splitlines()[0]
    assert f"Snakemake {pins['snakemake']} with snakemake-executor-plugin-slurm " \
           f"{pins['snakemake-executor-plugin-slurm']}" in header, header
    for text in (p.read_text() for p in PROFILES.values()):
        for version in re.findall(r"snakemake-executor-plugin-slurm (\d+\.\d+\.\d+)", text):
            assert version == pins["snakemake-executor-plugin-slurm"]


@pytest.mark.e2e
def test_tensor_parallel_size_is_checked_against_the_vllm_rules_gpus_when_planning(tmp_path):
    (tmp_path / "tp2.yaml").write_text("backends: {vllm: {tensor_parallel_size: 2}}\n")
    out = subprocess.run([*SNAKEMAKE, "-n", "--profile", "profiles/local", "--configfile", "experiments/single-gpu.yaml",
                          str(tmp_path / "tp2.yaml")], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0
    # a WorkflowError at parse time (rules/common.smk): its message is one line
    text = out.stdout + out.stderr
    assert "WorkflowError" in text and "Traceback" not in text, text[-2000:]
    lines = [x for x in text.splitlines() if "tensor_parallel_size" in x]
    assert len(lines) == 1 and lines[0].startswith("backends.vllm.tensor_parallel_size is 2"), text[-2000:]
    assert "synthesis.resources.gpu=1 (extract_entities/synthesize)" in lines[0]


# -------------------------------------------------------------------------------------------- dry runs
@pytest.mark.e2e
@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_plans_the_demo_dag_with_each_profile(profile):
    out = dry_run(["--profile", f"profiles/{profile}", "--forceall"], ROOT)  # plans even over finished results
    rules = {j["rule"] for j in planned_jobs(out)}
    assert "all" in rules or "Nothing to be done" in out


@pytest.mark.e2e
def test_one_task_sees_all_gpus_of_a_multi_gpu_rule(tmp_path):
    """The profile turns a rule with gpu=8 into `sbatch --gpus=8` with one task (no --ntasks-per-gpu) and one
    job step `srun -n1 --gpus=8`: the script starts once and sees all 8 GPUs."""
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "model/done"\n\n'
        'rule cpt:\n    output: "model/done"\n    threads: 4\n'
        '    resources:\n        gpu=8,\n        mem_mb=200000,\n        runtime=2880,\n'
        '    shell: "torchrun --nproc_per_node 8 train.py && touch {output}"\n')
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    env = clean_env(SBATCH_ACCOUNT="proj42", SCPT_GPU_PARTITION="gpu")
    (job,) = [j for j in planned_jobs(dry_run(["--profile", "profiles/slurm"], tmp_path, env)) if j["rule"] == "cpt"]
    res = job["resources"]
    assert res["gpu"] == 8 and res["tasks_per_gpu"] == 0 and res["slurm_partition"] == "gpu"
    sbatch, step = slurm_commands("cpt", res, threads=4)
    assert "--gpus=8" in sbatch and "-A 'proj42'" in sbatch and "-p 'gpu'" in sbatch
    assert "--ntasks" not in sbatch  # sbatch's default: one task
    assert "--cpus-per-gpu=8" in sbatch and "--mem 200000" in sbatch and "-t 2880" in sbatch
    assert "--nodes=1" in sbatch  # all 8 GPUs on one node: torchrun --standalone cannot span nodes
    assert step.split()[:2] == ["srun", "-n1"] and "--gpus=8" in step and "--nodes=1" in step

    # why the profile matters: the plugin maps `tasks` of a GPU job to --ntasks-per-gpu (8 tasks here)
    naive, _ = slurm_commands("cpt", {k: v for k, v in res.items() if k != "tasks_per_gpu"} | {"tasks": 1})
    assert "--ntasks-per-gpu=1" in naive


def paper_workdir(tmp_path: Path) -> Path:
    """A copy of the workflow whose data stage has run on one vendored article under the paper's config, so the
    dry run expands past the prepare_articles checkpoint to every downstream job."""
    work = tmp_path / "wf"
    ignore = shutil.ignore_patterns("results", ".venv", ".snakemake", "__pycache__", ".cache", ".git", "tests")
    work.mkdir()
    for name in ("Snakefile", "config.yaml", "rules", "schemas", "workflow_scripts", "envs", "profiles",
                 "experiments", "resources", "report"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        elif src.exists():
            shutil.copy(src, work / name)
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())["data"]["quality"]
    (work / "one-article.yaml").write_text(yaml.safe_dump(
        {"data": {"quality": {"url": demo["url"], "sha256": demo["sha256"]}, "max_articles": 1}}))
    proc = subprocess.run([*SNAKEMAKE, "--cores", "1", "results/data/prepare_stats.json", "--configfile",
                           "experiments/paper.yaml", "one-article.yaml"], cwd=work, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return work


@pytest.mark.e2e
def test_paper_dag_under_slurm_requests_one_task_per_multi_gpu_job(tmp_path):
    """`snakemake -n --profile profiles/slurm --configfile experiments/paper.yaml` plans every stage; each GPU job
    is submitted as one task holding all the GPUs its config section asks for."""
    from workflow_scripts.config import load_config, method_budgets

    work = paper_workdir(tmp_path)
    out = dry_run(["--profile", "profiles/slurm", "--configfile", "experiments/paper.yaml", "one-article.yaml"],
                  work, clean_env(SBATCH_ACCOUNT="proj42", SBATCH_PARTITION="cpu", SCPT_GPU_PARTITION="gpu"))
    jobs = planned_jobs(out)
    rules = {j["rule"] for j in jobs}
    assert {"extract_entities", "synthesize", "build_corpus", "cpt", "eval_qa", "eval_rag", "aggregate",
            "fit_scaling", "plot_scaling", "all"} <= rules, sorted(rules)
    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    assert sum(j["rule"] == "cpt" for j in jobs) == 1 + sum(len(method_budgets(cfg, m)) for m in cfg["synthesis"]["methods"])
    for job in jobs:
        res, rule = job["resources"], job["rule"]
        sbatch, step = slurm_commands(rule, res)
        assert "-A 'proj42'" in sbatch
        if not res.get("gpu"):
            # an API judge (judge_*: no GPU under paper.yaml) stays on the profile's GPU partition, without GPUs
            partition = "gpu" if rule.startswith("judge_") else "cpu"
            assert f"-p '{partition}'" in sbatch and "--gpus" not in sbatch and "--ntasks=1" in sbatch
            continue
        summaries_gpu = cfg["instruct"]["summaries"]["resources"]["gpu"]
        want = {"cpt": cfg["cpt"]["resources"]["gpu"], "eval_qa": cfg["evaluation"]["resources"]["gpu"],
                "eval_rag": cfg["evaluation"]["resources"]["gpu"], "instruct_tune": cfg["instruct"]["resources"]["gpu"],
                "summarize": summaries_gpu, "instruct_examples": summaries_gpu}.get(rule, cfg["synthesis"]["resources"]["gpu"])
        assert res["gpu"] == want, (rule, res)
        assert "-p 'gpu'" in sbatch and f"--gpus={want}" in sbatch and "--ntasks" not in sbatch, sbatch
        assert "--cpus-per-gpu=8" in sbatch
        assert step.split()[:2] == ["srun", "-n1"] and f"--gpus={want}" in step
    (cpt,) = {j["resources"]["gpu"] for j in jobs if j["rule"] == "cpt"}
    assert cpt == 8  # one node's GPUs ...
    # ... driven by one torchrun launcher that starts a worker per GPU of that one task
    launches = [line for line in out.splitlines() if "-m workflow_scripts.train" in line]
    assert launches and all("torch.distributed.run --standalone --nproc_per_node 8 " in x for x in launches)
    # every GPU job's program starts through the pre-flight check (--vllm where the rule runs vLLM); CPU jobs do not
    assert all("python -m workflow_scripts.preflight --gpus 8 -- python -m torch.distributed.run" in x for x in launches)
    shells = {m.group(1): line for line in out.splitlines()
              if (m := re.search(r"python -m workflow_scripts\.(synthesis (?:extract|synthesize)-shard|qa_eval|"
                                  r"claims judge|aggregate qa)", line))}
    assert "preflight --gpus 1 --vllm -- python -m workflow_scripts.synthesis synthesize-shard" in shells[
        "synthesis synthesize-shard"]
    assert "preflight --gpus 1 --vllm -- python -m workflow_scripts.qa_eval" in shells["qa_eval"]
    assert "preflight" not in shells["aggregate qa"]
    # the paper's judge is an API (instruct.judge.engine: openai): its jobs ask for no GPU and get no check
    assert cfg["instruct"]["judge"]["engine"] == "openai"
    assert all(not j["resources"].get("gpu") for j in jobs if j["rule"].startswith("judge_"))
    assert "preflight" not in shells.get("claims judge", "")


@pytest.mark.e2e
def test_local_profile_jobs_run_side_by_side_on_their_own_gpus(tmp_path):
    """Snakemake with profiles/local on a pretend 2-GPU machine (SCPT_LOCAL_GPUS=2), four 1-GPU jobs at once: the
    profile lets two run together, and the GPU slots (workflow_scripts/preflight.py, which every GPU rule's shell line
    runs) give those two different devices. The jobs call the slot allocator itself: the pre-flight check around it
    would stop them on this CPU machine."""
    (tmp_path / "job.py").write_text(
        f"import json, os, sys, time\nsys.path.insert(0, {str(ROOT)!r})\nfrom workflow_scripts import preflight\n"
        "preflight.pin_devices(1)\nt = time.time()\ntime.sleep(2)\n"
        "json.dump(dict(dev=os.environ['CUDA_VISIBLE_DEVICES'], start=t, end=time.time()), open(sys.argv[1], 'w'))\n")
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: expand("out/{i}.json", i=range(4))\n\n'
        'rule job:\n    output: "out/{i}.json"\n    resources:\n        gpu=1,\n'
        f'    shell: "{sys.executable} job.py {{output}}"\n')
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    env = clean_env(SCPT_LOCAL_GPUS="2", SCPT_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([*SNAKEMAKE, "--profile", "profiles/local", "--cores", "4"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = [json.loads((tmp_path / "out" / f"{i}.json").read_text()) for i in range(4)]
    assert {x["dev"] for x in runs} <= {"0", "1"}
    overlapping = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, "two 1-GPU jobs should run at once on a 2-GPU machine"
    assert all(a["dev"] != b["dev"] for a, b in overlapping)


@pytest.mark.e2e
@pytest.mark.parametrize("engine,gpus", [("transformers", 1), ("openai", 0)])
def test_judge_jobs_ask_for_a_gpu_only_with_a_local_engine(engine, gpus, tmp_path):
    """The planned judge jobs under instruction stages whose summaries run on one GPU: the judge's own GPU count
    follows its engine (workflow_scripts/preflight.py judge_gpus)."""
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(
        {"instruct": {"summaries": {"resources": {"gpu": 1}}, "judge": {"engine": engine}}}))
    out = dry_run(["--cores", "1", "--configfile", "experiments/cpu-instruct.yaml", str(tmp_path / "judge.yaml")],
                  ROOT)
    judges = [j for j in planned_jobs(out) if j["rule"] == "judge_summaries"]
    assert judges and all(j["resources"].get("gpu", 0) == gpus for j in judges), judges
    summaries = [j for j in planned_jobs(out) if j["rule"] == "summarize"]
    assert summaries and all(j["resources"]["gpu"] == 1 for j in summaries)
