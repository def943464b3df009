"""Planner: what a configuration will cost before anything is spent.

    python -m workflow_scripts.plan --configfile experiments/paper.yaml
    python -m workflow_scripts.plan --configfile experiments/single-gpu.yaml --json

For every stage it prints the number of requests, prompt and completion tokens, and their price: USD for an API
generator (the `openai` backend, at `synthesis.prices` or `planner.prices`), GPU-hours for a local engine (vLLM /
transformers, at `planner.throughputs`; prompt tokens a prefix cache avoids are shown and not charged), GPU-hours
for continued pretraining from the usual 6 x parameters FLOPs per token (`planner.peak_flops` x
`planner.utilisation`), closed-book QA of every model, and the start-up time of every GPU job. The paper's authors ran into an unexpected bill of about
60K USD, dominated by input tokens (every relation call resends the whole article); this is the number a user
should see before submitting.

Where the numbers come from:
- articles: `results/data/articles.jsonl` when it exists and was prepared with this config's data selection,
  else `planner.assume` (265 articles of about 4,900 tokens on the paper's QuALITY set);
- entity counts E: the extracted entity lists (workflow_scripts/layout.py ENTITIES) where those exist, else
  `planner.assume.entities_per_article`, capped by the method's own entity cap;
- system prompts: the template files in workflow_scripts/prompts/ (characters / `planner.assume.chars_per_token`);
- completion tokens: `planner.assume.*completion_tokens` when set (a measured mean), else the configured
  `max_new_tokens` (an upper bound).
Config files merge as in Snakemake: the repository's config.yaml first (the Snakefile's `configfile:`), then
each --configfile in order. All arithmetic lives in pure functions that the tests pin by hand calculation.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import stage
from .budgets import nominal_tokens
from .config import DEFAULT_CONFIG, ROOT, load_config
from .estimates import article_requests, n_tuples  # noqa: F401  (n_tuples: the tests pin it here)
from .io_utils import InputError
from .layout import ARTICLES, ENTITIES, PREPARE_STATS, QUESTIONS, cpt_models, model_id, rag_models, synth_methods
from .synth_framework import method_needs_entities
from .synthesis import article_shards

FLOPS_PER_TOKEN_PER_PARAM = 6  # forward + backward of a dense decoder (Kaplan et al.)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Line:
    """One row of the plan: a group of requests (or a training run) and what it costs."""

    stage: str
    item: str
    engine: str
    requests: int = 0
    prompt_tokens: float = 0.0
    cached_prompt_tokens: float = 0.0  # prompt tokens that a prefix cache (vLLM, transformers KV reuse) avoids
    completion_tokens: float = 0.0
    train_tokens: float = 0.0
    usd: float | None = None
    gpu_hours: float | None = None
    note: str = ""


@dataclass
class Plan:
    run_name: str
    sources: dict[str, str] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def total(self, attr: str, stage: str | None = None) -> float:
        vals = [getattr(x, attr) for x in self.lines if stage is None or x.stage == stage]
        return float(sum(v for v in vals if v is not None))

    def stages(self) -> list[str]:
        return list(dict.fromkeys(x.stage for x in self.lines))

    def to_dict(self) -> dict[str, Any]:
        keys = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "train_tokens", "usd",
                "gpu_hours")
        totals = {s: {k: self.total(k, s) for k in keys} for s in self.stages()}
        totals["all"] = {k: self.total(k) for k in keys}
        return {"run_name": self.run_name, "sources": self.sources, "lines": [asdict(x) for x in self.lines],
                "totals": totals, "notes": list(dict.fromkeys(self.notes))}


# ------------------------------------------------------------------------------------------------ models
def model_params(name: str, table: dict[str, float]) -> tuple[float, str]:
    """Parameter count of a model: `planner.model_params`, else read from its name (`...-8B`, `...-135M`)."""
    if name in table:
        return float(table[name]), "planner.model_params"
    short = name.rstrip("/").split("/")[-1]
    if short in table:
        return float(table[short]), "planner.model_params"
    sizes = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z])", short)
    if not sizes:
        raise InputError(f"cannot tell the parameter count of model {name!r}: add it to planner.model_params "
                         "(e.g. planner: {model_params: {'%s': 8.0e9}})" % name)
    value, unit = sizes[-1]
    return float(value) * (1e9 if unit in "Bb" else 1e6), "model name"


# ---------------------------------------------------------------------------------------------- articles
def _selection_matches(stats: dict, data_cfg: dict) -> str | None:
    """None when prepare_stats.json was made with this data selection, else why not."""
    if stats.get("source") != data_cfg["source"]:
        return f"prepared from source {stats.get('source')!r}, config says {data_cfg.get('source')!r}"
    sel = stats.get("selection") or {}
    if sel.get("max_article_chars") != data_cfg.get("max_article_chars"):
        return (f"prepared with max_article_chars={sel.get('max_article_chars')}, "
                f"config says {data_cfg.get('max_article_chars')}")
    n_all, n_sel = stats.get("articles"), stats.get("selected_articles")
    if data_cfg.get("article_uids"):
        if n_sel != len(data_cfg["article_uids"]) and not data_cfg.get("max_articles"):
            return f"prepared {n_sel} articles, config selects {len(data_cfg['article_uids'])} uids"
    elif data_cfg.get("max_articles"):
        if n_all is not None and n_sel != min(n_all, data_cfg["max_articles"]):
            return f"prepared {n_sel} articles, config keeps up to {data_cfg['max_articles']}"
    elif n_sel != n_all:
        return f"prepared {n_sel} of {n_all} articles, config keeps all"
    url = data_cfg["quality"]["url"]
    if data_cfg["source"] == "quality" and str(url).startswith("http") \
            and not stats.get("official_counts_checked"):
        return "config names the official QuALITY release, the prepared files are not it"
    return None


def article_tokens(cfg: dict, root: Path, articles: str | None = None) -> tuple[list[float], str]:
    """Per-article token counts, and where they came from.

    An explicit `articles` file is used as is. Otherwise results/data/articles.jsonl is used when its
    prepare_stats.json shows the config's data selection (a demo run's three short articles must not price the
    paper's run); else `planner.assume.articles` x `tokens_per_article`, shaped by data.max_articles and
    data.max_article_chars.
    """
    assume = cfg["planner"]["assume"]
    cpt = float(assume["chars_per_token"])
    path = Path(articles) if articles else root / ARTICLES
    reason = None
    if articles is None:
        stats_path = root / PREPARE_STATS
        if not path.exists():
            reason = f"{ARTICLES} not prepared yet"
        elif not stats_path.exists():
            reason = f"{PREPARE_STATS} missing"
        else:
            reason = _selection_matches(json.loads(stats_path.read_text(encoding="utf-8")), cfg["data"])
    elif not path.exists():
        raise InputError(f"{path}: no such articles file")
    if reason is None:
        counts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f.read().split("\n"), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{lineno}: not JSON ({e.msg}); regenerate it with the data stage")
                    n_chars = rec.get("n_chars", len(rec.get("text", "")))
                    counts.append(n_chars / cpt)
        if not counts:
            raise InputError(f"{path}: no articles")
        return counts, f"{path} ({len(counts)} articles, characters / {cpt:g})"
    n = int(assume["articles"])
    per = float(assume["tokens_per_article"])
    data = cfg["data"]
    if data.get("article_uids"):
        n = min(n, len(data["article_uids"]))
    if data.get("max_articles"):
        n = min(n, int(data["max_articles"]))
    if data.get("max_article_chars"):
        per = min(per, data["max_article_chars"] / cpt)
    return [per] * n, f"planner.assume: {n} articles x {per:,.0f} tokens ({reason})"


def question_count(cfg: dict, root: Path, articles_from_file: bool, n_articles: int) -> tuple[int, str]:
    assume = cfg["planner"]["assume"]
    path = root / QUESTIONS
    if articles_from_file and path.exists():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        return n, f"{QUESTIONS}"
    per_article = assume["questions"] / assume["articles"]
    n = int(round(min(assume["questions"], per_article * n_articles)))
    return n, f"planner.assume: {assume['questions']} questions for {assume['articles']} articles, pro rata"


def entity_counts(cfg: dict, root: Path, n_articles: int, uids: list[str] | None) -> tuple[list[int], str]:
    """E per article: measured entity lists where they exist (a failed extraction has none), else
    planner.assume.entities_per_article. A method's own entity cap is applied by its estimate."""
    default = int(cfg["planner"]["assume"]["entities_per_article"])
    src = f"E = {default} (planner.assume.entities_per_article), then each method's own entity cap"
    counts = [default] * n_articles
    measured = 0
    for i, uid in enumerate(uids or []):
        p = root / ENTITIES / f"{uid}.json"
        if p.exists():
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            ok = doc.get("status", "ok") in ("ok", "fallback")
            counts[i] = len(doc.get("entities") or []) if ok else 0
            measured += 1
    if measured:
        src = f"{measured} entity files in {ENTITIES}; other articles {src}"
    return counts, src


# ------------------------------------------------------------------------------------------- arithmetic
def api_usd(prompt: float, completion: float, price: dict, cached: float = 0.0) -> float:
    """USD at per-million-token prices; cached input is billed at `cached_input_per_mtok` when set."""
    cached_price = price.get("cached_input_per_mtok")
    if cached_price is None:
        cached_price, cached = 0.0, 0.0
    return ((prompt - cached) * price["input_per_mtok"] + cached * cached_price
            + completion * price["output_per_mtok"]) / 1e6


def engine_gpu_hours(prompt: float, cached: float, completion: float, throughput: dict) -> float:
    """GPU-hours of a local engine: uncached prompt tokens at prefill speed + completion tokens at decode speed
    (throughputs are per GPU, i.e. a replica's tokens/s divided by its GPUs)."""
    return ((prompt - cached) / throughput["prefill_tokens_per_s"]
            + completion / throughput["decode_tokens_per_s"]) / 3600


def train_gpu_hours(tokens: float, params: float, peak_flops: float, utilisation: float) -> float:
    """GPU-hours of training on `tokens` tokens: 6 x params FLOPs per token at peak x utilisation (MFU)."""
    return tokens * FLOPS_PER_TOKEN_PER_PARAM * params / (peak_flops * utilisation) / 3600


# --------------------------------------------------------------------------------------------- stages
def _price_engine(line: Line, engine: str, model: str, cfg: dict, throughput_key: str, plan: Plan) -> None:
    planner = cfg["planner"]
    if engine == "openai":
        price = planner["prices"].get(model)
        if price is None:
            plan.notes.append(f"no price for API model {model!r} in planner.prices: its cost is not shown")
        else:
            line.usd = api_usd(line.prompt_tokens, line.completion_tokens, price, line.cached_prompt_tokens)
    else:
        tp = planner["throughputs"][throughput_key].get(engine)
        if tp is None:
            plan.notes.append(f"no throughput for engine {engine!r} in planner.throughputs.{throughput_key}")
            return
        if not planner["prefix_caching"]:
            line.cached_prompt_tokens = 0.0
        line.gpu_hours = engine_gpu_hours(line.prompt_tokens, line.cached_prompt_tokens,
                                          line.completion_tokens, tp)
        if planner.get("gpu_hour_usd") is not None:
            line.usd = line.gpu_hours * planner["gpu_hour_usd"]


def synthesis_engine(cfg: dict) -> tuple[str, str]:
    """(engine, model name) of synthesis. Every engine is given models.generator.name (for the openai backend,
    the model the endpoint serves, e.g. gpt-4-turbo)."""
    return cfg["synthesis"]["backend"], str(cfg["models"]["generator"]["name"])


def system_tokens(cfg: dict, template: str) -> float:
    """Tokens of a system prompt: the template file's length (workflow_scripts/prompts/), else assumed."""
    try:
        from .templates import load_template

        return len(load_template(template)) / float(cfg["planner"]["assume"]["chars_per_token"])
    except (ImportError, InputError):
        return float(cfg["planner"]["assume"]["system_prompt_tokens"])


def synthesis_groups(cfg: dict, method: str, tokens: list[float], entities: list[int]
                     ) -> list[tuple[str, dict[str, float], str]] | None:
    """(item, token counts, note) for each kind of request of `method`, as the method estimates them
    (synth_framework.Method.estimate); None for a method with no request model here or one that cannot be loaded.

    A request is the kind's system prompt + the article (with its header) [+ the entity list]; the kind's
    system prompt and the article form the per-article prefix that a prefix cache reuses.
    """
    from .synth_framework import get_method

    try:
        m = get_method(method, cfg)
    except InputError as e:
        print(f"warning: synthesis method {method!r}: {e}", file=sys.stderr)
        return None
    return m.estimate(tokens, entities, lambda template: system_tokens(cfg, template))


def synthesis_price(cfg: dict, model: str) -> tuple[dict | None, str]:
    """API price of the generator: synthesis.prices (the ledger's) when set, else planner.prices[model]."""
    sp = cfg["synthesis"]["prices"]
    if sp["input_per_mtok"] or sp["output_per_mtok"]:
        return {"input_per_mtok": sp["input_per_mtok"], "output_per_mtok": sp["output_per_mtok"],
                "cached_input_per_mtok": None}, "synthesis.prices"
    price = cfg["planner"]["prices"].get(model)
    return price, f"planner.prices[{model!r}]"


def batch_price(price: dict, factor: float) -> dict:
    """A Batch API's price: every per-million-token price times `factor` (synthesis.prices.batch_factor)."""
    return {k: (None if v is None else v * factor) if k.endswith("_per_mtok") else v for k, v in price.items()}


def plan_synthesis(cfg: dict, tokens: list[float], entities: list[int], plan: Plan) -> dict[str, float]:
    """Lines for every synthesis method; returns each method's expected corpus size (its completion tokens:
    the paper's corpus is the summaries plus every relation text)."""
    produced: dict[str, float] = {}
    engine, model = synthesis_engine(cfg)
    api = engine in ("openai", "openai_batch")
    price, price_src = synthesis_price(cfg, model) if api else (None, "")
    if engine == "openai_batch" and price is not None:
        factor = float(cfg["synthesis"]["prices"]["batch_factor"])
        price, price_src = batch_price(price, factor), f"{price_src} x batch_factor {factor:g} (Batch API)"
    if api:
        plan.sources["generator"] = f"{model} via {engine} at {price_src}"
    else:
        plan.sources["generator"] = f"{model} on {engine} at planner.throughputs.synthesis.{engine}"
    for method in synth_methods(cfg):
        groups = synthesis_groups(cfg, method, tokens, entities)
        if groups is None:
            plan.notes.append(f"synthesis method {method!r}: the planner has no request model for it; not priced")
            continue
        produced[method] = 0.0
        for item, g, note in groups:
            line = Line("synthesis", f"{method}: {item}", engine, int(g["requests"]), g["prompt"], g["cached"],
                        g["completion"], note=note)
            if api:
                if price is None:
                    plan.notes.append(f"no price for API model {model!r} (synthesis.prices or planner.prices)")
                else:
                    if price.get("cached_input_per_mtok") is None:
                        line.cached_prompt_tokens = 0.0  # billed in full
                    line.usd = api_usd(line.prompt_tokens, line.completion_tokens, price, line.cached_prompt_tokens)
            else:
                _price_engine(line, engine, model, cfg, "synthesis", plan)
            plan.lines.append(line)
            produced[method] += g["completion"]
    return produced


def plan_cpt(cfg: dict, raw_tokens: float, produced: dict[str, float], plan: Plan) -> list[tuple[str, str]]:
    """Lines for every CPT run (Raw baseline + method x budget); returns the model ids to evaluate."""
    cpt, planner = cfg["cpt"], cfg["planner"]
    base = cfg["models"]["base"]["name"]
    params, src = model_params(base, planner["model_params"])
    plan.sources["base model"] = f"{base}: {params / 1e9:.3g}B parameters ({src})"
    epochs, raw_epochs = float(cpt["epochs"]), float(cpt["raw_epochs"])
    gpus = int(cpt["resources"]["gpu"])
    # a fraction budget (rRATIO, cpt.budget_unit: fraction) is that share of the method's estimated corpus
    runs = [(m, b, raw_tokens if b == "all" else (nominal_tokens(b, produced.get(m)) or 0.0),
             raw_epochs if b == "all" else epochs) for m, b in cpt_models(cfg)]
    models = []
    capped: dict[str, list[str]] = {}
    for method, budget, tokens, ep in runs:
        corpus = produced.get(method)
        note = ""
        if corpus is not None and tokens > corpus * 1.0001:
            if cpt["allow_budget_cap"]:
                # the run trains on the whole (smaller) corpus; its model is a duplicate of the largest one
                capped.setdefault(method, []).append(budget)
                tokens, note = corpus, " (capped at the estimated corpus)"
            else:
                plan.notes.append(f"cpt budget {budget} exceeds the estimated {method} corpus ({corpus:,.0f} "
                                  "tokens): training would stop with an error (cpt.allow_budget_cap is false)")
        train = tokens * ep
        gh = train_gpu_hours(train, params, planner["peak_flops"], planner["utilisation"])
        where = (f"{gh / gpus:,.1f} h on {gpus} GPUs" if gpus > 1 else "on 1 GPU" if gpus == 1
                 else "cpt.resources.gpu = 0")
        line = Line("cpt", model_id(method, budget), "train", 1, train_tokens=train, gpu_hours=gh,
                    note=f"{tokens:,.0f} tokens x {ep:g} epochs{note}; {where}")
        if planner.get("gpu_hour_usd") is not None:
            line.usd = gh * planner["gpu_hour_usd"]
        plan.lines.append(line)
        models.append((method, budget))
    for method, bs in capped.items():
        gh = sum(x.gpu_hours or 0 for x in plan.lines if x.stage == "cpt" and x.item.split("-")[0] == method
                 and x.item.rsplit("-", 1)[1] in bs)
        plan.notes.append(f"{len(bs)} {method} budgets ({human(float(bs[0]))} to {human(float(bs[-1]))} tokens) "
                          f"exceed its estimated corpus ({human(produced[method])} tokens) and would each retrain on "
                          f"the whole corpus (cpt.allow_budget_cap): {gh:,.0f} GPU-h of duplicate runs; "
                          "trim cpt.budgets once synthesis reports the corpus size")
    return models


def fewshot_tokens(cfg: dict, root: Path) -> tuple[float, str]:
    """Tokens of the shared few-shot QA prefix: the configured prompt file's length if it exists, else assumed."""
    assume = cfg["planner"]["assume"]
    name = cfg["evaluation"]["prompt_prefix"]
    if name:
        from .templates import load_template

        for candidate in (name, root / name):
            try:
                text = load_template(candidate, keep_final_newline=True, skip_comment_header=True)
            except InputError:
                continue
            return len(text) / float(assume["chars_per_token"]), str(name)
    return float(assume["qa_fewshot_tokens"]), "planner.assume.qa_fewshot_tokens"


def qa_line(cfg: dict, mode: str, engine: str, model: str, n_models: int, n_questions: int, prefix: float,
            label: str, plan: Plan, extra_prompt: float = 0.0) -> Line:
    """Closed-book QA of `n_models` models in one mode: `loglik` scores the four options with one forward
    pass per question; `cot` samples n completions per question (they share the prompt)."""
    ev, assume = cfg["evaluation"], cfg["planner"]["assume"]
    question = float(assume["qa_question_tokens"]) + extra_prompt
    prompt = n_questions * (prefix + question)
    # the few-shot prefix is shared by every question (prefix cache / the scorer's reused prefix KV)
    cached = max(n_questions - 1, 0) * prefix
    if mode == "loglik":
        completion, note = 0.0, "option log-likelihood: one forward pass per question"
        if not ev["loglik"]["reuse_prefix_cache"]:
            cached = 0.0
    else:
        n = int(ev["cot"]["n"])
        mean = assume["qa_completion_tokens"]
        new = float(mean if mean is not None else ev["cot"]["max_new_tokens"])
        completion = n_questions * n * new
        note = f"5-shot CoT: {n} sample(s) x {new:g} new tokens per question"
    line = Line("evaluation", f"QA {mode}: {label}", engine, n_models * n_questions, n_models * prompt,
                n_models * cached, n_models * completion, note=note)
    if engine == "openai":
        price = cfg["planner"]["prices"].get(model) or {}
        if price.get("cached_input_per_mtok") is None:
            line.cached_prompt_tokens = 0.0
    _price_engine(line, engine, model, cfg, "evaluation", plan)
    return line


def plan_evaluation(cfg: dict, root: Path, n_questions: int, models: list[tuple[str, str]], plan: Plan) -> None:
    """Closed-book QA of every local model (base, Raw CPT, each method x budget) and each API model; the RAG
    baseline when enabled (its prompts carry top_k retrieved chunks)."""
    ev = cfg["evaluation"]
    model_ids = ["base"] + [model_id(m, b) for m, b in models]
    max_q = ev["max_questions"]
    n_q = min(n_questions, int(max_q)) if max_q else n_questions
    prefix, src = fewshot_tokens(cfg, root)
    plan.sources["QA prompt"] = f"{n_q:,} questions per model; few-shot prefix {prefix:,.0f} tokens ({src})"
    base = cfg["models"]["base"]["name"]
    modes, cot_engine = ev["modes"], ev["cot"]["engine"]
    for mode in modes:
        engine = "transformers" if mode == "loglik" else cot_engine
        plan.lines.append(qa_line(cfg, mode, engine, base, len(model_ids), n_q, prefix,
                                  f"{len(model_ids)} local models", plan))
    for spec in ev["api_models"]:
        for mode in spec["modes"]:
            plan.lines.append(qa_line(cfg, mode, spec["engine"], spec["model"], 1, n_q, prefix,
                                      f"api-{spec['name']}", plan))
    rag = ev["rag"]
    if rag["enabled"]:
        chunks = float(rag["top_k"]) * float(rag["chunk_size"]) / float(
            cfg["planner"]["assume"]["chars_per_token"])
        ids = rag_models(cfg)
        for mode in rag["modes"] or modes:
            engine = "transformers" if mode == "loglik" else cot_engine
            # retrieved chunks differ per question: they add uncached prompt tokens after the shared prefix
            line = qa_line(cfg, mode, engine, base, len(ids), n_q, prefix, f"RAG, {len(ids)} models", plan,
                           extra_prompt=chunks)
            line.stage = "evaluation"
            plan.lines.append(line)


def startup_line(cfg: dict, stage: str, jobs: int, gpus_per_job: int) -> Line | None:
    """GPU time the jobs of a stage spend before their first token or step (model load, vLLM's CUDA graphs, FSDP
    set-up): planner.job_startup_s per job and GPU. None for CPU-only jobs."""
    if jobs <= 0 or gpus_per_job <= 0:
        return None
    gh = jobs * gpus_per_job * float(cfg["planner"]["job_startup_s"]) / 3600
    line = Line(stage, f"job start-up x {jobs} jobs", "-", gpu_hours=gh,
                note=f"{cfg['planner']['job_startup_s']:g} s x {gpus_per_job} GPU(s) per job")
    if cfg["planner"].get("gpu_hour_usd") is not None:
        line.usd = gh * cfg["planner"]["gpu_hour_usd"]
    return line


def make_plan(cfg: dict, root: Path = ROOT, articles: str | None = None) -> Plan:
    """The whole plan for a validated config (pure apart from reading the prepared data, if any)."""
    plan = Plan(run_name=cfg["run_name"])
    tokens, src = article_tokens(cfg, root, articles)
    plan.sources["articles"] = src
    from_file = not src.startswith("planner.assume")
    uids = None
    if from_file:
        path = Path(articles) if articles else root / ARTICLES
        with open(path, encoding="utf-8") as f:
            uids = [json.loads(x).get("uid") for x in f if x.strip()]
    entities, esrc = entity_counts(cfg, root, len(tokens), uids)
    methods = synth_methods(cfg)
    extraction = any(method_needs_entities(m, cfg) for m in methods)
    if extraction:
        plan.sources["entities"] = esrc
    produced = plan_synthesis(cfg, tokens, entities, plan)
    # jobs as the rules cut them (synthesis.article_shards): one extraction job (when a method reads entities) and
    # one job per method for each shard of synthesis.articles_per_job articles (each starts its engine once)
    n_shards = len(article_shards(uids or [str(i) for i in range(len(tokens))], cfg["synthesis"]["articles_per_job"]))
    n_syn_jobs = n_shards * (extraction + len(methods))
    lines = [startup_line(cfg, "synthesis", n_syn_jobs, int(cfg["synthesis"]["resources"]["gpu"]))]
    models = plan_cpt(cfg, float(sum(tokens)), produced, plan)
    lines.append(startup_line(cfg, "cpt", len(models), int(cfg["cpt"]["resources"]["gpu"])))
    n_q, qsrc = question_count(cfg, root, from_file, len(tokens))
    plan.sources["questions"] = qsrc
    plan_evaluation(cfg, root, n_q, models, plan)
    ev = cfg["evaluation"]
    n_eval_jobs = 1 + len(models) + (len(rag_models(cfg)) if ev["rag"]["enabled"] else 0)
    lines.append(startup_line(cfg, "evaluation", n_eval_jobs, int(ev["resources"]["gpu"])))
    for line in lines:
        if line is not None:
            # keep each stage's lines together: insert after the stage's last line
            idx = max(i for i, x in enumerate(plan.lines) if x.stage == line.stage) + 1
            plan.lines.insert(idx, line)
    return plan


# ---------------------------------------------------------------------------------------------- output
def human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:,.2f}{suffix}{unit}"
    return f"{x:,.0f}{unit}" if x == int(x) else f"{x:,.2f}{unit}"


def hours(x: float | None) -> str:
    if x is None:
        return "-"
    if 0 < x < 0.01:
        return "<0.01"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def render(plan: Plan, cfg: dict) -> str:
    p = cfg["planner"]
    out = [f"Plan for run {plan.run_name!r} (GPU: {p['gpu_type']}, peak {p['peak_flops'] / 1e12:g} TFLOP/s, "
           f"utilisation {p['utilisation']:g})"]
    out += [f"  {k}: {v}" for k, v in plan.sources.items()]
    head = ("stage", "item", "engine", "requests", "prompt tok", "cached", "completion", "train tok", "USD",
            "GPU-h")
    rows = [head]
    stages = []
    for x in plan.lines:
        if x.stage not in stages:
            stages.append(x.stage)
    cpt_lines = [x for x in plan.lines if x.stage == "cpt" and x.engine == "train"]
    for x in plan.lines:
        if x in cpt_lines and len(cpt_lines) > 8 and x is not cpt_lines[0] and x is not cpt_lines[-1]:
            continue  # long scaling curves: show the first and last run; the subtotal has them all
        rows.append((x.stage, x.item, x.engine, human(x.requests), human(x.prompt_tokens),
                     human(x.cached_prompt_tokens), human(x.completion_tokens), human(x.train_tokens),
                     human(x.usd), hours(x.gpu_hours)))
        if x.stage == "cpt" and len(cpt_lines) > 8 and x is cpt_lines[0]:
            rows.append(("cpt", f"... {len(cpt_lines) - 2} more runs ...", "", "", "", "", "", "", "", ""))
    for s in stages + [None]:
        usd = [x.usd for x in plan.lines if (s is None or x.stage == s)]
        gh = [x.gpu_hours for x in plan.lines if (s is None or x.stage == s)]
        rows.append(("TOTAL" if s is None else s, "subtotal" if s else "", "",
                     human(plan.total("requests", s)), human(plan.total("prompt_tokens", s)),
                     human(plan.total("cached_prompt_tokens", s)), human(plan.total("completion_tokens", s)),
                     human(plan.total("train_tokens", s)),
                     human(plan.total("usd", s)) if any(u is not None for u in usd) else "-",
                     hours(plan.total("gpu_hours", s)) if any(g is not None for g in gh) else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    sep = "  "
    for i, r in enumerate(rows):
        if r[1] == "subtotal" or r[0] == "TOTAL":
            if rows[i - 1][1] != "subtotal":
                out.append(sep.join("-" * w for w in widths))
        out.append(sep.join(str(c).ljust(w) if j < 3 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
    cached = plan.total("cached_prompt_tokens", "synthesis")
    if cached:
        out.append(f"Prefix caching avoids {human(cached)} of {human(plan.total('prompt_tokens', 'synthesis'))} "
                   "synthesis prompt tokens (requests are ordered by article; the article prefix is computed "
                   "once per article). An API without caching bills all of them.")
    out += [f"note: {n}" for n in dict.fromkeys(plan.notes)]
    out.append("Completion tokens use planner.assume means where set, else max_new_tokens (an upper bound). "
               "GPU-hours: local engines at planner.throughputs; CPT at 6 x params FLOPs/token.")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- memory
def render_memory(jobs: list, cfg: dict) -> str:
    """The memory table (workflow_scripts/memory.py): each GPU job kind's estimated peak per GPU, its parts, and
    for a job that does not fit, the cheapest fix."""
    from .memory import GIB, gpu_memory_gib

    p = cfg["planner"]
    if not jobs:
        return "Memory: no GPU jobs in this config (every resources.gpu is 0 or the engines are APIs)."
    gib, src = gpu_memory_gib(p["gpu_type"], p.get("gpu_memory_gib"))
    out = [f"Memory per GPU (planner.gpu_type {p['gpu_type']!r}: {gib:g} GiB from {src}; a job fits when its peak "
           f"x {1 + p['memory_fragmentation']:g} + {p['memory_reserve_gib']:g} GiB is within it):"]
    head = ("job", "engine", "GPUs", "peak GiB", "weights", "grads", "optim", "activ", "logits", "KV", "other", "fits")
    rows = [head]
    for j in jobs:
        e = j.estimate
        if e is None:
            rows.append((j.job, j.engine, str(j.gpus), "?", "", "", "", "", "", "", "", "unknown"))
            continue
        cells = [f"{e.parts.get(k, 0) / GIB:.1f}" if k in e.parts else "-"
                 for k in ("weights", "grads", "optimizer", "activations", "logits", "kv_cache", "other")]
        rows.append((j.job, j.engine, str(j.gpus), f"{e.gib():.1f}", *cells, "yes" if j.fits else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out += ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]
    for j in jobs:
        detail = f"  {j.job}: {j.model}; {j.note}"
        if j.estimate is not None and j.engine == "train":
            detail += f"; peak at the {j.estimate.phase}"
        out.append(detail)
        if j.fits is False:
            fixed = f" (then about {j.fixed_estimate.gib():.1f} GiB)" if j.fixed_estimate is not None else ""
            out.append(f"    DOES NOT FIT. Cheapest fix: {j.fix or 'none found'}{fixed}")
    if p.get("memory_check", True) and any(j.fits is False for j in jobs):
        out.append("snakemake will refuse this run (planner.memory_check: false overrides).")
    return "\n".join(out)


def memory_dict(jobs: list) -> list[dict]:
    """The memory table as JSON records (bytes)."""
    return [{"job": j.job, "engine": j.engine, "model": j.model, "gpus": j.gpus, "gpu_bytes": j.gpu_bytes,
             "peak_bytes": None if j.estimate is None else j.estimate.total_bytes,
             "parts": None if j.estimate is None else j.estimate.parts,
             "phase": None if j.estimate is None else j.estimate.phase, "fits": j.fits, "fix": j.fix,
             "note": j.note} for j in jobs]


def config_files(given: Iterable[str] | None) -> list[Path]:
    """Snakemake's order: the Snakefile's config.yaml first, then every --configfile."""
    files = [Path(f) for f in (given or [])]
    if not files or files[0].resolve() != DEFAULT_CONFIG.resolve():
        files.insert(0, DEFAULT_CONFIG)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = stage.parser("plan", __doc__.split("\n\n")[0])
    ap.add_argument("--configfile", nargs="+", default=None, metavar="YAML",
                    help="config overlays, merged after the repository's config.yaml (as Snakemake does)")
    ap.add_argument("--articles", default=None,
                    help="articles.jsonl to price (default: results/data/articles.jsonl when it matches the "
                         "config's data selection, else planner.assume)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)

    def body() -> None:
        cfg = load_config(config_files(args.configfile))
        plan = make_plan(cfg, ROOT, args.articles)
        from .memory import plan_memory

        jobs = plan_memory(cfg, ROOT)
        if args.json:
            print(json.dumps({**plan.to_dict(), "memory": memory_dict(jobs)}, indent=2))
        else:
            print(render(plan, cfg) + "\n\n" + render_memory(jobs, cfg))

    return stage.run(body, errors=(InputError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
