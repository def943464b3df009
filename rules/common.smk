# Small functions that compute inputs and params from config: the only logic in the rules layer.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from workflow_scripts.config import check_budgets, method_budgets
from workflow_scripts.derived import check_methods, filter_variants, imported, method_kind, mixtures, trained_methods

validate(config, "../schemas/config.schema.yaml")
check_budgets(config)
check_methods(config)

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


def section(*keys):
    """JSON of the config sections a job needs, passed as --config-json, so that a job reruns when they change."""
    return json.dumps({k: config[k] for k in keys}, sort_keys=True)


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
    """(method, budget) of every CPT model: the Raw baseline on all raw tokens, and each method x budget (synthesis
    methods, filtered variants, imported corpora, mixtures: workflow_scripts/derived.py)."""
    return [("raw", "all")] + [(m, b) for m in trained_methods(config) for b in budgets(m)]


def model_dir(mid):
    """Folder (or hub id) of a model id: `base` is the CPT base model, `METHOD-BUDGET` a CPT output."""
    if mid == "base":
        return model_location("base")
    method, budget = mid.rsplit("-", 1)
    return f"results/models/{method}/{budget}"


# ---- derived corpora (rules/filters.smk, rules/mixture.smk; workflow_scripts/derived.py) ----
def method_records(method):
    """The record files a method's corpus is built from: the articles (raw), a filtered or imported records.jsonl,
    or the synthesis shards of every article."""
    kind = method_kind(config, method)
    if kind == "raw":
        return [ARTICLES]
    if kind in ("filtered", "imported"):
        return [f"results/{kind}/{method}/records.jsonl"]
    return [f"results/synth/{method}/{u}.jsonl" for u in article_uids()]


def mixture_corpora(name):
    """SOURCE=FOLDER of every source of a mixture that is a corpus (replay is read from cpt.replay.source)."""
    return {s: f"results/corpus/{s}" for s in mixtures(config)[name]["sources"] if s != "replay"}


def corpus_config_json(method):
    """--config-json of a corpus build: seed and corpus settings, with only this method's document format (a
    format added for another method reruns nothing here)."""
    corpus = {k: v for k, v in config["corpus"].items() if k != "document_format"}
    formats = config["corpus"].get("document_format") or {}
    source = filter_variants(config).get(method, {}).get("source")
    fmt = formats.get(method) or formats.get(source)
    if fmt:
        corpus["document_format"] = {method: fmt}
    return json.dumps({"seed": config["seed"], "corpus": corpus}, sort_keys=True)


def judge_model_input(variant):
    """The judge's model folder when the variant runs the judge on a local model."""
    if "judge" not in filter_variants(config)[variant]["steps"]:
        return []
    spec = config["filters"]["judge"]["model"] or config["models"]["generator"]
    if spec["source"] == "package":
        return [f"results/hf_models/{spec['name']}"]
    return [spec["name"]] if spec["source"] == "path" else []


def filter_config_json(variant):
    """--config-json of a filter job: the variant, the filter settings its steps use, the judge's engine and model,
    and the report settings (resources and other variants are left out, so they rerun nothing)."""
    f = config["filters"]
    steps = f["variants"][variant]["steps"]
    syn = config["synthesis"]
    engine = f["judge"]["backend"] or syn["backend"]
    cfg = {"seed": config["seed"], "filters": {"variants": {variant: f["variants"][variant]},
                                                **{s: f[s] for s in steps}},
           "synthesis": {k: syn[k] for k in ("report", "sampling", "backend")}}
    if "judge" in steps:
        cfg["models"] = {"generator": config["models"]["generator"]}
        cfg["backends"] = {engine: config["backends"].get(engine) or {}}
    return json.dumps(cfg, sort_keys=True)


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


def eval_params(wildcards, rag=False):
    """--config-json of one evaluation: the evaluation keys that change its numbers (not resources; rag only for
    RAG jobs), plus the backend settings when the model is sampled (cot)."""
    ev = {k: v for k, v in EVAL.items() if k not in ("resources", "rag")}
    if rag:
        ev["rag"] = EVAL["rag"]
    api = next((a for a in EVAL["api_models"] if f"api-{a['name']}" == wildcards.model), None)
    if api is not None:
        ev["api_models"] = [api]
        modes, engine = api["modes"], api["engine"]
    else:
        ev["api_models"] = []
        modes = (EVAL["rag"]["modes"] or EVAL["modes"]) if rag else EVAL["modes"]
        engine = EVAL["cot"]["engine"]
    cfg = {"seed": config["seed"], "evaluation": ev}
    if "cot" in modes:
        cfg["backends"] = {engine: config["backends"].get(engine) or {}}
    return json.dumps(cfg, sort_keys=True)


# ---- figures stage (rules/figures.smk) ----
FIGURES = "results/figures"
QA_TABLE = "results/tables/qa_accuracy.csv"


def figure_extras(name):
    """A figure's outputs besides the PNG (figures.formats): the PNG is the one the report embeds."""
    return [f"{FIGURES}/{name}.{ext}" for ext in config["figures"]["formats"] if ext != "png"]


def figures_params(keys, *sections):
    """The figures keys a plot uses (+ whole top-level sections), as --config-json: restyling one figure reruns
    only that figure's rule, and a change of the fit settings reruns the fit and the scaling plot only."""
    figures = {k: v for k, v in config["figures"].items() if k in keys}
    return json.dumps({"figures": figures, **{s: config[s] for s in sections}}, sort_keys=True)


FIT_KEYS = ("fit", "accuracy_scale")
SCALING_KEYS = ("style", "dpi", "figsize", "formats", "paper_reference", "show_fit", "show_chance", "modes",
                "accuracy_scale")
DIVERSITY_KEYS = ("style", "dpi", "diversity_figsize", "formats")


def synth_files(kind):
    """results/synth/{method}/{kind}.json of every synthesis method (kind: report | ledger)."""
    return [f"results/synth/{m}/{kind}.json" for m in synth_methods()]
