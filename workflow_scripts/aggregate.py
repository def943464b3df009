"""Stage 9 input: one table of QA accuracies over all evaluated models (the figures and the fit read it).

    python -m workflow_scripts.aggregate qa --summaries results/eval/qa/*.json --models-dir results/models \\
        --output results/tables/qa_accuracy.csv
    python -m workflow_scripts.aggregate rag --summaries results/eval/rag/*.json --output results/tables/rag_accuracy.csv

One row per model and scoring mode: model, method, budget_tokens, mode, accuracy, ci_low, ci_high, n (accuracies
are fractions, the interval is Wilson's), then accuracy_attempted and attempted (CoT's two conventions), the
bootstrap interval, the split by QuALITY's `difficult` flag, the three loglik normalizations, and from the CPT
model's train_summary.json the tokens it trained on. method is `base` for the base model (budget_tokens empty),
`raw` for Raw CPT (budget_tokens = the raw corpus tokens when its train_summary.json says so, else empty), `api`
for API references (empty), else the synthesis method with its synthetic-token budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from .io_utils import InputError, atomic_path

QA_COLUMNS = [
    "model", "method", "budget_tokens", "mode", "accuracy", "ci_low", "ci_high", "n",
    "accuracy_attempted", "attempted", "bootstrap_low", "bootstrap_high",
    "accuracy_difficult", "n_difficult", "accuracy_not_difficult", "n_not_difficult",
    "accuracy_sum", "accuracy_per_token", "accuracy_per_char",
    "train_tokens_seen", "train_epochs", "budget_capped", "prefix_version", "config_hash",
]
RAG_COLUMNS = QA_COLUMNS[:8] + ["retriever", "top_k", "recall_at_k", "recall_at_k_bm25", "recall_at_k_embedding",
                                "recall_at_k_hybrid", "accuracy_attempted", "attempted", "prefix_version",
                                "config_hash"]


def parse_model_id(model: str) -> tuple[str, int | None]:
    """(method, budget) of a model id: base, raw-all, api-NAME or METHOD-BUDGET; `ID-instruct` (instruction-tuned,
    workflow_scripts/instruct.py) is its own series: (`{method of ID}-instruct`, budget of ID)."""
    if model.endswith("-instruct"):
        method, budget = parse_model_id(model[:-len("-instruct")])
        return f"{method}-instruct", budget
    if model == "base":
        return "base", None
    if model.startswith("api-"):
        return "api", None
    method, _, budget = model.rpartition("-")
    if not method:
        raise InputError(f"model id {model!r}: expected base, raw-all, api-NAME or METHOD-BUDGET")
    if budget == "all":
        return method, None
    try:
        return method, int(budget)
    except ValueError:
        raise InputError(f"model id {model!r}: budget {budget!r} is not a token count") from None


def train_summary(models_dir: str | Path | None, method: str, model: str) -> dict:
    """results/models/{method}/{budget}/train_summary.json of a CPT model, or {} when absent."""
    if models_dir is None or method in ("base", "api"):
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


def summary_rows(summary: dict, models_dir: str | Path | None = None) -> list[dict]:
    """Table rows of one summary, one per scoring mode."""
    model = summary["model"]
    method, budget = parse_model_id(model)
    ts = train_summary(models_dir, method, model)
    if method == "raw" and budget is None:
        budget = ts.get("budget_tokens")  # Raw CPT trains on the whole raw corpus: its token count
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
        }
        if "retrieval" in summary:
            ret = summary["retrieval"]
            row.update({"retriever": ret.get("retriever"), "top_k": ret.get("top_k"),
                        "recall_at_k": ret.get("recall_at_k", {}).get(ret.get("retriever"))})
            for name in ("bm25", "embedding", "hybrid"):
                row[f"recall_at_k_{name}"] = ret.get("recall_at_k", {}).get(name)
        rows.append(row)
    return rows


def sort_key(row: dict) -> tuple:
    order = {"base": 0, "raw": 1, "api": 3}
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
              columns: list[str] = QA_COLUMNS) -> int:
    rows: list[dict] = []
    seen: set[str] = set()
    for path in summaries:
        s = load_summary(path)
        if s["model"] in seen:
            raise InputError(f"{path}: model {s['model']!r} appears twice among the summaries")
        seen.add(s["model"])
        rows.extend(summary_rows(s, models_dir))
    if not rows:
        raise InputError("no evaluation summaries given")
    return write_table(rows, columns, output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["qa", "rag"], help="qa: closed-book table; rag: open-book table")
    p.add_argument("--summaries", nargs="+", required=True, help="results/eval/{qa,rag}/MODEL.json files")
    p.add_argument("--models-dir", default="results/models", help="where CPT models keep train_summary.json")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        n = aggregate(args.summaries, args.output, args.models_dir, QA_COLUMNS if args.table == "qa" else RAG_COLUMNS)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "rows": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
