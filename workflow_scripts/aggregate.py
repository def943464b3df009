"""Stage 9 input: the accuracies of every evaluated model as one long (tidy) table, and its headline rows.

    python -m workflow_scripts.aggregate qa --summaries results/eval/qa/*.json --models-dir results/models \\
        --output results/tables/qa_accuracy.csv --headline results/tables/qa_headline.csv
    python -m workflow_scripts.aggregate rag --summaries results/eval/rag/*.json \\
        --output results/tables/rag_accuracy.csv

One row per model x scoring mode x split x convention x metric (docs/evaluation.md, "The accuracy table"):

- model, kind (base | cpt | api | external), label (an external model's configured label, else the id), method
  (`base`, `raw`, `api`, `external`, or the synthesis method), budget (the id's budget label: a token count,
  rRATIO or `all`; empty for base/api/external), budget_tokens (the tokens trained on: the label's count, or for
  Raw CPT and fraction budgets the train summary's), budget_fraction (budget_tokens / the method's corpus tokens),
  budget_capped, train_tokens_seen, train_epochs (from the CPT model's train_summary.json);
- mode (loglik | cot), split (all | val | test: the reference code's article split; difficult | not_difficult:
  QuALITY's flag), split_label (the split in words), convention (wrong: an unparseable answer counts wrong;
  dropped: it leaves the denominator; empty for metrics without one), metric (accuracy; attempted, the fraction
  of questions with a readable answer; accuracy_bootstrap, the same accuracy with the bootstrap interval;
  accuracy_sum / accuracy_per_token / accuracy_per_char, loglik's three normalizations), value, n (the
  denominator), ci_low, ci_high, interval (which interval: wilson 95% | bootstrap 95%);
- headline: True on the one row per model and mode that the figure and the fit use (evaluation.report's split and
  convention, metric accuracy); note: why a value is empty (`no attempted answers`: n = 0 under the dropped
  convention; `no questions in this split`); prefix_version, config_hash of the evaluation.

Accuracies are fractions. A model that answered nothing readable keeps its rows, with an empty value and the note:
it is a result, not a failure. The headline table (--headline) holds the headline rows only, with `plotted`, the
reported number in words. The rag table adds retriever and top_k, and the recall of each retriever as metric
recall_at_k_NAME (mode `retrieval`). Pivot it with pandas in one line (README, "Results").
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from . import stage
from .io_utils import InputError, atomic_path
from .layout import MODELS, budget_of, model_subdir, parse_model_id

MODEL_COLUMNS = ["model", "kind", "label", "method", "budget", "budget_tokens", "budget_fraction", "budget_capped"]
VALUE_COLUMNS = ["mode", "split", "split_label", "convention", "metric", "value", "n", "ci_low", "ci_high",
                 "interval", "headline", "note"]
PROVENANCE_COLUMNS = ["train_tokens_seen", "train_epochs", "prefix_version", "config_hash"]
QA_COLUMNS = MODEL_COLUMNS + VALUE_COLUMNS + PROVENANCE_COLUMNS
RAG_COLUMNS = QA_COLUMNS + ["retriever", "top_k"]
# The headline table: the plotted number per model and mode (what the figure and the fit read), in words too.
HEADLINE_COLUMNS = [c for c in MODEL_COLUMNS + VALUE_COLUMNS if c not in ("headline", "interval")] + ["plotted"]

SPLITS = ("all", "val", "test")
CONVENTIONS = {"wrong": "unparseable counted wrong", "dropped": "unparseable dropped"}
SPLIT_LABELS = {"all": "all questions", "val": "val split (first 20% of articles)",
                "test": "test split (last 80% of articles)", "difficult": "questions flagged difficult",
                "not_difficult": "questions not flagged difficult"}
NORMALIZATIONS = ("accuracy_sum", "accuracy_per_token", "accuracy_per_char")
NO_ATTEMPTS = "no attempted answers"
NO_QUESTIONS = "no questions in this split"
# row order inside a model: metric, then split, then convention
METRIC_ORDER = {"accuracy": 0, "attempted": 1, "accuracy_bootstrap": 2}
SPLIT_ORDER = {s: i for i, s in enumerate(("all", "val", "test", "difficult", "not_difficult"))}
CONVENTION_ORDER = {"wrong": 0, "dropped": 1, "": 2}


def model_kind(model: str) -> str:
    """What a model id is (issue 21): base, api (an API reference), external (evaluation-only, ext-NAME:
    evaluation.external_models), else cpt (Raw CPT and every method x budget, trained by this workflow)."""
    if model == "base":
        return "base"
    if model.startswith("api-"):
        return "api"
    if model.startswith("ext-"):
        return "external"
    return "cpt"


def model_label(summary: dict) -> str:
    """The label a table row and a legend show: an external model's configured label (its summary's `external`),
    else the model id."""
    ext = summary.get("external") or {}
    return ext.get("label") or summary["model"]


def budget_fraction(ts: dict) -> float | None:
    """The budget as a fraction of the method's corpus (the authors' subsample_ratio; docs/cpt.md "Budgets"):
    budget_tokens / corpus_total_tokens of the train summary, None when it does not say."""
    tokens, total = ts.get("budget_tokens"), ts.get("corpus_total_tokens")
    return tokens / total if tokens and total else None


def train_summary(models_dir: str | Path | None, method: str, model: str) -> dict:
    """results/models/{method}/{budget}/train_summary.json of a CPT model (a LoRA twin's: {budget}-lora), or {} when
    absent."""
    if models_dir is None or method in ("base", "api", "external"):
        return {}
    path = Path(models_dir) / model_subdir(model) / "train_summary.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e.msg}); re-run the cpt rule for {model}") from None


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: evaluation summary not found; run the eval_qa rule for it") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e.msg}); delete it and re-run its evaluation") from None
    for key in ("model", "modes"):
        if key not in summary:
            raise InputError(f"{path}: missing {key!r}; not a qa_eval/rag summary (re-run its evaluation)")
    return summary


def split_label(split: str, val_fraction: float | None = None) -> str:
    """A split in words; val/test name their share of the articles (evaluation.report.val_fraction)."""
    label = SPLIT_LABELS[split]
    if val_fraction is not None and split in ("val", "test"):
        pct = round(val_fraction * 100)
        label = label.replace("20%", f"{pct}%").replace("80%", f"{100 - pct}%")
    return label


def plotted_label(split: str, convention: str, val_fraction: float | None = None) -> str:
    """The headline number in words (the figure prints it under its y axis)."""
    return f"{split_label(split, val_fraction)}, {CONVENTIONS[convention]}"


def _number(v: Any) -> Any:
    """A JSON number, or None for null/NaN (an empty split, no attempted question)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _value_row(split: str, convention: str, metric: str, value: Any, n: Any = None, ci: Any = (None, None),
               interval: str = "", questions: Any = None) -> dict:
    """One value of a mode block. An accuracy over no question keeps its row, with the reason in `note`."""
    value, lo, hi = _number(value), _number(ci[0]), _number(ci[1])
    note = ""
    if value is None:
        if n == 0 and convention == "dropped" and questions:
            note = NO_ATTEMPTS
        elif n == 0 or questions == 0:
            note = NO_QUESTIONS
        else:
            note = "not in the evaluation summary"
    return {"split": split, "convention": convention, "metric": metric, "value": value, "n": n,
            "ci_low": lo if value is not None else None, "ci_high": hi if value is not None else None,
            "interval": interval if value is not None and lo is not None else "", "note": note}


def mode_rows(block: dict, mode: str) -> list[dict]:
    """The long rows of one scoring mode's summary block (qa_eval.summarize)."""
    wilson = str(block.get("ci_method") or "wilson")
    rows = []
    rep = block.get("reported") or {}
    for sp in SPLITS:
        part = rep.get(sp)
        if not part:
            continue
        for conv in CONVENTIONS:
            vals = part.get(conv) or {}
            rows.append(_value_row(sp, conv, "accuracy", vals.get("accuracy"), vals.get("n"),
                                   (vals.get("ci_low"), vals.get("ci_high")), wilson, part.get("questions")))
        rows.append(_value_row(sp, "", "attempted", part.get("attempted"), part.get("questions")))
    if not rep:  # a summary written before the split was recorded: all questions only
        rows.append(_value_row("all", "wrong", "accuracy", block.get("accuracy"), block.get("n"),
                               (block.get("ci_low"), block.get("ci_high")), wilson, block.get("n")))
        if mode != "loglik" and block.get("accuracy_attempted") is not None:
            rows.append(_value_row("all", "dropped", "accuracy", block["accuracy_attempted"],
                                   block.get("n_attempted"), block.get("ci_attempted") or (None, None), wilson,
                                   block.get("n")))
        if block.get("attempted") is not None:
            rows.append(_value_row("all", "", "attempted", block["attempted"], block.get("n")))
    if block.get("bootstrap_ci"):
        rows.append(_value_row("all", "wrong", "accuracy_bootstrap", block.get("accuracy"), block.get("n"),
                               block["bootstrap_ci"], wilson.replace("wilson", "bootstrap")))
    for name in ("difficult", "not_difficult"):
        part = (block.get("by_difficulty") or {}).get(name)
        if part:
            rows.append(_value_row(name, "wrong", "accuracy", part.get("accuracy"), part.get("n"),
                                   (part.get("ci_low"), part.get("ci_high")), wilson, part.get("n")))
    for metric in NORMALIZATIONS:
        if block.get(metric) is not None:
            rows.append(_value_row("all", "wrong", metric, block[metric], block.get("n")))
    return rows


def summary_rows(summary: dict, models_dir: str | Path | None = None, split: str = "all",
                 convention: str = "wrong") -> list[dict]:
    """The long rows of one evaluation summary; `headline` marks the `split` x `convention` accuracy of each mode
    (evaluation.report). Asking an old summary (all questions only) for another split is an InputError."""
    model = summary["model"]
    method, budget_tokens = parse_model_id(model)
    ts = train_summary(models_dir, method, model)
    if budget_tokens is None and model_kind(model) == "cpt":
        # Raw CPT (the whole raw corpus) and fraction budgets (rRATIO): the token count the model trained on
        budget_tokens = ts.get("budget_tokens")
    val_fraction = (summary.get("split") or {}).get("val_fraction")
    meta = {"model": model, "kind": model_kind(model), "label": model_label(summary), "method": method,
            "budget": budget_of(model), "budget_tokens": budget_tokens, "budget_fraction": budget_fraction(ts),
            "budget_capped": ts.get("budget_capped"), "train_tokens_seen": ts.get("tokens_seen"),
            "train_epochs": ts.get("epochs"), "prefix_version": summary.get("prefix_version"),
            "config_hash": summary.get("config_hash")}
    if "retrieval" in summary:
        ret = summary["retrieval"]
        meta.update({"retriever": ret.get("retriever"), "top_k": ret.get("top_k")})
    rows = []
    for mode, block in summary["modes"].items():
        values = mode_rows(block, mode)
        head = [v for v in values if (v["split"], v["convention"], v["metric"]) == (split, convention, "accuracy")]
        if not head:
            raise InputError(f"model {model}: its summary has no {split}/{convention} accuracy (written before the "
                             "split was recorded); re-run its evaluation")
        for v in values:
            v["headline"] = v is head[0]
            rows.append({**meta, "mode": mode, "split_label": split_label(v["split"], val_fraction), **v})
    if "retrieval" in summary:
        for name, value in sorted((summary["retrieval"].get("recall_at_k") or {}).items()):
            rows.append({**meta, "mode": "retrieval", "split_label": split_label("all"), "headline": False,
                         **_value_row("all", "", f"recall_at_k_{name}", value, summary.get("n"))})
    return rows


def sort_key(row: dict) -> tuple:
    order = {"base": 0, "raw": 1, "api": 3, "external": 4}
    return (order.get(row["method"], 2), row["method"], row["budget_tokens"] or 0, row["model"], row["mode"],
            METRIC_ORDER.get(row["metric"], 3), row["metric"], SPLIT_ORDER.get(row["split"], 9),
            CONVENTION_ORDER.get(row["convention"], 3))


def _cell(v: Any) -> Any:
    return "" if v is None else v


def write_table(rows: Iterable[dict], columns: list[str], output: str | Path) -> int:
    rows = sorted(rows, key=sort_key)
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _cell(r.get(k)) for k in columns})
    return len(rows)


def headline_rows(rows: Iterable[dict], split: str, convention: str) -> list[dict]:
    """The headline rows (one per model and mode) with the number in words."""
    return [{**r, "plotted": f"{r['split_label']}, {CONVENTIONS[convention]}"} for r in rows if r["headline"]]


def aggregate(summaries: Iterable[str | Path], output: str | Path, models_dir: str | Path | None = None,
              columns: list[str] = QA_COLUMNS, split: str = "all", convention: str = "wrong",
              headline: str | Path | None = None) -> int:
    """Write the long table (and with `headline`, the headline table); return the long table's row count."""
    rows: list[dict] = []
    seen: set[str] = set()
    for path in summaries:
        s = load_summary(path)
        if s["model"] in seen:
            raise InputError(f"{path}: model {s['model']!r} appears twice among the summaries")
        seen.add(s["model"])
        rows.extend(summary_rows(s, models_dir, split, convention))
    if not rows:
        raise InputError("no evaluation summaries given")
    if headline is not None:
        write_table(headline_rows(rows, split, convention), HEADLINE_COLUMNS, headline)
    return write_table(rows, columns, output)


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("aggregate", __doc__)
    p.add_argument("table", choices=["qa", "rag"], help="qa: closed-book table; rag: open-book table")
    p.add_argument("--summaries", nargs="+", required=True, help="results/eval/{qa,rag}/MODEL.json files")
    p.add_argument("--models-dir", default=MODELS, help="where CPT models keep train_summary.json")
    p.add_argument("--output", required=True, help="the long table (results/tables/qa_accuracy.csv)")
    p.add_argument("--headline", default=None, help="the headline table (results/tables/qa_headline.csv)")
    p.add_argument("--report-split", choices=SPLITS, default="all",
                   help="evaluation.report.split: which questions the headline accuracy covers")
    p.add_argument("--report-convention", choices=list(CONVENTIONS), default="wrong",
                   help="evaluation.report.convention: unparseable answers counted wrong or dropped")
    args = p.parse_args(argv)

    def body() -> None:
        n = aggregate(args.summaries, args.output, args.models_dir, QA_COLUMNS if args.table == "qa" else RAG_COLUMNS,
                      args.report_split, args.report_convention, args.headline)
        print(json.dumps({"output": args.output, "headline": args.headline, "rows": n}))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
