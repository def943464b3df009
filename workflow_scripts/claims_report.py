"""The claims table and the false-against-salient figure of the instruct models' summaries (rules/instruct.smk).

    python -m workflow_scripts.claims_report --claims results/instruct/claims/*.json [--human H.jsonl] \\
        --table results/tables/summary_claims.csv --figure results/figures/summary_claims.png

Reads the judge's outputs (workflow_scripts/claims.py: the .json summary per model, the .jsonl beside it) and, when
given, the judged human summaries; one table row per instruct model and prompt; the figure as the paper's Figure 4.
Kept apart from claims.py so that the judge's environment needs no plotting library.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Sequence

from . import stage
from .claims import TABLE_COLUMNS, per_article_counts, relative_to_human
from .io_utils import atomic_path, iter_jsonl, read_json_object


def table_rows(summaries: Sequence[dict], claims_files: dict[str, list[dict]],
               human: list[dict] | None) -> list[dict]:
    """One row per model and prompt; relative-to-human columns when human judgements are given."""
    from .instruct import parse_instruct_id

    rows = []
    for s in summaries:
        model = str(s["model"])
        base, method, budget = parse_instruct_id(model)
        for prompt, b in s["by_prompt"].items():
            row = {"model": model, "base_model": base, "method": method, "budget": budget, "prompt": prompt,
                   **{k: b.get(k) for k in TABLE_COLUMNS if k in b}, "judge": s["judge"],
                   "prompt_version": s["prompt_version"], "normalisation": "raw"}
            if human is not None:
                rel = relative_to_human(per_article_counts(claims_files[model], prompt),
                                        per_article_counts(human, "human"))
                row.update(normalisation="human", human_articles=rel["articles"],
                           false_rel_human=rel["false_rel_human"], salient_rel_human=rel["salient_rel_human"])
            rows.append(row)
    return sorted(rows, key=lambda r: (r["prompt"], r["method"], -1 if r["budget"] is None else r["budget"],
                                       r["model"]))


def write_table(rows: Sequence[dict], path: str | Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, TABLE_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]))
                            for k in TABLE_COLUMNS})


def plot(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """False against salient claims, one point per model, one panel per prompt (the paper's Figure 4 layout):
    relative to the human summaries when the rows have them, else raw counts per summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted({r["prompt"] for r in rows}) or ["short"]
    rel = any(r.get("normalisation") == "human" for r in rows)
    xk, yk = ("salient_rel_human", "false_rel_human") if rel else ("salient_mean", "false_mean")
    fig, axes = plt.subplots(1, len(prompts), figsize=(5 * len(prompts), 4), squeeze=False)
    colours: dict[str, Any] = {}
    for ax, prompt in zip(axes[0], prompts):
        shown = 0
        for r in (r for r in rows if r["prompt"] == prompt):
            if r.get(xk) is None or r.get(yk) is None:
                continue
            shown += 1
            c = colours.setdefault(r["method"], f"C{len(colours)}")
            ax.scatter(r[xk], r[yk], color=c, label=r["method"])
            unread = int(r.get("truth_unparsed") or 0) + int(r.get("salience_unparsed") or 0)
            label = r["base_model"] + (f" [{unread} verdicts unread]" if unread else "")
            ax.annotate(label, (r[xk], r[yk]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        pts = [(r[xk], r[yk]) for r in rows
               if r["prompt"] == prompt and r.get(xk) is not None and r.get(yk) is not None]
        xmax, ymax = (max([p[0] for p in pts] + [1.0]) * 1.2, max([p[1] for p in pts] + [1.0]) * 1.2)
        ax.set_xlim(-0.05 * xmax, xmax)  # counts are never negative: no axis below zero
        ax.set_ylim(-0.05 * ymax, ymax)
        unparsed = sum(int(r.get("summaries_unparseable") or 0) for r in rows if r["prompt"] == prompt)
        if not shown:  # say so in the panel rather than draw an empty plot
            failed = sum(int(r.get("summaries_failed") or 0) for r in rows if r["prompt"] == prompt)
            ax.text(0.5, 0.5, f"no model has a scored summary\n({unparsed} unparseable claim lists, {failed} failed)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(f"{prompt} prompt ({unparsed} unparseable claim lists)", fontsize=9)
        ax.set_xlabel("salient claims" + (" (relative to human)" if rel else " per summary"))
        ax.set_ylabel("false claims" + (" (relative to human)" if rel else " per summary"))
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def build_table(claims_json: Sequence[str | Path], human: str | Path | None, table: str | Path,
                figure: str | Path, title: str = "") -> list[dict]:
    summaries, files = [], {}
    for p in claims_json:
        s = read_json_object(p, "the judge rule")
        summaries.append(s)
        files[str(s["model"])] = [r for _, r in iter_jsonl(Path(p).with_suffix(".jsonl"))]
    human_records = [r for _, r in iter_jsonl(human)] if human else None
    rows = table_rows(summaries, files, human_records)
    write_table(rows, table)
    plot(rows, figure, title)
    return rows



def main(argv: list[str] | None = None) -> int:
    p = stage.parser("claims_report", __doc__)
    p.add_argument("--claims", nargs="+", required=True, help="the judge rule's .json summaries (the .jsonl beside)")
    p.add_argument("--human", default=None, help="the judged human summaries (.jsonl), for normalisation")
    p.add_argument("--table", required=True)
    p.add_argument("--figure", required=True)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)

    def body() -> None:
        rows = build_table(args.claims, args.human, args.table, args.figure, args.title)
        print(f"{len(rows)} rows -> {args.table}, {args.figure}", file=sys.stderr)

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
