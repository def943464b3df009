"""Stage 9 input: one table of QA accuracies over all evaluated models (the figures and the fit read it).

    python -m workflow_scripts.aggregate qa --summaries results/eval/qa/*.json --models-dir results/models \\
        --output results/tables/qa_accuracy.csv
    python -m workflow_scripts.aggregate rag --summaries results/eval/rag/*.json --output results/tables/rag_accuracy.csv

One row per model and scoring mode: model, method, budget_tokens, mode, accuracy, ci_low, ci_high, n (accuracies
are fractions, the interval is Wilson's; which number they are is evaluation.report, named in words by the
`plotted` column), then every reported number (accuracy/n/ci_low/ci_high_{all,val,test}_{wrong,dropped} and
attempted_{all,val,test}: all questions and the reference code's val/test article split, each under both
conventions), then accuracy_attempted and attempted (CoT's two conventions), the
bootstrap interval, the split by QuALITY's `difficult` flag, the three loglik normalizations, and from the CPT
model's train_summary.json the tokens it trained on. method is `base` for the base model (budget_tokens empty),
`raw` for Raw CPT (budget_tokens = the raw corpus tokens when its train_summary.json says so, else empty), `api`
for API references (empty), `external` for evaluation-only models (ext-NAME, empty), else the synthesis method
with its synthetic-token budget (for a fraction budget rRATIO, the tokens of its train summary). `kind` is base |
cpt | api | external, `label` an external model's configured label (else the id), `budget_fraction` the budget as
a fraction of the method's corpus (train summary: budget_tokens / corpus_total_tokens).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from . import stage
from .io_utils import InputError, atomic_path
from .layout import parse_model_id

QA_COLUMNS = [
    "model", "method", "budget_tokens", "mode", "accuracy", "ci_low", "ci_high", "n",
    "accuracy_attempted", "attempted", "bootstrap_low", "bootstrap_high",
    "accuracy_difficult", "n_difficult", "accuracy_not_difficult", "n_not_difficult",
    "accuracy_sum", "accuracy_per_token", "accuracy_per_char",
    "train_tokens_seen", "train_epochs", "budget_capped", "prefix_version", "config_hash",
]
# Every reported number (issue 12): all questions and the reference code's val/test article split, each under both
# conventions, with its n and 95% Wilson interval; `plotted` names the one copied into accuracy/ci_low/ci_high/n.
SPLITS = ("all", "val", "test")
CONVENTIONS = {"wrong": "unparseable counted wrong", "dropped": "unparseable dropped"}
SPLIT_LABELS = {"all": "all questions", "val": "val split (first 20% of articles)",
                "test": "test split (last 80% of articles)"}
REPORTED_COLUMNS = ["plotted"] + [f"{stat}_{split}_{conv}" for split in SPLITS for conv in CONVENTIONS
                                  for stat in ("accuracy", "n", "ci_low", "ci_high")] + [f"attempted_{s}" for s in SPLITS]
QA_COLUMNS = QA_COLUMNS[:8] + REPORTED_COLUMNS + QA_COLUMNS[8:] + ["kind", "label", "budget_fraction"]
RAG_COLUMNS = QA_COLUMNS[:8] + REPORTED_COLUMNS + ["retriever", "top_k", "recall_at_k", "recall_at_k_bm25", "recall_at_k_embedding",
                                "recall_at_k_hybrid", "accuracy_attempted", "attempted", "prefix_version",
                                "config_hash", "kind", "label", "budget_fraction"]


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
    """results/models/{method}/{budget}/train_summary.json of a CPT model, or {} when absent."""
    if models_dir is None or method in ("base", "api", "external"):
        return {}
    budget = model.rpartition("-")[2]
    path = Path(models_dir) / method / budget / "train_summary.json"
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


def _split(block: dict, name: str) -> tuple[Any, Any]:
    part = (block.get("by_difficulty") or {}).get(name) or {}
    return part.get("accuracy"), part.get("n")


def plotted_label(split: str, convention: str, val_fraction: float | None = None) -> str:
    """What the accuracy column holds, in words (the figures print it)."""
    label = SPLIT_LABELS[split]
    if val_fraction is not None and split != "all":
        pct = round(val_fraction * 100)
        label = label.replace("20%", f"{pct}%").replace("80%", f"{100 - pct}%")
    return f"{label}, {CONVENTIONS[convention]}"


def reported_columns(block: dict, split: str, convention: str, val_fraction: float | None) -> dict:
    """The per-split, per-convention columns of one mode block, and the selected number as accuracy/ci/n.

    A summary written before these numbers existed has only all questions (the counted-wrong one in `accuracy`);
    asking it for another number is an InputError naming what to re-run."""
    rep = block.get("reported") or {}
    row: dict[str, Any] = {}
    for sp in SPLITS:
        part = rep.get(sp) or {}
        row[f"attempted_{sp}"] = part.get("attempted")
        for conv in CONVENTIONS:
            vals = part.get(conv) or {}
            for stat in ("accuracy", "n", "ci_low", "ci_high"):
                row[f"{stat}_{sp}_{conv}"] = vals.get(stat)
    if rep.get(split, {}).get(convention):
        chosen = rep[split][convention]
        row.update({k: chosen.get(k) for k in ("accuracy", "n", "ci_low", "ci_high")})
    elif (split, convention) != ("all", "wrong"):
        raise InputError(f"model {block.get('model', '')}: its summary has no {split}/{convention} accuracy "
                         "(written before the split was recorded); re-run its evaluation")
    row["plotted"] = plotted_label(split, convention, val_fraction)
    return row


def summary_rows(summary: dict, models_dir: str | Path | None = None, split: str = "all",
                 convention: str = "wrong") -> list[dict]:
    """Table rows of one summary, one per scoring mode; accuracy/ci_low/ci_high/n hold the `split` x `convention`
    number (evaluation.report)."""
    model = summary["model"]
    method, budget = parse_model_id(model)
    ts = train_summary(models_dir, method, model)
    if budget is None and model_kind(model) == "cpt":
        # Raw CPT (the whole raw corpus) and fraction budgets (rRATIO): the token count the model trained on
        budget = ts.get("budget_tokens")
    rows = []
    for mode, block in summary["modes"].items():
        boot = block.get("bootstrap_ci") or [None, None]
        acc_d, n_d = _split(block, "difficult")
        acc_nd, n_nd = _split(block, "not_difficult")
        row = {
            "model": model, "method": method, "budget_tokens": budget, "mode": mode,
            "accuracy": block["accuracy"], "ci_low": block["ci_low"], "ci_high": block["ci_high"], "n": block["n"],
            "accuracy_attempted": block.get("accuracy_attempted"), "attempted": block.get("attempted"),
            "bootstrap_low": boot[0], "bootstrap_high": boot[1],
            "accuracy_difficult": acc_d, "n_difficult": n_d, "accuracy_not_difficult": acc_nd,
            "n_not_difficult": n_nd,
            "accuracy_sum": block.get("accuracy_sum"), "accuracy_per_token": block.get("accuracy_per_token"),
            "accuracy_per_char": block.get("accuracy_per_char"),
            "train_tokens_seen": ts.get("tokens_seen"), "train_epochs": ts.get("epochs"),
            "budget_capped": ts.get("budget_capped"),
            "prefix_version": summary.get("prefix_version"), "config_hash": summary.get("config_hash"),
            "kind": model_kind(model), "label": model_label(summary), "budget_fraction": budget_fraction(ts),
        }
        row.update(reported_columns({**block, "model": model}, split, convention,
                                    (summary.get("split") or {}).get("val_fraction")))
        if "retrieval" in summary:
            ret = summary["retrieval"]
            row.update({"retriever": ret.get("retriever"), "top_k": ret.get("top_k"),
                        "recall_at_k": ret.get("recall_at_k", {}).get(ret.get("retriever"))})
            for name in ("bm25", "embedding", "hybrid"):
                row[f"recall_at_k_{name}"] = ret.get("recall_at_k", {}).get(name)
        rows.append(row)
    return rows


def sort_key(row: dict) -> tuple:
    order = {"base": 0, "raw": 1, "api": 3, "external": 4}
    return (order.get(row["method"], 2), row["method"], row["budget_tokens"] or 0, row["mode"], row["model"])


def write_table(rows: Iterable[dict], columns: list[str], output: str | Path) -> int:
    rows = sorted(rows, key=sort_key)
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return len(rows)


def aggregate(summaries: Iterable[str | Path], output: str | Path, models_dir: str | Path | None = None,
              columns: list[str] = QA_COLUMNS, split: str = "all", convention: str = "wrong") -> int:
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
    return write_table(rows, columns, output)


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("aggregate", __doc__)
    p.add_argument("table", choices=["qa", "rag"], help="qa: closed-book table; rag: open-book table")
    p.add_argument("--summaries", nargs="+", required=True, help="results/eval/{qa,rag}/MODEL.json files")
    p.add_argument("--models-dir", default="results/models", help="where CPT models keep train_summary.json")
    p.add_argument("--output", required=True)
    p.add_argument("--report-split", choices=SPLITS, default="all",
                   help="evaluation.report.split: which questions the accuracy column covers")
    p.add_argument("--report-convention", choices=list(CONVENTIONS), default="wrong",
                   help="evaluation.report.convention: unparseable answers counted wrong or dropped")
    args = p.parse_args(argv)

    def body() -> None:
        n = aggregate(args.summaries, args.output, args.models_dir, QA_COLUMNS if args.table == "qa" else RAG_COLUMNS,
                      args.report_split, args.report_convention)
        print(json.dumps({"output": args.output, "rows": n}))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
