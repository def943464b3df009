"""The workflow's shared names: where each stage's files live, model ids and their parsing, the lists of CPT,
evaluated and RAG models, and the final targets. rules/common.smk and the Python stages (plan, aggregate, models)
read them here, so a path or an id is spelled once (docs/architecture.md, "The DAG and its files").

Model ids: `base` (the CPT base model), `raw-all` (Raw CPT on every article token), `METHOD-BUDGET` (a synthesis
method's corpus cut at BUDGET synthetic tokens, or at the fraction RATIO of it for a label `rRATIO`:
workflow_scripts/budgets.py), `api-NAME` (an API reference model, evaluation.api_models), `ext-NAME` (an
evaluation-only model from a hub id or a folder, e.g. a released checkpoint: evaluation.external_models),
`METHOD-BUDGET-lora` (the LoRA twin of METHOD-BUDGET trained on the same tokens: cpt.compare_adapter; its folder
results/models/METHOD/BUDGET-lora).
"""

from __future__ import annotations

from typing import Any

from .budgets import budget_label, parse_budget
from .config import method_budgets
from .derived import RAW, filter_variants, imported, trained_methods
from .io_utils import InputError

RESULTS = "results"
DATA = f"{RESULTS}/data"
ARTICLES = f"{DATA}/articles.jsonl"
QUESTIONS = f"{DATA}/questions.jsonl"
PREPARE_STATS = f"{DATA}/prepare_stats.json"
QUALITY_ZIP = f"{DATA}/quality/QuALITY.v1.0.1.zip"
LOGS = f"{RESULTS}/logs"
HF_MODELS_DIR = f"{RESULTS}/hf_models"
SYNTH = f"{RESULTS}/synth"
ENTITIES = f"{SYNTH}/entigraph/entities"
CORPUS = f"{RESULTS}/corpus"
MODELS = f"{RESULTS}/models"
CHECKPOINTS = f"{RESULTS}/checkpoints"
REPLAY_POOL = f"{RESULTS}/replay/pool"  # the run's replay pool, built once (rules/replay.smk; workflow_scripts/replay.py)
# its files: the pool's tokens, the held-out probe tokens (raw uint32) and meta.json
POOL_TOKENS, POOL_HELDOUT, POOL_META = "tokens.bin", "heldout.bin", "meta.json"
QA_DIR = f"{RESULTS}/eval/qa"
RAG_DIR = f"{RESULTS}/eval/rag"
TABLES = f"{RESULTS}/tables"
QA_TABLE = f"{TABLES}/qa_accuracy.csv"  # the long table: one row per model x mode x split x convention x metric
QA_HEADLINE = f"{TABLES}/qa_headline.csv"  # its headline rows: the plotted number per model and mode
RAG_TABLE = f"{TABLES}/rag_accuracy.csv"
SYNTH_SUMMARY = f"{TABLES}/synthesis_summary"
FIGURES = f"{RESULTS}/figures"
SCALING_FIT = f"{FIGURES}/scaling_fit.json"
# derived corpora (rules/filters.smk): a filtered variant's or an imported corpus' records.jsonl and report
FILTERED = f"{RESULTS}/filtered"
IMPORTED = f"{RESULTS}/imported"
# the instruction stages (rules/instruct.smk; docs/instruct.md)
INSTRUCT_DIR = f"{RESULTS}/instruct"
INSTRUCT_CORPUS = f"{INSTRUCT_DIR}/corpus"
SUMMARIES_DIR = f"{INSTRUCT_DIR}/summaries"
CLAIMS_DIR = f"{INSTRUCT_DIR}/claims"
EXAMPLES_DIR = f"{INSTRUCT_DIR}/examples"
HUMAN_DIR = f"{INSTRUCT_DIR}/human"  # the judged human summaries (instruct.judge.human_summaries)
HUMAN_CLAIMS = f"{HUMAN_DIR}/claims.jsonl"
CLAIMS_TABLE = f"{TABLES}/summary_claims.csv"
CLAIMS_FIGURE = f"{FIGURES}/summary_claims.png"
# each rule's `benchmark:` file (wall, CPU, memory of the job; GPU-hours on a cluster: docs/architecture.md)
BENCHMARKS = f"{RESULTS}/benchmarks"

# RAW (workflow_scripts/derived.py): the Raw CPT baseline's method name (its corpus is the articles)
BASE = "base"
API_PREFIX = "api-"
EXTERNAL_PREFIX = "ext-"  # evaluation-only models (evaluation.external_models): ext-NAME


# ---------------------------------------------------------------------------------------------- model ids
def model_id(method: str, budget: int | str) -> str:
    """The id of a CPT model: METHOD-BUDGET (raw-all for the Raw baseline)."""
    return f"{method}-{budget}"


INSTRUCT_SUFFIX = "-instruct"  # instruction-tuned models: {model}-instruct, in results/models/{model}/instruct


LORA_SUFFIX = "-lora"  # LoRA twins (cpt.compare_adapter): {model}-lora, in results/models/METHOD/BUDGET-lora


def lora_id(model: str) -> str:
    """The id of a CPT model's LoRA twin (cpt.compare_adapter): {model}-lora."""
    return f"{model}{LORA_SUFFIX}"


def model_subdir(model: str) -> str:
    """METHOD/BUDGET of a CPT model id under results/models (METHOD/BUDGET-lora for a LoRA twin)."""
    twin = model.endswith(LORA_SUFFIX)
    method, _, budget = (model[:-len(LORA_SUFFIX)] if twin else model).rpartition("-")
    return f"{method}/{budget}{LORA_SUFFIX if twin else ''}"


def parse_model_id(model: str) -> tuple[str, int | None]:
    """(method, budget) of a model id: base, raw-all, api-NAME or METHOD-BUDGET (method `api` for API models;
    budget None for base, raw-all and API models). `ID-instruct` (instruction-tuned, workflow_scripts/instruct.py)
    is its own series: (`{method of ID}-instruct`, budget of ID), and so is a LoRA twin `ID-lora`
    (`{method of ID}-lora`, budget of ID)."""
    for suffix in (INSTRUCT_SUFFIX, LORA_SUFFIX):
        if model.endswith(suffix):
            method, budget = parse_model_id(model[:-len(suffix)])
            return f"{method}{suffix}", budget
    if model == BASE:
        return BASE, None
    if model.startswith(API_PREFIX):
        return "api", None
    if model.startswith(EXTERNAL_PREFIX):
        return "external", None
    method, _, budget = model.rpartition("-")
    if not method:
        raise InputError(f"model id {model!r}: expected base, raw-all, api-NAME or METHOD-BUDGET")
    if budget == "all":
        return method, None
    try:
        unit, value = parse_budget(budget)
    except InputError:
        raise InputError(f"model id {model!r}: budget {budget!r} is not a token count or rRATIO") from None
    # a fraction's token count is known from its train summary (budget_tokens), not from the id
    return method, (int(value) if unit == "tokens" else None)


def budget_of(model: str) -> str | None:
    """The budget label of a CPT model id (`455000000`, `r0.0004`, `all`), None for base and API models."""
    for suffix in (INSTRUCT_SUFFIX, LORA_SUFFIX):
        if model.endswith(suffix):
            return budget_of(model[:-len(suffix)])
    if model == BASE or model.startswith((API_PREFIX, EXTERNAL_PREFIX)) or "-" not in model:
        return None
    return model.rpartition("-")[2]


def converted_model(name: str) -> str:
    """results/hf_models/NAME: the Hugging Face folder a packaged model is converted to (rule
    convert_packaged_model; NAME may be the wildcard `{name}`)."""
    return f"{HF_MODELS_DIR}/{name}"


def model_location(spec: dict[str, Any]) -> str:
    """What `from_pretrained` receives for a config model spec: the converted folder of a packaged model, else
    its folder path or hub id."""
    return converted_model(spec["name"]) if spec["source"] == "package" else spec["name"]


def cpt_checkpoints(method: str, budget: str) -> str:
    """results/checkpoints/METHOD/BUDGET: the resumable training state of a CPT job (train.py --workdir)."""
    return f"{CHECKPOINTS}/{method}/{budget}"


def instruct_checkpoints(model: str) -> str:
    """results/checkpoints/instruct/MODEL: the resumable training state of an instruction-tuning job."""
    return f"{CHECKPOINTS}/instruct/{model}"


def benchmark(stage: str, name: str) -> str:
    """results/benchmarks/STAGE/NAME.tsv: a rule's `benchmark:` file (NAME may hold wildcards, `{method}/{budget}`)."""
    return f"{BENCHMARKS}/{stage}/{name}.tsv"


def model_dir(model: str, cfg: dict) -> str:
    """Folder (or hub id) of a model id: `base` is models.base, `ext-NAME` its evaluation.external_models entry's
    path_or_id, a CPT id its results/models/METHOD/BUDGET (a LoRA twin's: BUDGET-lora)."""
    if model == BASE:
        return model_location(cfg["models"]["base"])
    if model.startswith(EXTERNAL_PREFIX):
        return external_model(cfg, model)["path_or_id"]
    return f"{MODELS}/{model_subdir(model)}"


def train_summary_path(model: str) -> str:
    """results/models/METHOD/BUDGET/train_summary.json of a CPT model id (BUDGET-lora for a LoRA twin)."""
    return f"{MODELS}/{model_subdir(model)}/train_summary.json"


def is_cpt_model(model: str) -> bool:
    return model != BASE and not model.startswith((API_PREFIX, EXTERNAL_PREFIX))


def is_external_model(model: str) -> bool:
    """An evaluation-only model (evaluation.external_models): scored like the base model, trained by no rule."""
    return model.startswith(EXTERNAL_PREFIX)


def external_model(cfg: dict, model: str) -> dict:
    """The evaluation.external_models entry of an `ext-NAME` model id."""
    name = model[len(EXTERNAL_PREFIX):]
    for spec in cfg["evaluation"].get("external_models") or []:
        if spec["name"] == name:
            return spec
    raise InputError(f"model id {model!r}: no evaluation.external_models entry named {name!r}")


def external_models(cfg: dict) -> list[str]:
    """Model ids of the evaluation-only models: ext-NAME for each evaluation.external_models entry."""
    return [f"{EXTERNAL_PREFIX}{e['name']}" for e in cfg["evaluation"].get("external_models") or []]


def instruct_id(model: str) -> str:
    """The id of a trained model's instruction-tuned twin: {model}-instruct (its folder: model_dir of the id,
    results/models/{model}/instruct)."""
    return f"{model}{INSTRUCT_SUFFIX}"


def instruct_dir(model: str) -> str:
    """Folder of `{model}-instruct` (the start model's id without the suffix): results/models/MODEL/instruct, which
    model_dir gives for the instruct id."""
    return f"{MODELS}/{model}/instruct"


def derived_records(kind: str, method: str) -> str:
    """records.jsonl of a filtered variant (kind filtered) or an imported corpus (kind imported)."""
    return f"{FILTERED if kind == 'filtered' else IMPORTED}/{method}/records.jsonl"


# ------------------------------------------------------------------------------------------- model lists
def synth_methods(cfg: dict) -> list[str]:
    """Synthesis methods whose corpora are trained on (synthesis.methods)."""
    return list(cfg["synthesis"].get("methods", []))


def budgets(cfg: dict, method: str | None = None) -> list[int | float]:
    """Budgets of the scaling curve in cpt.budget_unit (token counts, or fractions): a method's
    (cpt.method_budgets, else cpt.budgets), or the shared list. Each is a prefix of the method's shuffled corpus."""
    return method_budgets(cfg, method) if method else method_budgets(cfg, "")


def budget_labels(cfg: dict, method: str) -> list[str]:
    """A method's budgets as they appear in model ids and paths: N (tokens) or rRATIO (fraction)."""
    unit = cfg["cpt"].get("budget_unit", "tokens")
    return [budget_label(b, unit) for b in budgets(cfg, method)]


def cpt_models(cfg: dict) -> list[tuple[str, str]]:
    """(method, budget label) of every CPT model: the Raw baseline on all raw tokens, then each trained method x
    budget (synthesis methods, filtered variants, imported corpora, mixtures: workflow_scripts/derived.py)."""
    return [(RAW, "all")] + [(m, b) for m in trained_methods(cfg) for b in budget_labels(cfg, m)]


def lora_twins(cfg: dict) -> list[str]:
    """Model ids of the LoRA twins (cpt.compare_adapter): METHOD-BUDGET-lora for every trained method x budget (the
    scaling curve's models; Raw CPT is a level, not a curve, and has none)."""
    if not cfg["cpt"].get("compare_adapter"):
        return []
    return [lora_id(model_id(m, b)) for m, b in cpt_models(cfg) if m != RAW]


def eval_models(cfg: dict) -> list[str]:
    """Model ids of closed-book QA: the base model, Raw CPT, every method x budget, their LoRA twins
    (cpt.compare_adapter), the API references, then the evaluation-only (external) models."""
    return ([BASE] + [model_id(m, b) for m, b in cpt_models(cfg)] + lora_twins(cfg)
            + [f"{API_PREFIX}{a['name']}" for a in cfg["evaluation"]["api_models"]] + external_models(cfg))


def rag_models(cfg: dict) -> list[str]:
    """Model ids of the RAG baseline (evaluation.rag.models; by default the base model and the largest budget of
    the first synthesis method, or Raw CPT when no method is configured)."""
    rag = cfg["evaluation"].get("rag") or {}
    if rag.get("models") is not None:
        return list(rag["models"])
    methods = synth_methods(cfg)
    bs = budgets(cfg, methods[0]) if methods else []
    if not (methods and bs):
        return [BASE, model_id(RAW, "all")]
    return [BASE, model_id(methods[0], budget_label(max(bs), cfg["cpt"].get("budget_unit", "tokens")))]


def instruct_models(cfg: dict) -> list[str]:
    """Instruct model ids ({model}-instruct) of instruct.models, or of every trained model (base, Raw CPT, each
    method x budget)."""
    starts = cfg["instruct"]["models"]
    if starts is None:
        starts = [BASE] + [model_id(m, b) for m, b in cpt_models(cfg)]
    return [instruct_id(m) for m in starts]


# ------------------------------------------------------------------------------------------ final targets
def training_processes(resources: dict) -> int:
    """Processes of one training job (cpt.resources / instruct.resources): one per GPU with several GPUs, else
    cpu_processes on a machine without GPUs (gloo), else 1."""
    gpu = int(resources.get("gpu", 0))
    if gpu > 0:
        return gpu
    return int(resources.get("cpu_processes", 1))


def training_launcher(processes: int) -> str:
    """The command that starts a training module: plain python for one process, torchrun (standalone: a free local
    rendezvous port, so jobs sharing a node do not collide) for several; train.py's Runtime takes the backend from
    the device (nccl on GPUs, gloo on CPUs)."""
    if processes > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {processes}"
    return "python"


def replay_pool_files(cfg: dict) -> list[str]:
    """The replay pool's files when CPT replays general text (cpt.replay.rate > 0 and a source), else none: tokens,
    held-out probe tokens, meta.json (workflow_scripts/replay.py build_pool)."""
    rp = cfg["cpt"]["replay"]
    if not (rp["rate"] > 0 and rp["source"]):
        return []
    return [f"{REPLAY_POOL}/{name}" for name in (POOL_TOKENS, POOL_HELDOUT, POOL_META)]


def model_inputs(cfg: dict, role: str) -> list[str]:
    """A model's folder as a file the DAG builds or reads (packaged and local models), none for hub ids."""
    spec = cfg["models"][role]
    return [model_location(spec)] if spec["source"] in ("package", "path") else []


def figure_files(cfg: dict, name: str) -> list[str]:
    """A figure's files: the PNG first (the report embeds it), then the other figures.formats."""
    return [f"{FIGURES}/{name}.png"] + [f"{FIGURES}/{name}.{ext}" for ext in cfg["figures"]["formats"]
                                        if ext != "png"]


def stage_targets(cfg: dict, stage: str) -> list[str]:
    """The final outputs of one stage (data, synthesis, filters, cpt, evaluation, figures, instruct): each rules
    file asks `rule all` for its own, so that a workflow of some stage files (a test's, a user's) builds what it
    has rules for."""
    if stage == "data":
        return [PREPARE_STATS, *model_inputs(cfg, "base"), *model_inputs(cfg, "generator")]
    if stage == "synthesis":
        return [f"{SYNTH}/{m}/report.json" for m in synth_methods(cfg)]
    if stage == "filters":
        return ([f"{FILTERED}/{m}/report.json" for m in filter_variants(cfg)]
                + [f"{IMPORTED}/{m}/report.json" for m in imported(cfg)])
    if stage == "cpt":
        return [model_dir(m, cfg) for m in [model_id(m, b) for m, b in cpt_models(cfg)] + lora_twins(cfg)]
    if stage == "evaluation":
        return [QA_TABLE, QA_HEADLINE, *([RAG_TABLE] if cfg["evaluation"]["rag"]["enabled"] else [])]
    if stage == "figures":
        return [SCALING_FIT, *figure_files(cfg, "scaling_curve"), *figure_files(cfg, "diversity"),
                f"{SYNTH_SUMMARY}.csv", f"{SYNTH_SUMMARY}.html"]
    if stage == "instruct":  # the rules exist either way; instruct.enabled asks `rule all` for their outputs
        if not cfg["instruct"]["enabled"]:
            return []
        return [CLAIMS_TABLE, CLAIMS_FIGURE] + [f"{EXAMPLES_DIR}/{m}.html" for m in instruct_models(cfg)]
    raise ValueError(f"unknown stage {stage!r}")


STAGES = ("data", "synthesis", "filters", "cpt", "evaluation", "figures", "instruct")


def final_targets(cfg: dict) -> list[str]:
    """Everything `snakemake` (rule all) builds: prepared data, models, synthesis and filter reports, the accuracy
    tables, the fit and the figures, and the instruction stages' table, figure and examples when enabled."""
    return [t for stage in STAGES for t in stage_targets(cfg, stage)]
