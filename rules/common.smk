# Small functions that compute inputs and params from config: the only logic in the rules layer.
import json
import sys

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# With --use-conda each rule runs in its env's `python`; otherwise the interpreter running Snakemake
# (the .venv of the README), so that an un-activated .venv/bin/snakemake still finds the packages.
PY = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable

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
