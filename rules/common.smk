# Small functions that compute inputs and params from config: the only logic in the rules layer.
import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from workflow_scripts import job_keys, layout
from workflow_scripts.config import ROOT, ConfigError, check_budgets, missing_engine_message, validate_config
from workflow_scripts.derived import check_methods, filter_variants, imported, method_kind, mixtures
from workflow_scripts.memory import memory_problems
from workflow_scripts.preflight import judge_gpus, tensor_parallel_problem, vllm_rule_names
from workflow_scripts.replay import general_text_sources, missing_sources

# The schema check of the stage command lines (defaults filled in); a config that fails it (a file, or a
# --config value) stops planning with a WorkflowError of one line naming each key, not a validation dump (and not
# sys.exit, which would end a program that parses the workflow through Snakemake's API).
try:
    validate_config(config)
    check_budgets(config)
    check_methods(config)
    if tensor_parallel_problem(config):
        raise ConfigError(tensor_parallel_problem(config))
except ConfigError as e:
    raise WorkflowError(str(e)) from None

# Rules run `python -m workflow_scripts.<stage>`. The package is found through PYTHONPATH at the workflow's own
# folder (WORKFLOW_ROOT, where this Snakefile's workflow_scripts/ lives), never the working folder, so the workflow
# runs from a user's project folder (--directory) and as a module. Without --use-conda the interpreter must be the
# one running Snakemake (the README's .venv), also when .venv/bin/snakemake is called without activating the venv;
# with --use-conda the env's activation puts its own python first, so PATH is left alone.
WORKFLOW_ROOT = str(ROOT)
_PREFIX = (
    "set -euo pipefail; export TOKENIZERS_PARALLELISM=false; "
    f'export PYTHONPATH={shlex.quote(WORKFLOW_ROOT)}"${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; '  # braces doubled: the prefix is formatted
)
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _PREFIX += f'export PATH={shlex.quote(os.path.dirname(sys.executable))}:"$PATH"; '
shell.prefix(_PREFIX)


# A run whose config needs vLLM stops before its first job, in one line, when the interpreter lacks it (--use-conda
# jobs get it from envs/synthesis-vllm.yaml instead). onstart runs for real runs only: a dry run (planning a
# GPU config on a laptop) and the tests' parsing of every overlay stay possible without vLLM.
# The memory check (workflow_scripts/memory.py; planner.memory_check: false overrides) refuses a run whose GPU jobs
# cannot fit planner.gpu_type, one line per job naming the cheapest fix; and one whose general-text files (replay,
# probe) are missing, one line per key (workflow_scripts/replay.py missing_sources).
onstart:
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        _missing_engine = missing_engine_message(config)
        if _missing_engine:
            sys.exit(f"error: {_missing_engine}")
    # the general-text files matter only to a run that has jobs reading them (preparing the data needs none)
    _jobs = {job.rule.name for job in workflow.dag.needrun_jobs()} if workflow.dag is not None else None
    _reads_text = _jobs is None or bool(_jobs & GENERAL_TEXT_RULES)
    _memory = memory_problems(config) + (missing_sources(config) if _reads_text else [])
    if _memory:
        sys.exit("\n".join(f"error: {line}" for line in _memory))


# A GPU job's program runs through the pre-flight check (workflow_scripts/preflight.py): on a workstation it takes
# GPUs of its own (CUDA_VISIBLE_DEVICES), and it stops in one line, exit 2, when torch, the driver or the vLLM build
# does not fit the device. A CPU job (gpu=0) runs its program directly.
VLLM_RULES = vllm_rule_names(config)


def training_threads(res):
    """Snakemake threads (the scheduler's CPUs) of a training job: cpt.threads per process, times the CPU processes
    of a CPU job (cpt.resources.cpu_processes; a GPU job's processes come with its GPUs' CPUs)."""
    per_process = int(config["cpt"]["threads"])
    return per_process * (layout.training_processes(res) if int(res.get("gpu", 0)) == 0 else 1)


def training_launch(res):
    """Shell launcher of a training job: python, or torchrun with one process per GPU or per CPU process."""
    return layout.training_launcher(layout.training_processes(res))


def gpu_guard(rule):
    """Shell prefix of `rule`'s program: the pre-flight check when the job asks for GPUs (with --vllm when the rule
    runs vLLM under this config), nothing for a CPU job."""
    flag = " --vllm" if rule in VLLM_RULES else ""
    return lambda wc, resources: (
        f"python -m workflow_scripts.preflight --gpus {resources.gpu}{flag} -- " if int(resources.gpu) > 0 else ""
    )


# The general-text files (replay, probe) that exist, by config key: rule inputs, so a changed file reruns its jobs.
# A missing one is no input, so that a dry run plans a config whose data is not downloaded yet; a real run stops on
# it in one line (onstart above).
GENERAL_TEXT = {key: path for key, path in general_text_sources(config).items() if os.path.exists(path)}
# The rules whose jobs read them (onstart checks the files only when one of these is to run).
GENERAL_TEXT_RULES = {"cpt", "cpt_lora", "replay_pool", "build_mixture", "instruct_tune"}


# The shared names (paths, model ids, model lists, final targets) live in workflow_scripts/layout.py; the
# functions below bind them to this run's config.
ARTICLES = layout.ARTICLES
QUESTIONS = layout.QUESTIONS
LOGS = layout.LOGS

# Each stage file adds its final outputs (layout.stage_targets); the Snakefile's default target asks for them.
ALL_TARGETS = []


def all_targets():
    return ALL_TARGETS


def job_config(job, *wildcards):
    """--config-json of a job: the config keys that shape its outputs (workflow_scripts/job_keys.py), for the job
    as named by `wildcards` (e.g. "method"). A tracked param: changing one of them reruns exactly the jobs that
    read it. Always a function: Snakemake formats a plain string param with the wildcards, and config values may
    hold braces (corpus.document_format's "{title}")."""
    return lambda wc: job_keys.shaping_json(config, job, **{w: wc[w] for w in wildcards})


def job_ops(job, *wildcards):
    """--ops-json of a job: the operational keys it reads (threads, logging, engine start-up). Snakemake does not
    track params computed from `resources` (it counts them as derived from the job), so changing an operational
    key on a finished workflow plans nothing."""
    return lambda wc, resources: job_keys.operational_json(config, job, **{w: wc[w] for w in wildcards})


def model_location(role):
    """Folder or hub id for models.<role> (base | generator), as workflow_scripts.models resolves it."""
    return layout.model_location(config["models"][role])


def model_input(role):
    """Rule input for a model: the converted folder for packaged/local models, nothing for hub ids."""
    return layout.model_inputs(config, role)


_UIDS = {}  # (path, mtime_ns) -> uids: input functions ask once per job, the file is read once per version


def article_uids(wildcards=None):
    """Article uids of the prepared corpus (known once the prepare_articles checkpoint has run)."""
    path = checkpoints.prepare_articles.get().output.articles
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _UIDS:
        with open(path, encoding="utf-8") as f:
            _UIDS[key] = [json.loads(line)["uid"] for line in f if line.strip()]
    return list(_UIDS[key])


# ---- the cross-stage vocabulary: methods, budgets, model ids (workflow_scripts/layout.py) ----
def synth_methods():
    return layout.synth_methods(config)


def budgets(method=None):
    return layout.budgets(config, method)


def model_id(method, budget):
    return layout.model_id(method, budget)


def cpt_models():
    return layout.cpt_models(config)


def model_dir(mid):
    return layout.model_dir(mid, config)


# ---- derived corpora (rules/filters.smk, rules/mixture.smk; workflow_scripts/derived.py) ----
def method_records(method):
    """The record files a method's corpus is built from: the articles (raw), a filtered or imported records.jsonl,
    or the synthesis shards of every article."""
    kind = method_kind(config, method)
    if kind == layout.RAW:
        return [ARTICLES]
    if kind in ("filtered", "imported"):
        return [layout.derived_records(kind, method)]
    return [f"{layout.SYNTH}/{method}/{u}.jsonl" for u in article_uids()]


def mixture_corpora(name):
    """SOURCE=FOLDER of every source of a mixture that is a corpus (replay is read from cpt.replay.source)."""
    return {s: f"{layout.CORPUS}/{s}" for s in mixtures(config)[name]["sources"] if s != "replay"}


def local_model_input(spec):
    """A model spec's folder as a rule input when it is local (a packaged or path model), none for hub ids."""
    return [layout.model_location(spec)] if spec["source"] in ("package", "path") else []


def filter_judge_model_input(variant):
    """The filter judge's model folder when the variant runs the judge on a local model."""
    if "judge" not in filter_variants(config)[variant]["steps"]:
        return []
    return local_model_input(config["filters"]["judge"]["model"] or config["models"]["generator"])


# ---- data stage (rules/data.smk) ----
def prepare_inputs(wildcards):
    src = config["data"]["source"]
    if src == "quality":
        return {"zip": layout.QUALITY_ZIP}
    custom = config["data"]["custom"]
    return {"corpus": custom["path"], **({"questions": custom["questions"]} if custom["questions"] else {})}


# ---- evaluation stage (rules/evaluation.smk) ----
EVAL = config["evaluation"]
EVAL_RES = EVAL["resources"]
QA_DIR = layout.QA_DIR
RAG_DIR = layout.RAG_DIR
# vLLM cannot share an environment with the CPU pins (envs/eval.yaml explains): CoT on vllm uses its env.
EVAL_ENV = (
    "../envs/synthesis-vllm.yaml" if "cot" in EVAL["modes"] and EVAL["cot"]["engine"] == "vllm" else "../envs/eval.yaml"
)


def eval_models():
    return layout.eval_models(config)


def rag_models():
    return layout.rag_models(config)


def cpt_dirs(models):
    """The CPT model folders among model ids: aggregate reads their train_summary.json."""
    return [model_dir(m) for m in models if layout.is_cpt_model(m)]


def eval_model_input(wildcards):
    """The model folder an evaluation reads: none for API models or hub ids."""
    mid = wildcards.model
    if mid.startswith(layout.API_PREFIX):
        return []
    if mid == "base":
        return model_input("base")
    if layout.is_external_model(mid):  # evaluation.external_models: a folder is an input, a hub id is not
        spec = layout.external_model(config, mid)
        return [spec["path_or_id"]] if spec["source"] == "path" else []
    return [model_dir(mid)]


def eval_prefix_input():
    """The few-shot prefix when it is the user's own file (a name under workflow_scripts/prompts/ is code)."""
    path = EVAL["prompt_prefix"]
    return [path] if os.path.isfile(path) else []


def eval_model_path(wildcards):
    return "" if wildcards.model.startswith(layout.API_PREFIX) else model_dir(wildcards.model)


# ---- figures stage (rules/figures.smk) ----
FIGURES = layout.FIGURES
QA_TABLE = layout.QA_TABLE


def figure_extras(name):
    """A figure's outputs besides the PNG (figures.formats): the PNG is the one the report embeds."""
    return layout.figure_files(config, name)[1:]


def synth_files(kind):
    """results/synth/{method}/{kind}.json of every synthesis method (kind: report | ledger)."""
    return [f"{layout.SYNTH}/{m}/{kind}.json" for m in synth_methods()]


# ---- instruction stages (rules/instruct.smk; docs/instruct.md) ----
INSTRUCT = config["instruct"]
HUMAN_CLAIMS = layout.HUMAN_CLAIMS if INSTRUCT["judge"]["human_summaries"] else None


def instruct_models():
    """Instruct model ids ({model}-instruct) of instruct.models, or of every trained model."""
    return layout.instruct_models(config)


def instruct_start_input(wildcards):
    return model_input("base") if wildcards.model == "base" else [model_dir(wildcards.model)]


def judge_model_input():
    """The judge model folder when it is local (a packaged or path model; an openai judge is served elsewhere)."""
    if INSTRUCT["judge"]["engine"] == "openai":
        return []
    return local_model_input(INSTRUCT["judge"]["model"] or config["models"]["generator"])


INSTRUCT_DATA_INPUT = [INSTRUCT["data"]["source"]] if os.path.exists(INSTRUCT["data"]["source"]) else []
INSTRUCT_RES = INSTRUCT["summaries"]["resources"]
# The judge runs on a GPU only when its engine is local (an API judge's jobs only send requests).
JUDGE_GPU = judge_gpus(config)
# vLLM cannot share an environment with the CPU pins (envs/eval.yaml explains): a vllm engine uses its own env.
SUMMARY_ENV = "../envs/synthesis-vllm.yaml" if INSTRUCT["summaries"]["engine"] == "vllm" else "../envs/eval.yaml"
JUDGE_ENV = "../envs/synthesis-vllm.yaml" if INSTRUCT["judge"]["engine"] == "vllm" else "../envs/eval.yaml"
# The judge's prompt files are inputs: editing one reruns the judging (records carry their version hash too).
JUDGE_PROMPTS = [f"{WORKFLOW_ROOT}/workflow_scripts/prompts/claims_{s}.txt" for s in ("split", "truth", "salience")]


# ---- synthesis stage (rules/synthesis.smk): jobs per shard of articles ----
def synth_shards():
    """[(shard id, article uids)] of the prepared corpus: synthesis.articles_per_job articles per job."""
    from workflow_scripts.synthesis import article_shards

    return article_shards(article_uids(), config["synthesis"]["articles_per_job"])


def shard_uids(shard):
    """Article uids of one shard."""
    return dict(synth_shards())[shard]


def article_shard(uid):
    """The shard that holds an article."""
    return next(s for s, uids in synth_shards() if uid in uids)
