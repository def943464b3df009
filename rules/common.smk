# Small functions that compute inputs and params from config: the only logic in the rules layer.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from workflow_scripts import job_keys
from workflow_scripts.config import check_budgets, method_budgets

validate(config, "../schemas/config.schema.yaml")
check_budgets(config)

# Rules run `python -m workflow_scripts.<stage>`. Without --use-conda that must be the interpreter running
# Snakemake (the README's .venv), also when .venv/bin/snakemake is called without activating the venv; with
# --use-conda the env's activation puts its own python first, so PATH is left alone.
_PREFIX = "set -euo pipefail; export TOKENIZERS_PARALLELISM=false; "
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _PREFIX += f'export PATH={shlex.quote(os.path.dirname(sys.executable))}:"$PATH"; '
shell.prefix(_PREFIX)

ARTICLES = "results/data/articles.jsonl"
QUESTIONS = "results/data/questions.jsonl"
LOGS = "results/logs"

# Stage files register their final outputs here; `rule all` asks for all of them.
ALL_TARGETS = []


def all_targets():
    return ALL_TARGETS


def job_config(job, *wildcards):
    """--config-json of a job: the config keys that shape its outputs (workflow_scripts/job_keys.py), for the job
    as named by `wildcards` (e.g. "method"). A tracked param: changing one of them reruns exactly the jobs that
    read it."""
    if not wildcards:
        return job_keys.shaping_json(config, job)
    return lambda wc: job_keys.shaping_json(config, job, **{w: wc[w] for w in wildcards})


def job_ops(job, *wildcards):
    """--ops-json of a job: the operational keys it reads (threads, logging, engine start-up). Snakemake does not
    track params computed from `resources` (it counts them as derived from the job), so changing an operational
    key on a finished workflow plans nothing."""
    return lambda wc, resources: job_keys.operational_json(config, job, **{w: wc[w] for w in wildcards})


def model_location(role):
    """Folder or hub id for models.<role> (base | generator), as workflow_scripts.models resolves it."""
    spec = config["models"][role]
    return f"results/hf_models/{spec['name']}" if spec["source"] == "package" else spec["name"]


def model_input(role):
    """Rule input for a model: the converted folder for packaged/local models, nothing for hub ids."""
    spec = config["models"][role]
    return [model_location(role)] if spec["source"] in ("package", "path") else []


def article_uids(wildcards=None):
    """Article uids of the prepared corpus (known once the prepare_articles checkpoint has run)."""
    path = checkpoints.prepare_articles.get().output.articles
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["uid"] for line in f if line.strip()]


# ---- the cross-stage vocabulary: methods, budgets, model ids (DESIGN.md "The DAG and its files") ----


def synth_methods():
    """Synthesis methods whose corpora are trained on (synthesis.methods), e.g. entigraph, rephrase."""
    return list(config["synthesis"].get("methods", []))


def budgets(method=None):
    """Synthetic-token budgets of the scaling curve: cpt.method_budgets[method] if set, else cpt.budgets.
    Each is a prefix of the method's shuffled corpus."""
    return method_budgets(config, method) if method else [int(b) for b in config["cpt"].get("budgets", [])]


def model_id(method, budget):
    return f"{method}-{budget}"


def cpt_models():
    """(method, budget) of every CPT model: the Raw baseline on all raw tokens, and each method x budget."""
    return [("raw", "all")] + [(m, b) for m in synth_methods() for b in budgets(m)]


def model_dir(mid):
    """Folder (or hub id) of a model id: `base` is the CPT base model, `METHOD-BUDGET` a CPT output."""
    if mid == "base":
        return model_location("base")
    method, budget = mid.rsplit("-", 1)
    return f"results/models/{method}/{budget}"


# ---- data stage (rules/data.smk) ----
def prepare_inputs(wildcards):
    src = config["data"]["source"]
    if src == "quality":
        return {"zip": "results/data/quality/QuALITY.v1.0.1.zip"}
    custom = config["data"]["custom"]
    return {"corpus": custom["path"], **({"questions": custom["questions"]} if custom["questions"] else {})}


# ---- evaluation stage (rules/evaluation.smk) ----
EVAL = config["evaluation"]
EVAL_RES = EVAL["resources"]
QA_DIR = "results/eval/qa"
RAG_DIR = "results/eval/rag"
# vLLM cannot share an environment with the CPU pins (envs/eval.yaml explains): CoT on vllm uses its env.
EVAL_ENV = ("../envs/synthesis-vllm.yaml" if "cot" in EVAL["modes"] and EVAL["cot"]["engine"] == "vllm"
            else "../envs/eval.yaml")


def eval_models():
    """Model ids of closed-book QA: the base model, Raw CPT, every method x budget, then the API references."""
    return (["base"] + [model_id(m, b) for m, b in cpt_models()]
            + [f"api-{a['name']}" for a in EVAL["api_models"]])


def rag_models():
    """Model ids of the RAG baseline (evaluation.rag.models; default: base and the largest budget of the first
    synthesis method, or Raw CPT when no method is configured)."""
    if EVAL["rag"]["models"] is not None:
        return list(EVAL["rag"]["models"])
    methods = synth_methods()
    bs = budgets(methods[0]) if methods else []
    return ["base", model_id(methods[0], max(bs)) if methods and bs else "raw-all"]


def eval_model_input(wildcards):
    """The model folder an evaluation reads: none for API models or hub ids."""
    mid = wildcards.model
    if mid.startswith("api-"):
        return []
    if mid == "base":
        return model_input("base")
    return [model_dir(mid)]


def eval_model_path(wildcards):
    return "" if wildcards.model.startswith("api-") else model_dir(wildcards.model)


# ---- figures stage (rules/figures.smk) ----
FIGURES = "results/figures"
QA_TABLE = "results/tables/qa_accuracy.csv"


def figure_extras(name):
    """A figure's outputs besides the PNG (figures.formats): the PNG is the one the report embeds."""
    return [f"{FIGURES}/{name}.{ext}" for ext in config["figures"]["formats"] if ext != "png"]


def synth_files(kind):
    """results/synth/{method}/{kind}.json of every synthesis method (kind: report | ledger)."""
    return [f"results/synth/{m}/{kind}.json" for m in synth_methods()]
