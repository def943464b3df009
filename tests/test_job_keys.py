"""One table from config keys to jobs (issue 13, item 1): workflow_scripts/job_keys.py.

Unit tests check the table against the schema: every key is classified, and no operational key reaches a job's
tracked --config-json. The workflow tests finish a tiny DAG once (real stages, a tiny random model as generator
and CPT base) and dry-run overlays on it: an overlay of operational keys plans nothing; a shaping key plans
exactly the jobs that read it and those downstream of them.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_scripts import job_keys
from workflow_scripts.config import deep_merge, load_config, load_schema

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ unit
def schema_leaves(node: dict, path: str = "") -> dict[str, dict]:
    """Dotted path -> schema of every leaf key (an object without declared properties is a leaf)."""
    props = node.get("properties")
    if not props:
        return {path: node}
    out: dict[str, dict] = {}
    for k, v in props.items():
        out.update(schema_leaves(v, f"{path}.{k}" if path else k))
    return out


LEAVES = schema_leaves(load_schema())


VALID_CHANGE = {"backends.transformers.device": "cpu", "evaluation.device": "cpu"}


def changed(value, schema: dict, path: str = ""):
    """A different value of the same type, valid for the schema's leaf."""
    if path in VALID_CHANGE:
        return VALID_CHANGE[path]
    if "enum" in schema:
        return next(e for e in schema["enum"] if e != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if value is None:
        t = schema.get("type")
        types = t if isinstance(t, list) else [t]
        return 3 if "integer" in types else 0.5 if "number" in types else "x"
    raise AssertionError(f"no change for {value!r}")


def set_path(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    cur = cfg
    *parents, last = path.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value
    return cfg


def get_path(cfg: dict, path: str):
    cur = cfg
    for p in path.split("."):
        cur = cur[p]
    return cur


def all_jobs(cfg: dict) -> dict[str, str]:
    """Every job's --config-json for a config (its synthesis methods and evaluated models)."""
    out = {}
    for job in job_keys.JOBS:
        if job == "synthesize":
            for m in cfg["synthesis"]["methods"]:
                out[f"{job}[{m}]"] = job_keys.shaping_json(cfg, job, method=m)
        elif job.startswith("eval_"):
            for mid in ["base", "raw-all"] + [f"api-{a['name']}" for a in cfg["evaluation"]["api_models"]]:
                out[f"{job}[{mid}]"] = job_keys.shaping_json(cfg, job, model=mid)
        else:
            out[job] = job_keys.shaping_json(cfg, job)
    return out


@functools.lru_cache(maxsize=None)
def _configs() -> tuple[dict, ...]:
    return tuple(_make_configs())


def configs() -> list[dict]:
    return [copy.deepcopy(c) for c in _configs()]


def _make_configs() -> list[dict]:
    """The demo, and one that samples with each remote/GPU engine (so their settings are read)."""
    demo = load_config()
    vllm = load_config(overrides={"synthesis": {"backend": "vllm"},
                                  "evaluation": {"modes": ["loglik", "cot"], "cot": {"engine": "vllm"}}})
    api = load_config(overrides={
        "synthesis": {"backend": "openai", "methods": ["entigraph", "rephrase", "qa", "fam"],
                      "families": {"fam": {"templates": ["qa"]}}},
        "evaluation": {"api_models": [{"name": "gpt", "model": "gpt-4o", "engine": "openai", "modes": ["cot"]}]}})
    return [demo, vllm, api]


def test_operational_paths_exist_in_the_schema():
    for path in job_keys.OPERATIONAL + job_keys.STRUCTURAL:
        assert any(leaf == path or leaf.startswith(path + ".") for leaf in LEAVES), path


def read_paths(cfg: dict) -> set[str]:
    """The config paths some job reads, over the config's methods and evaluated models."""
    out: set[str] = set()
    for job, reads in job_keys.JOBS.items():
        if job == "synthesize":
            wcs = [{"method": m} for m in cfg["synthesis"]["methods"]]
        elif job.startswith("eval_"):
            wcs = [{"model": "base"}] + [{"model": f"api-{a['name']}"} for a in cfg["evaluation"]["api_models"]]
        else:
            wcs = [{}]
        for wc in wcs:
            out.update(reads(cfg, **wc).paths)
    return out


def test_every_schema_key_is_classified():
    """A key is operational, read by no job (it decides which jobs exist), or read by some job."""
    read = set().union(*(read_paths(cfg) for cfg in configs()))
    unread = [leaf for leaf in LEAVES
              if not job_keys.under(leaf, job_keys.OPERATIONAL + job_keys.STRUCTURAL)
              and not any(job_keys.under(leaf, [p]) or p.startswith(leaf + ".") for p in read)]
    assert unread == []


@pytest.mark.parametrize("path", [p for p in LEAVES if job_keys.under(p, job_keys.OPERATIONAL)])
def test_operational_key_changes_no_job_config(path):
    for cfg in configs():
        before = all_jobs(cfg)
        after = all_jobs(set_path(cfg, path, changed(get_path(cfg, path), LEAVES[path], path)))
        assert after == before, path


def test_operational_keys_reach_the_jobs_that_read_them():
    cfg = load_config()
    assert job_keys.operational(cfg, "cpt")["cpt"]["log_every"] == cfg["cpt"]["log_every"]
    assert job_keys.operational(cfg, "cpt")["cpt"]["threads"] == cfg["cpt"]["threads"]
    assert "threads" not in job_keys.shaping(cfg, "cpt")["cpt"]
    syn = job_keys.operational(cfg, "synthesize", method="rephrase")
    assert syn["backends"]["transformers"]["progress"] == cfg["backends"]["transformers"]["progress"]
    assert "progress" not in job_keys.shaping(cfg, "synthesize", method="rephrase")["backends"]["transformers"]


def test_shaping_key_changes_the_jobs_that_read_it():
    cfg = load_config()
    before = all_jobs(cfg)
    for path, jobs in [("cpt.lr", {"cpt"}), ("figures.dpi", {"plot_scaling", "plot_diversity"}),
                       ("figures.fit.n_starts", {"fit_scaling"}),
                       ("synthesis.entigraph.max_triples", {"synthesize[entigraph]"}),
                       ("synthesis.sampling.top_p", {"extract_entities", "synthesize[entigraph]",
                                                     "synthesize[rephrase]", "synthesis_report"}),
                       ("evaluation.max_questions", {"eval_qa[base]", "eval_qa[raw-all]", "eval_rag[base]",
                                                     "eval_rag[raw-all]"})]:
        after = all_jobs(set_path(cfg, path, changed(get_path(cfg, path), LEAVES[path], path)))
        assert {j for j in before if before[j] != after[j]} == jobs, path


def test_resume_config_leaves_out_the_exempt_keys():
    cfg = load_config()
    rc = job_keys.resume_config(cfg, "cpt")
    assert rc["cpt"]["lr"] == cfg["cpt"]["lr"] and rc["seed"] == cfg["seed"]
    for key in ("micro_batch", "save_dtype", "probe", "fsdp", "gradient_checkpointing", "log_every", "budgets"):
        assert key not in rc["cpt"]


# ------------------------------------------------------------------------------------------ workflow
TINY = {
    "run_name": "tiny-keys",
    "data": {"max_articles": 1, "max_article_chars": 600},
    "synthesis": {"methods": ["entigraph"], "sampling": {"max_new_tokens": 8},
                  "entigraph": {"max_entities": 3, "max_pairs": 1, "max_triples": 1,
                                "extraction_max_new_tokens": 8}},
    "cpt": {"budgets": [16], "block_size": 8, "global_batch": 2, "micro_batch": 2, "raw_epochs": 1,
            "replay": {"rate": 0.0}, "probe": {"max_tokens": 16}},
    "evaluation": {"max_questions": 2},
    "figures": {"formats": ["png"]},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished tiny DAG: the real stages, a tiny random Llama as generator and CPT base (seconds per job)."""
    work = tmp_path_factory.mktemp("keys")
    for name in ("config.yaml", "resources"):
        (work / name).symlink_to(ROOT / name)
    tiny = copy.deepcopy(TINY)
    tiny["models"] = {"generator": {"source": "path", "name": str(tiny_model_dir)},
                      "base": {"source": "path", "name": str(tiny_model_dir)}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    r = snakemake(work, "--cores", "2", "--configfile", "config.yaml", "tiny.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, tiny


def planned(work: Path, tiny: dict, overlay: dict) -> dict[str, int]:
    """Jobs (rule -> count) that `snakemake -n` plans with `overlay` on top of the finished config."""
    (work / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    r = snakemake(work, "-n", "--cores", "1", "--configfile", "config.yaml", "tiny.yaml", "overlay.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if "Nothing to be done" in r.stdout + r.stderr:
        return {}
    table = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal", r.stdout, re.S)
    assert table, r.stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)$", table.group(1), re.M)}


def nest(path: str, value) -> dict:
    out: dict = {}
    cur = out
    *parents, last = path.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value
    return out


def test_finished_dag_plans_nothing(finished):
    assert planned(*finished, {}) == {}


@pytest.mark.parametrize("path", ["cpt.log_every", "cpt.threads", "cpt.resources.mem_mb"])
def test_named_operational_key_plans_nothing(finished, path):
    """The issue's defect: changing only cpt.log_every, cpt.threads or a resources value retrained every model."""
    work, tiny = finished
    cfg = load_config([ROOT / "config.yaml", work / "tiny.yaml"])
    assert planned(work, tiny, nest(path, changed(get_path(cfg, path), LEAVES[path], path))) == {}


def test_all_operational_keys_together_plan_nothing(finished):
    work, tiny = finished
    cfg = load_config([ROOT / "config.yaml", work / "tiny.yaml"])
    overlay: dict = {}
    for path in LEAVES:
        if job_keys.under(path, job_keys.OPERATIONAL):
            overlay = deep_merge(overlay, nest(path, changed(get_path(cfg, path), LEAVES[path], path)))
    assert planned(work, tiny, overlay) == {}


# A shaping key -> the jobs it reruns on the tiny DAG (1 article, entigraph at one budget + Raw, base evaluated):
# the jobs that read it and every job downstream of them.
FIGS = {"fit_scaling": 1, "plot_scaling": 1, "all": 1}
EVAL = {"eval_qa": 3, "aggregate": 1, **FIGS}
CPT = {"cpt": 2, "eval_qa": 2, "aggregate": 1, **FIGS}
SHAPING = [
    ("figures.dpi", 100, {"plot_scaling": 1, "plot_diversity": 1, "all": 1}),
    ("figures.fit.n_starts", 5, {"fit_scaling": 1, "plot_scaling": 1, "all": 1}),
    ("evaluation.max_questions", 1, EVAL),
    ("cpt.lr", 1e-3, CPT),
    ("corpus.eos_token", "</s>", {"build_corpus": 2, **CPT}),
    ("synthesis.report.overlap_n", 2, {"synthesis_report": 1, "plot_diversity": 1, "synthesis_summary": 1,
                                       "all": 1}),
    ("synthesis.entigraph.max_triples", 2,
     {"synthesize": 1, "synthesis_report": 1, "build_corpus": 1, "plot_diversity": 1, "synthesis_summary": 1,
      **{**CPT, "cpt": 1, "eval_qa": 1}}),
]


@pytest.mark.parametrize("path,value,expected", SHAPING, ids=[s[0] for s in SHAPING])
def test_shaping_key_plans_exactly_the_affected_jobs(finished, path, value, expected):
    work, tiny = finished
    assert planned(work, tiny, nest(path, value)) == expected
