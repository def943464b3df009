"""One table from config keys to jobs (issue 13, item 1): workflow_scripts/job_keys.py.

Unit tests check the table against the schema: every key is classified, and no operational key reaches a job's
tracked --config-json. The workflow tests dry-run overlays on the session's finished tiny DAG (tests/conftest.py
tiny_dag: real stages, the offline generator, a tiny random model as CPT base): an overlay of operational keys
plans nothing; a shaping key plans exactly the jobs that read it and those downstream of them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
from pathlib import Path

import pytest
import yaml

from workflow_scripts import job_keys
from workflow_scripts.config import config_from_args, deep_merge, load_config, load_schema
from workflow_scripts.derived import filter_variants, imported, mixtures, trained_methods

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


def instances(cfg: dict, job: str) -> list[dict[str, str]]:
    """The wildcards of a job's instances in a config: its methods, variants, imports, mixtures or models."""
    methods = {"synthesize": cfg["synthesis"]["methods"], "filter_variant": list(filter_variants(cfg)),
               "import_corpus": list(imported(cfg)), "build_mixture": list(mixtures(cfg)),
               "build_corpus": ["raw"] + [m for m in trained_methods(cfg) if m not in mixtures(cfg)]}
    if job in methods:
        return [{"method": m} for m in methods[job]]
    if job.startswith("eval_"):
        return [{"model": m} for m in ["base", "raw-all"] + [f"api-{a['name']}" for a in cfg["evaluation"]["api_models"]]]
    return [{}]


def all_jobs(cfg: dict) -> dict[str, str]:
    """Every job's --config-json for a config (over its methods, derived corpora and evaluated models)."""
    out = {}
    for job in job_keys.JOBS:
        for wc in instances(cfg, job):
            out[f"{job}[{next(iter(wc.values()))}]" if wc else job] = job_keys.shaping_json(cfg, job, **wc)
    return out


@functools.lru_cache(maxsize=None)
def _configs() -> tuple[dict, ...]:
    return tuple(_make_configs())


def configs() -> list[dict]:
    return [copy.deepcopy(c) for c in _configs()]


@functools.lru_cache(maxsize=None)
def _jobs_of_configs() -> tuple[dict[str, str], ...]:
    """all_jobs of each of configs(), computed once: the reference every operational key's change is compared to."""
    return tuple(all_jobs(c) for c in configs())


OVERLAYS = ("cpu-judge", "cpu-curriculum", "cpu-instruct", "paper", "paper-batch")


def _make_configs() -> list[dict]:
    """The demo, one that samples with each remote/GPU engine (so their settings are read), the overlays that
    enable the filters, mixtures and instruction stages, and one with the strategies method, an imported corpus,
    a filtered import and a mixture with replay."""
    demo = load_config()
    vllm = load_config(overrides={"synthesis": {"backend": "vllm"},
                                  "evaluation": {"modes": ["loglik", "cot"], "cot": {"engine": "vllm"}}})
    api = load_config(overrides={
        "synthesis": {"backend": "openai", "methods": ["entigraph", "rephrase", "qa", "fam"],
                      "families": {"fam": {"templates": ["qa"]}}},
        "evaluation": {"api_models": [{"name": "gpt", "model": "gpt-4o", "engine": "openai", "modes": ["cot"]}]}})
    overlays = [load_config([ROOT / "config.yaml", ROOT / "experiments" / f"{o}.yaml"]) for o in OVERLAYS]
    derived = load_config(overrides=DERIVED)
    return [demo, vllm, api, *overlays, derived]


# Every kind of derived corpus, and a judge on its own engine and model.
DERIVED = {
    "synthesis": {"methods": ["entigraph", "strategies"]},
    "imports": {"released": {"path": "released.parquet"}},
    "filters": {"variants": {"released_clean": {"source": "released", "steps": ["heuristics", "dedup"]},
                             "strategies_judge": {"source": "strategies", "steps": ["judge"]}},
                "judge": {"backend": "openai", "model": {"source": "hf", "name": "judge-model"}}},
    "mixtures": {"mix": {"sources": {"released": 1, "replay": 1}}},
}


@pytest.mark.unit
def test_operational_paths_exist_in_the_schema():
    for path in job_keys.OPERATIONAL + job_keys.STRUCTURAL:
        assert any(leaf == path or leaf.startswith(path + ".") for leaf in LEAVES), path


def read_paths(cfg: dict) -> set[str]:
    """The config paths some job reads, over the config's methods, derived corpora and evaluated models."""
    out: set[str] = set()
    for job, reads in job_keys.JOBS.items():
        for wc in instances(cfg, job):
            r = reads(cfg, **wc)
            out.update(r.paths + list(r.values))
    return out


@pytest.mark.unit
def test_every_schema_key_is_classified():
    """A key is operational, read by no job (it decides which jobs exist), or read by some job."""
    read = set().union(*(read_paths(cfg) for cfg in configs()))
    unread = [leaf for leaf in LEAVES
              if not job_keys.under(leaf, job_keys.OPERATIONAL + job_keys.STRUCTURAL)
              and not any(job_keys.under(leaf, [p]) or p.startswith(leaf + ".") for p in read)]
    assert unread == []


@pytest.mark.unit
@pytest.mark.parametrize("path", [p for p in LEAVES if job_keys.under(p, job_keys.OPERATIONAL)])
def test_operational_key_changes_no_job_config(path):
    for cfg, before in zip(configs(), _jobs_of_configs()):
        after = all_jobs(set_path(cfg, path, changed(get_path(cfg, path), LEAVES[path], path)))
        assert after == before, path


@pytest.mark.unit
def test_operational_keys_reach_the_jobs_that_read_them():
    cfg = load_config()
    assert job_keys.operational(cfg, "cpt")["cpt"]["log_every"] == cfg["cpt"]["log_every"]
    assert job_keys.operational(cfg, "cpt")["cpt"]["threads"] == cfg["cpt"]["threads"]
    assert "threads" not in job_keys.shaping(cfg, "cpt")["cpt"]
    syn = job_keys.operational(cfg, "synthesize", method="rephrase")
    assert syn["backends"]["transformers"]["progress"] == cfg["backends"]["transformers"]["progress"]
    assert "progress" not in job_keys.shaping(cfg, "synthesize", method="rephrase")["backends"]["transformers"]


@pytest.mark.unit
def test_shaping_key_changes_the_jobs_that_read_it():
    cfg = load_config()
    before = all_jobs(cfg)
    # instruct_tune inherits the cpt section (workflow_scripts/instruct.py train_config); the LoRA twins (cpt_lora)
    # train at cpt.adapter.lr, and full CPT does not read the adapter's settings
    for path, jobs in [("cpt.lr", {"cpt", "instruct_tune"}), ("cpt.adapter.rank", {"cpt_lora", "instruct_tune"}), ("figures.dpi", {"plot_scaling", "plot_diversity"}),
                       ("figures.fit.n_starts", {"fit_scaling"}),
                       ("synthesis.entigraph.max_triples", {"synthesize[entigraph]"}),
                       ("synthesis.sampling.top_p", {"extract_entities", "synthesize[entigraph]",
                                                     "synthesize[rephrase]", "synthesis_report"}),
                       ("evaluation.max_questions", {"eval_qa[base]", "eval_qa[raw-all]", "eval_rag[base]",
                                                     "eval_rag[raw-all]"})]:
        after = all_jobs(set_path(cfg, path, changed(get_path(cfg, path), LEAVES[path], path)))
        assert {j for j in before if before[j] != after[j]} == jobs, path


@pytest.mark.unit
def test_resume_config_leaves_out_the_exempt_keys():
    cfg = load_config()
    rc = job_keys.resume_config(cfg, "cpt")
    assert rc["cpt"]["lr"] == cfg["cpt"]["lr"] and rc["seed"] == cfg["seed"]
    for key in ("micro_batch", "save_dtype", "probe", "fsdp", "gradient_checkpointing", "log_every", "budgets"):
        assert key not in rc["cpt"]


def overlay_config(name: str) -> dict:
    return configs()[3 + OVERLAYS.index(name)]


def derived_config() -> dict:
    return configs()[-1]


@pytest.mark.unit
@pytest.mark.parametrize("which,path,value,jobs", [
    ("derived", "filters.dedup.threshold", 0.5, {"filter_variant[released_clean]"}),
    ("derived", "filters.judge.threshold", 4.0, {"filter_variant[strategies_judge]"}),
    ("derived", "filters.resources.threads", 4, set()),
    ("derived", "imports.released.separator", "|", {"import_corpus[released]"}),
    ("derived", "mixtures.mix.order", "perplexity", {"build_mixture[mix]"}),
    ("derived", "cpt.replay.max_tokens", 1000, {"build_mixture[mix]", "cpt", "cpt_lora", "instruct_tune",
                                                "replay_pool"}),
    ("derived", "cpt.replay.rate", 0.5, {"cpt", "cpt_lora", "instruct_tune"}),
    # a format reaches only the corpora it applies to: its method's and a filtered variant's of that method
    ("derived", "corpus.document_format", {"strategies": "{text}", "entigraph": "{title}: {text}"},
     {"build_corpus[strategies]", "build_corpus[strategies_judge]", "build_corpus[entigraph]"}),
    ("derived", "corpus.document_format", {"strategies": "{title}\n{text}", "rephrase": "{text}"}, set()),
    ("demo", "instruct.summaries.max_articles", 1, {"summarize", "instruct_examples"}),
    ("demo", "instruct.examples.max_new_tokens", 7, {"instruct_examples"}),
    ("demo", "instruct.judge.max_claims", 7, {"judge_summaries", "judge_human_summaries"}),
    ("demo", "instruct.train", {"lr": 1e-5}, {"instruct_tune"}),
    ("demo", "instruct.data.max_examples", 5, {"instruct_corpus"}),
    ("demo", "cpt.allow_budget_cap", False, {"cpt", "cpt_lora"}),
    ("demo", "instruct.models", ["base"], set()),
    ("demo", "instruct.judge.human_summaries", "human.jsonl", set()),
    ("demo", "instruct.summaries.resources.mem_mb", 1, set()),
])
def test_derived_and_instruction_jobs_read_only_their_own_keys(which, path, value, jobs):
    """Each filter, import and mixture job reads its own entry; a corpus its own document format; the
    instruction jobs their own sub-sections (instruct.models and the human summaries only add or drop jobs)."""
    cfg = derived_config() if which == "derived" else load_config()
    before = all_jobs(cfg)
    after = all_jobs(set_path(cfg, path, value))
    assert {j for j in before if before[j] != after[j]} == jobs


def job_cfg(cfg: dict, job: str, **wc: str) -> dict:
    """The config a job's stage sees: its --config-json and --ops-json through config_from_args."""
    args = argparse.Namespace(configfile=None, config_json=job_keys.shaping_json(cfg, job, **wc),
                              ops_json=job_keys.operational_json(cfg, job, **wc))
    return config_from_args(args)


@pytest.mark.unit
def test_filter_and_mixture_jobs_receive_what_their_modules_read():
    from workflow_scripts import filters

    for cfg, variant in [(overlay_config("cpu-judge"), "entigraph_judge"), (derived_config(), "strategies_judge"),
                         (derived_config(), "released_clean")]:
        jc = job_cfg(cfg, "filter_variant", method=variant)
        steps = cfg["filters"]["variants"][variant]["steps"]
        assert jc["filters"]["variants"] == {variant: cfg["filters"]["variants"][variant]}
        for step in steps:
            assert jc["filters"][step] == cfg["filters"][step], step
        if "judge" in steps:
            assert filters.judge_settings(jc) == filters.judge_settings(cfg)
        if {"dedup", "judge"} & set(steps):
            assert jc["seed"] == cfg["seed"]
        assert jc["synthesis"]["report"] == cfg["synthesis"]["report"]
        assert jc["synthesis"]["sampling"]["seed"] == cfg["synthesis"]["sampling"]["seed"]
    cfg = derived_config()
    jc = job_cfg(cfg, "import_corpus", method="released")
    assert jc["imports"] == {"released": cfg["imports"]["released"]}
    jc = job_cfg(cfg, "build_mixture", method="mix")
    assert jc["mixtures"] == {"mix": cfg["mixtures"]["mix"]} and jc["cpt"]["block_size"] == cfg["cpt"]["block_size"]
    for key in ("source", "text_field", "max_tokens"):
        assert jc["cpt"]["replay"][key] == cfg["cpt"]["replay"][key], key


@pytest.mark.unit
def test_corpus_jobs_receive_their_own_document_format_and_every_other_corpus_key():
    cfg = derived_config()
    fmt = cfg["corpus"]["document_format"]["strategies"]
    for method, formats in [("strategies", {"strategies": fmt}), ("strategies_judge", {"strategies_judge": fmt}),
                            ("entigraph", {}), ("released_clean", {})]:
        jc = job_cfg(cfg, "build_corpus", method=method)
        assert jc["corpus"] == {**cfg["corpus"], "document_format": formats}, method
        assert jc["seed"] == cfg["seed"]


@pytest.mark.unit
def test_instruction_jobs_receive_what_their_modules_read():
    from workflow_scripts import claims, instruct, summaries

    for cfg in (overlay_config("cpu-instruct"), overlay_config("paper"),
                set_path(load_config(), "instruct.judge.model", {"source": "hf", "name": "judge"})):
        assert instruct.train_config(job_cfg(cfg, "instruct_tune")) == instruct.train_config(cfg)
        jc = job_cfg(cfg, "instruct_corpus")
        assert jc["instruct"]["data"] == cfg["instruct"]["data"] and jc["seed"] == cfg["seed"]
        assert jc["instruct"]["chat_template_from"] == cfg["instruct"]["chat_template_from"]
        assert {k: v for k, v in jc["corpus"].items() if k not in ("bos_token", "eos_token", "document_format")} \
            == {k: v for k, v in cfg["corpus"].items() if k not in ("bos_token", "eos_token", "document_format")}
        for job in ("judge_summaries", "judge_human_summaries"):
            jc = job_cfg(cfg, job)
            assert claims.judge_engine_settings(jc) == claims.judge_engine_settings(cfg)
            assert {k: v for k, v in jc["instruct"]["judge"].items() if k != "human_summaries"} \
                == {k: v for k, v in cfg["instruct"]["judge"].items() if k != "human_summaries"}
        articles = [{"uid": "a1", "title": "The Title", "author": "Doe, Jane", "text": "Text."}]
        for job in ("summarize", "instruct_examples"):
            jc = job_cfg(cfg, job)
            assert jc["instruct"]["summaries"] == cfg["instruct"]["summaries"]
            assert jc["backends"][cfg["instruct"]["summaries"]["engine"]] \
                == cfg["backends"][cfg["instruct"]["summaries"]["engine"]]
            assert [t["id"] for t in summaries.summary_tasks(jc, "m", articles)] \
                == [t["id"] for t in summaries.summary_tasks(cfg, "m", articles)]
        assert job_cfg(cfg, "instruct_examples")["instruct"]["examples"] == cfg["instruct"]["examples"]


@pytest.mark.unit
def test_summary_ids_ignore_the_operational_keys():
    """Summary ids seed the sampling: threads and resources must not change them (they rerun nothing)."""
    from workflow_scripts import summaries

    cfg = load_config()
    articles = [{"uid": "a1", "title": "The Title", "author": "Doe, Jane", "text": "Text."}]
    ids = [t["id"] for t in summaries.summary_tasks(cfg, "m", articles)]
    ops = set_path(set_path(cfg, "instruct.summaries.threads", 8), "instruct.summaries.resources.gpu", 1)
    assert [t["id"] for t in summaries.summary_tasks(ops, "m", articles)] == ids
    other = set_path(cfg, "instruct.summaries.temperature", 0.5)
    assert [t["id"] for t in summaries.summary_tasks(other, "m", articles)] != ids


# ------------------------------------------------------------------------------------------ workflow
@pytest.fixture(scope="module")
def finished(tiny_dag):
    """The session's finished tiny DAG (tests/conftest.py tiny_dag: real stages, the offline generator, a tiny
    random Llama as CPT base, a dedup-filtered EntiGraph variant whose report only is built)."""
    return tiny_dag


def planned(dag, overlay: dict, tmp_path: Path) -> dict[str, int]:
    """Jobs (rule -> count) that `snakemake -n` plans with `overlay` on top of the finished config. The overlay
    file is written outside the project folder (whose contents tests/test_deploy.py asserts on)."""
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    r = dag.snakemake("-n", "--cores", "1", "--configfile", "tiny.yaml", str(tmp_path / "overlay.yaml"))
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


@pytest.mark.e2e
def test_finished_dag_plans_nothing(finished, tmp_path):
    assert planned(finished, {}, tmp_path) == {}


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["cpt.log_every", "cpt.threads", "cpt.resources.mem_mb", "filters.resources.threads",
                                  "filters.resources.mem_mb"])
def test_named_operational_key_plans_nothing(finished, path, tmp_path):
    """The issue's defect: changing only cpt.log_every, cpt.threads or a resources value retrained every model."""
    cfg = load_config([ROOT / "config.yaml", finished.project / "tiny.yaml"])
    assert planned(finished, nest(path, changed(get_path(cfg, path), LEAVES[path], path)), tmp_path) == {}


@pytest.mark.e2e
def test_all_operational_keys_together_plan_nothing(finished, tmp_path):
    cfg = load_config([ROOT / "config.yaml", finished.project / "tiny.yaml"])
    overlay: dict = {}
    for path in LEAVES:
        if job_keys.under(path, job_keys.OPERATIONAL):
            overlay = deep_merge(overlay, nest(path, changed(get_path(cfg, path), LEAVES[path], path)))
    assert planned(finished, overlay, tmp_path) == {}


# A shaping key -> the jobs it reruns on the tiny DAG (1 article, entigraph at two budgets + Raw with replay, base
# evaluated, a dedup-filtered entigraph whose report only is built):
# the jobs that read it and every job downstream of them.
FIGS = {"fit_scaling": 1, "plot_scaling": 1, "all": 1}
EVAL = {"eval_qa": 4, "aggregate": 1, **FIGS}  # base, raw-all, entigraph-16, entigraph-32
CPT = {"cpt": 3, "eval_qa": 3, "aggregate": 1, **FIGS}  # raw-all, entigraph-16, entigraph-32
SHAPING = [
    ("figures.dpi", 100, {"plot_scaling": 1, "plot_diversity": 1, "all": 1}),
    ("figures.fit.n_starts", 5, {"fit_scaling": 1, "plot_scaling": 1, "all": 1}),
    ("evaluation.max_questions", 1, EVAL),
    ("cpt.lr", 1e-3, CPT),
    ("corpus.eos_token", "</s>", {"build_corpus": 2, "replay_pool": 1, **CPT}),  # the pool is tokenized too
    ("synthesis.report.overlap_n", 2, {"synthesis_report": 1, "filter_variant": 1, "plot_diversity": 1,
                                       "synthesis_summary": 1, "all": 1}),
    ("synthesis.entigraph.max_triples", 2,
     {"synthesize": 1, "synthesis_of_article": 1, "synthesis_report": 1, "filter_variant": 1, "build_corpus": 1,
      "plot_diversity": 1, "synthesis_summary": 1, **{**CPT, "cpt": 2, "eval_qa": 2}}),  # entigraph's models
    ("filters.dedup.threshold", 0.5, {"filter_variant": 1, "plot_diversity": 1, "all": 1}),
]


@pytest.mark.e2e
@pytest.mark.parametrize("path,value,expected", SHAPING, ids=[s[0] for s in SHAPING])
def test_shaping_key_plans_exactly_the_affected_jobs(finished, path, value, expected, tmp_path):
    assert planned(finished, nest(path, value), tmp_path) == expected
