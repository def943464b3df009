# Small functions that compute inputs and params from config: the only logic in the rules layer.
import json
import os
import sys

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# Rules run `python -m workflow_scripts.<stage>`. Without --use-conda that must be the interpreter running
# Snakemake (the README's .venv), also when .venv/bin/snakemake is called without activating the venv; with
# --use-conda the env's activation puts its own python first on PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PY = "python"  # kept for rules written with {PY}; new rules write `python` directly

ARTICLES = "results/data/articles.jsonl"
QUESTIONS = "results/data/questions.jsonl"
LOGS = "results/logs"

# Stage files register their final outputs here; `rule all` asks for all of them.
ALL_TARGETS = []


def all_targets():
    return ALL_TARGETS


def section(*keys):
    """JSON of the config sections a rule needs (passed as --config-json): a rule reruns when they change."""
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
wildcard_constraints:
    method="[a-z0-9_]+",
    budget=r"\d+|all",
    article="[A-Za-z0-9_.-]+",
    model="[A-Za-z0-9_.-]+",


def synth_methods():
    """Synthesis methods whose corpora are trained on (synthesis.methods), e.g. entigraph, rephrase."""
    return list(config["synthesis"].get("methods", []))


def budgets():
    """Synthetic-token budgets of the scaling curve (cpt.budgets): each a prefix of the method's shuffled corpus."""
    return [int(b) for b in config["cpt"].get("budgets", [])]


def model_id(method, budget):
    return f"{method}-{budget}"


def cpt_models():
    """(method, budget) of every CPT model: the Raw baseline on all raw tokens, and each method x budget."""
    return [("raw", "all")] + [(m, b) for m in synth_methods() for b in budgets()]


def model_dir(mid):
    """Folder (or hub id) of a model id: `base` is the CPT base model, `METHOD-BUDGET` a CPT output."""
    if mid == "base":
        return model_location("base")
    method, budget = mid.rsplit("-", 1)
    return f"results/models/{method}/{budget}"
