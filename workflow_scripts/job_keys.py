"""Which config keys shape each job, and which are operational: the one table the rules and the resume
fingerprints read (docs/architecture.md, "Config keys and jobs").

A job *reads* some config paths (dotted, e.g. `cpt` or `synthesis.sampling`; a path stands for its whole subtree).
What it reads splits in two:
- **shaping** keys change what the job writes. The rules pass them as a tracked param (`--config-json`), so a
  change reruns exactly the jobs that read it (and, through their outputs, the jobs downstream).
- **operational** keys change only how the job runs or reports: threads, resources, logging, progress bars,
  checkpoint cadence, engine start-up and throughput levers that leave the numbers as they are. The rules pass
  them as an untracked param (`--ops-json`; see `rules/common.smk` `ops_param`), so changing them on a finished
  workflow plans nothing.
Keys that only decide *which* jobs exist (the budget lists, synthesis.methods, evaluation.rag.enabled, the
planner) are read by no job: adding a budget plans the new model without retraining the others.

A resume fingerprint (a CPT checkpoint) hashes `resume_config`: the shaping keys less those a resumed run may
change because they act only after the loop or on memory layout (`RESUME_EXEMPT`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Callable

# Keys that never change what any job writes (dotted paths; a path covers its subtree).
OPERATIONAL: tuple[str, ...] = (
    # how many threads, GPUs, how much memory and time a job gets
    "synthesis.resources", "cpt.resources", "evaluation.resources", "cpt.threads", "evaluation.threads",
    # logging, progress and checkpoint cadence
    "cpt.log_every", "cpt.checkpoint_every", "cpt.checkpoint_minutes", "cpt.keep_checkpoints", "cpt.delete_checkpoints",
    "backends.transformers.progress", "backends.vllm.progress", "backends.openai.progress",
    # throughput levers that leave the numbers as they are (benchmarks/RESULTS.md measures the equality)
    "corpus.tokenize_batch", "cpt.replay.cache_dir", "evaluation.loglik.batch_questions", "evaluation.loglik.reuse_prefix_cache",
    "backends.transformers.batch_size", "backends.transformers.max_prefix_reuse",
    "backends.transformers.num_threads", "backends.vllm.chunk_size", "backends.vllm.enable_prefix_caching",
    "backends.openai.max_concurrency",
    # where a job runs and how an engine starts or retries
    "evaluation.device", "backends.transformers.device", "backends.vllm.tensor_parallel_size",
    "backends.vllm.gpu_memory_utilization", "backends.vllm.enforce_eager", "backends.openai.api_key_env",
    "backends.vllm.cpu_kvcache_space_gib", "backends.openai.max_retries", "backends.openai.timeout_s", "backends.openai.backoff_base_s",
    "backends.openai.backoff_max_s", "evaluation.rag.embedding_endpoint.api_key_env",
    "evaluation.rag.embedding_endpoint.batch_size", "evaluation.rag.embedding_endpoint.timeout_s",
    "evaluation.rag.rerank.api_key_env", "evaluation.rag.rerank.timeout_s",
    # a Batch API's waiting, polling, retries and batch sizes (which requests share a batch changes no text)
    "backends.openai_batch.api_key_env", "backends.openai_batch.completion_window",
    "backends.openai_batch.poll_interval_s", "backends.openai_batch.max_wait_s",
    "backends.openai_batch.max_batch_tries", "backends.openai_batch.max_requests_per_batch",
    "backends.openai_batch.max_batch_bytes", "backends.openai_batch.max_retries", "backends.openai_batch.timeout_s",
    "backends.openai_batch.backoff_base_s", "backends.openai_batch.backoff_max_s", "backends.openai_batch.progress",
    # the derived corpora and the instruction stages (rules/filters.smk, rules/instruct.smk)
    "filters.resources", "instruct.resources", "instruct.summaries.threads", "instruct.summaries.resources",
)

# Keys read by no job: they decide which jobs exist (the budget lists, the methods, the RAG switch and its model
# list, the instruction stages' switch and models), which file a job reads (the human summaries, an input of their
# judging), or only feed the planner (python -m workflow_scripts.plan). The names under filters.variants, imports
# and mixtures are structural too: each of their jobs reads only its own entry.
STRUCTURAL: tuple[str, ...] = ("cpt.budgets", "cpt.method_budgets", "cpt.budget_unit", "cpt.compare_adapter",
                               "synthesis.methods",
                               "synthesis.articles_per_job", "evaluation.rag.enabled",
                               "evaluation.rag.models", "planner", "instruct.enabled", "instruct.models",
                               "instruct.judge.human_summaries")

# Shaping keys a resumed CPT run may change: they act after the loop (the saved dtype, the forgetting probe) or
# only on the memory layout of the same optimisation (micro-batches, FSDP, activation checkpointing).
RESUME_EXEMPT: dict[str, tuple[str, ...]] = {
    "cpt": ("cpt.micro_batch", "cpt.save_dtype", "cpt.probe", "cpt.fsdp", "cpt.gradient_checkpointing"),
}


@dataclass
class Reads:
    """What one job reads: config paths (subtrees), paths under them it does not read, and values it sees in
    place of the config's (a list narrowed to the job's own entry)."""

    paths: list[str]
    exclude: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def _synthesis_engine(cfg: dict) -> list[str]:
    backend = cfg["synthesis"]["backend"]
    return ["models.generator", f"backends.{backend}", "synthesis.backend", "synthesis.sampling"]


def _extract(cfg: dict) -> Reads:
    """extract_entities: the generator, its engine, sampling and the extraction keys (a pair cap re-extracts
    nothing)."""
    eg = [f"synthesis.entigraph.{k}" for k in cfg["synthesis"]["entigraph"]
          if k.startswith("extraction_") or k in ("max_entity_chars", "max_entities")]
    return Reads(_synthesis_engine(cfg) + ["synthesis.resources"] + eg)


def _synthesize(cfg: dict, method: str) -> Reads:
    """synthesize: the generator, engine, sampling, the failure allowance and the method's own section."""
    syn = cfg["synthesis"]
    own = ([f"synthesis.families.{method}"] if method in (syn.get("families") or {})
           else [f"synthesis.{method}"] if method in syn else [])
    return Reads(_synthesis_engine(cfg) + ["synthesis.resources", "synthesis.max_failed_fraction"] + own)


def _evaluate(cfg: dict, model: str, rag: bool = False) -> Reads:
    """eval_qa / eval_rag of one model: the evaluation keys (RAG's only for RAG jobs; the API and external lists
    narrowed to this model), and the engine's settings when the model is sampled (cot)."""
    ev = cfg["evaluation"]
    api = next((a for a in ev["api_models"] if f"api-{a['name']}" == model), None)
    ext = next((e for e in ev.get("external_models") or [] if f"ext-{e['name']}" == model), None)
    if api is not None:
        modes, engine = api["modes"], api["engine"]
    else:
        modes = (ev["rag"]["modes"] or ev["modes"]) if rag else ev["modes"]
        engine = ev["cot"]["engine"]
    paths = ["seed", "evaluation"] + ([f"backends.{engine}"] if "cot" in modes else [])
    return Reads(paths, exclude=list(STRUCTURAL) + ([] if rag else ["evaluation.rag"]),
                 values={"evaluation.api_models": [api] if api is not None else [],
                         "evaluation.external_models": [ext] if ext is not None else []})


def _corpus(cfg: dict, method: str) -> Reads:
    """build_corpus of one method: the seed and the corpus settings, with only the document format that applies to
    this method (its own, else a filtered variant's source's; `{}` when none does), so that a format added for
    another method reruns nothing."""
    formats = cfg["corpus"].get("document_format") or {}
    source = ((cfg.get("filters") or {}).get("variants") or {}).get(method, {}).get("source")
    fmt = formats.get(method) or formats.get(source)
    return Reads(["seed", "corpus"], values={"corpus.document_format": {method: fmt} if fmt else {}})


def _filter(cfg: dict, method: str) -> Reads:
    """filter_variant: the variant's own entry and the settings of its steps (other variants rerun nothing), the
    seed (dedup, judge), the report keys of the kept corpus' report, and for a judge its engine and model."""
    f = cfg["filters"]
    steps = list(f["variants"][method]["steps"])
    paths = ([f"filters.variants.{method}", "filters.resources"] + [f"filters.{s}" for s in steps]
             + ["synthesis.report", "synthesis.sampling.seed"]
             + (["seed"] if {"dedup", "judge"} & set(steps) else []))
    if "judge" in steps:
        judge = f["judge"]
        paths += ([f"backends.{judge['backend'] or cfg['synthesis']['backend']}"]
                  + ([] if judge["backend"] else ["synthesis.backend"])
                  + ([] if judge["model"] else ["models.generator"]))
    return Reads(paths)


def _mixture(cfg: dict, method: str) -> Reads:
    """build_mixture: the mixture's own entry and the block size; the general-text source when replay is one of
    its sources (cpt.replay.rate is CPT's, not the mixture's)."""
    paths = [f"mixtures.{method}", "cpt.block_size"]
    if "replay" in cfg["mixtures"][method]["sources"]:
        paths += ["cpt.replay.source", "cpt.replay.text_field", "cpt.replay.max_tokens"]
    return Reads(paths)


INSTRUCT_METHOD = "instruct"  # the instruction corpus' method name (workflow_scripts/instruct.py METHOD)


def _instruct_corpus(cfg: dict) -> Reads:
    """instruct_corpus: the data and chat template keys, and the corpus settings it packs with (its own document
    format only; no BOS/EOS: the chat template marks the conversations)."""
    fmt = (cfg["corpus"].get("document_format") or {}).get(INSTRUCT_METHOD)
    return Reads(["seed", "corpus", "instruct.data", "instruct.chat_template_from"],
                 exclude=["corpus.bos_token", "corpus.eos_token"],
                 values={"corpus.document_format": {INSTRUCT_METHOD: fmt} if fmt else {}})


def _judge(cfg: dict) -> Reads:
    """judge_summaries / judge_human_summaries: the judge keys, its engine and (by default) the generator model."""
    judge = cfg["instruct"]["judge"]
    return Reads(["instruct.judge", f"backends.{judge['engine']}"] + ([] if judge["model"] else ["models.generator"]),
                 exclude=list(STRUCTURAL))


def _summaries(cfg: dict, *sections: str) -> Reads:
    """summarize / instruct_examples: instruct.summaries (the engine, sampling and the prompts, which name every
    record) and the engine's settings."""
    return Reads(["instruct.summaries", *(f"instruct.{s}" for s in sections),
                  f"backends.{cfg['instruct']['summaries']['engine']}"])


def _cpt(adapter: dict) -> Reads:
    """cpt / cpt_lora: the seed and the cpt keys less the budget lists, with `adapter` as cpt.adapter. Full CPT
    (kind none) reads only the adapter's kind, so tuning the LoRA twins' settings retrains no full model; an adapter
    run with its own peak LR (cpt.adapter.lr) does not read cpt.lr (workflow_scripts/lora.py resolve)."""
    if adapter["kind"] == "none":
        skip = [f"cpt.adapter.{k}" for k in adapter if k != "kind"]
    else:
        skip = ["cpt.lr"] if adapter.get("lr") is not None else []
    return Reads(["seed", "cpt"], exclude=list(STRUCTURAL) + skip, values={"cpt.adapter": adapter})


FIGURE_KEYS = {
    "fit_scaling": ("fit", "accuracy_scale", "x_axis", "fraction_scale"),
    "plot_scaling": ("style", "dpi", "figsize", "formats", "paper_reference", "show_fit", "show_chance", "modes",
                     "accuracy_scale", "x_axis", "fraction_scale"),
    "plot_diversity": ("style", "dpi", "diversity_figsize", "formats"),
}
# The titles of the plots name the run, the models and the data selection.
_PLOT_CONTEXT = ["run_name", "models", "data"]

# Every job that reads config: rule name -> what it reads (a function of the config and the job's wildcards).
JOBS: dict[str, Callable[..., Reads]] = {
    # download_quality passes its two keys as the rule's own params (--url, --sha256)
    "download_quality": lambda cfg: Reads(["data.quality.url", "data.quality.sha256"]),
    "prepare_articles": lambda cfg: Reads(["data"]),
    "extract_entities": _extract,
    "synthesize": _synthesize,
    "synthesis_report": lambda cfg: Reads([f"synthesis.{k}" for k in ("prices", "report", "sampling", "backend")]),
    "build_corpus": _corpus,
    # derived corpora (rules/filters.smk, rules/mixture.smk): each job reads its own variant, import or mixture
    "filter_variant": _filter,
    "import_corpus": lambda cfg, method: Reads([f"imports.{method}"]),
    "build_mixture": _mixture,
    # passes cpt.micro_batch as the rule's own param (--micro-batch)
    "corpus_difficulty": lambda cfg: Reads(["cpt.micro_batch", "cpt.threads", "cpt.resources"]),
    # the run's replay pool (rules/replay.smk): the replay source's settings, the held-out probe's size, the
    # seed and the corpora's document boundaries
    "replay_pool": lambda cfg: Reads(["seed", "cpt.seed", "cpt.replay.source", "cpt.replay.text_field",
                                      "cpt.replay.heldout_fraction", "cpt.replay.max_tokens", "cpt.probe.source",
                                      "cpt.probe.max_tokens", "corpus.bos_token", "corpus.eos_token"]),
    # the budget lists only decide which models exist
    "cpt": lambda cfg: _cpt(cfg["cpt"]["adapter"]),
    # a LoRA twin (cpt.compare_adapter): the same keys with cpt.adapter as kind lora (workflow_scripts/lora.py)
    "cpt_lora": lambda cfg: _cpt({**cfg["cpt"]["adapter"], "kind": "lora"}),
    "eval_qa": lambda cfg, model: _evaluate(cfg, model),
    "eval_rag": lambda cfg, model: _evaluate(cfg, model, rag=True),
    "fit_scaling": lambda cfg: Reads([f"figures.{k}" for k in FIGURE_KEYS["fit_scaling"]]),
    "plot_scaling": lambda cfg: Reads([f"figures.{k}" for k in FIGURE_KEYS["plot_scaling"]] + _PLOT_CONTEXT),
    "plot_diversity": lambda cfg: Reads([f"figures.{k}" for k in FIGURE_KEYS["plot_diversity"]] + _PLOT_CONTEXT),
    # the instruction stages (rules/instruct.smk): the same keys for every instruct model
    "instruct_corpus": _instruct_corpus,
    # the cpt section less its scaling-curve keys, as workflow_scripts/instruct.py train_config inherits it
    "instruct_tune": lambda cfg: Reads(["seed", "cpt", "instruct.train", "instruct.chat_template_from",
                                        "instruct.resources"], exclude=list(STRUCTURAL) + ["cpt.allow_budget_cap"]),
    "summarize": lambda cfg: _summaries(cfg),
    "instruct_examples": lambda cfg: _summaries(cfg, "examples"),
    "judge_summaries": _judge,
    "judge_human_summaries": _judge,
    # passes the run's name in the figure title as the rule's own param (--title)
    "claims_table": lambda cfg: Reads(["run_name"]),
}


# ---------------------------------------------------------------------------------------------- selection
def under(path: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """Whether the dotted `path` is one of `prefixes` or lies in one of their subtrees, i.e. whether one of the
    path's dotted ancestors (itself included) is a prefix. (Called for every config leaf of every job: a set of the
    few ancestors beats testing each of the many prefixes.)"""
    parts = path.split(".")
    return not {".".join(parts[:i]) for i in range(1, len(parts) + 1)}.isdisjoint(prefixes)


def _get(cfg: dict, path: str) -> tuple[bool, Any]:
    cur: Any = cfg
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _put(out: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[last] = copy.deepcopy(value)


def _replaced(cfg: dict, path: str, value: Any) -> dict:
    """A copy of `cfg` with `path` set to `value`; only the dicts along the path are copied (the rest is shared
    and only read)."""
    head, _, rest = path.partition(".")
    out = dict(cfg)
    out[head] = _replaced(cfg.get(head) or {}, rest, value) if rest else value
    return out


def _select(value: Any, path: str, keep: Callable[[str], bool], out: dict) -> None:
    """Copy the leaves of `value` (at `path`) for which keep(path) holds into `out`. A dict whose keys are data
    (e.g. families by name) is walked like any other; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _select(v, f"{path}.{k}", keep, out)
    elif keep(path):
        _put(out, path, value)


def _split(cfg: dict, job: str, operational: bool, **wildcards: str) -> dict:
    reads = JOBS[job](cfg, **wildcards)
    view = cfg
    for path, value in reads.values.items():
        view = _replaced(view, path, value)
    out: dict = {}
    for path in reads.paths:
        found, value = _get(view, path)
        if found:
            _select(value, path, lambda p: not under(p, reads.exclude) and under(p, OPERATIONAL) == operational,
                    out)
    return out


def shaping(cfg: dict, job: str, **wildcards: str) -> dict:
    """The config values that shape `job`'s outputs (a config-shaped dict): the rule's tracked --config-json."""
    return _split(cfg, job, False, **wildcards)


def operational(cfg: dict, job: str, **wildcards: str) -> dict:
    """The operational config values `job` reads (threads, logging, engine start-up): the rule's untracked
    --ops-json."""
    return _split(cfg, job, True, **wildcards)


def shaping_json(cfg: dict, job: str, **wildcards: str) -> str:
    return json.dumps(shaping(cfg, job, **wildcards), sort_keys=True)


def operational_json(cfg: dict, job: str, **wildcards: str) -> str:
    return json.dumps(operational(cfg, job, **wildcards), sort_keys=True)


def resume_config(cfg: dict, job: str, **wildcards: str) -> dict:
    """The part of `job`'s shaping config that a resumed run must share with the checkpoint it resumes."""
    exempt = RESUME_EXEMPT.get(job, ())
    out: dict = {}
    for key, value in shaping(cfg, job, **wildcards).items():
        _select(value, key, lambda p: not under(p, exempt), out)
    return out


def shaping_part(cfg: dict, path: str) -> Any:
    """The config value at `path` less its operational keys (e.g. an engine's settings as they shape texts)."""
    found, value = _get(cfg, path)
    if not found:
        return None
    out: dict = {}
    _select(value, path, lambda p: not under(p, OPERATIONAL), out)
    found, kept = _get(out, path)
    return kept if found else ({} if isinstance(value, dict) else None)
