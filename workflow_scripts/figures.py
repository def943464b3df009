"""The figures of the experiment and the synthesis summary table of the Snakemake report.

- `scaling`: QA accuracy (%) against synthetic tokens (log axis), one series per synthesis method with its
  confidence-interval bars and fitted mixture-of-exponentials curve (results/figures/scaling_fit.json), the base
  model and Raw CPT as horizontal levels (with their interval as a band), chance (25%). The paper's reported
  values (workflow_scripts/paper_reference.py) are an optional reference layer: their own panel by default
  (figures.paper_reference: panel), or grey dashed on the same axes (overlay), always labelled
  "paper (Yang et al. 2025)"; they never enter the fit and are never drawn as measured points. It draws the
  headline rows of the long table (results/tables/qa_accuracy.csv, workflow_scripts/aggregate.py); a model without
  a value there (no attempted answers) is marked with an x on the axis floor and named in the legend.
- `diversity`: per-method statistics of the synthetic corpora against tokens (results/synth/{method}/report.json):
  distinct-n, compression ratio, n-gram overlap with the source articles, entity coverage. Per-prefix values are
  drawn as lines when the report has them, the corpus totals as points otherwise.
- `synthesis-table`: results/synth/{method}/ledger.json + report.json of every method as one CSV and HTML table.

Restyling (figures section of the config): style, dpi, figsize, formats, paper_reference, show_fit, ...; see
docs/figures.md. Every command writes its outputs atomically; the format follows each output's extension.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter, NullFormatter  # noqa: E402

from . import paper_reference as paper  # noqa: E402
from . import stage  # noqa: E402
from .config import add_config_args, with_defaults  # noqa: E402
from .aggregate import CONVENTIONS as CONVENTION_WORDS  # noqa: E402
from .fit_scaling import LEVEL_METHODS, ScalingFit, read_accuracy_table, synthesis_points  # noqa: E402
from .io_utils import InputError, atomic_path, read_json_object, write_text_atomic  # noqa: E402

METHOD_LABELS = {"entigraph": "EntiGraph CPT", "rephrase": "Rephrase CPT", "qa": "QA SFT", "raw": "Raw CPT",
                 "base": "Base model"}
METHOD_COLORS = {"entigraph": "#1f77b4", "rephrase": "#ff7f0e", "qa": "#2ca02c", "base": "#222222",
                 "raw": "#8c564b"}
OTHER_COLORS = ["#9467bd", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#d62728"]
PAPER_COLOR = "#8a8a8a"
CHANCE_PERCENT = 25.0  # four options per QuALITY question
DIVERSITY_METRICS = [
    ("distinct", "Distinct n-grams (fraction unique)", "higher = more varied text"),
    ("compression_ratio", "Compression ratio", "raw / zlib bytes; higher = more repetitive"),
    ("source_ngram_overlap", "N-gram overlap with source articles", "share of a text's n-grams found in its article"),
    ("entity_coverage", "Entity coverage", "share of an article's extracted entities named"),
]
SUMMARY_SKIP = {"by_article", "failed_requests", "failed_articles", "prefixes"}
TOKEN_KEYS = ("tokens", "budget_tokens", "budget", "n_tokens", "prefix_tokens")


def method_label(method: str) -> str:
    if method.endswith("-lora"):  # a LoRA twin's series (cpt.compare_adapter)
        return f"{method_label(method[:-len('-lora')])} (LoRA)"
    return METHOD_LABELS.get(method, method)


def method_color(method: str, order: Sequence[str] = ()) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    others = [m for m in order if m not in METHOD_COLORS] or [method]
    idx = others.index(method) if method in others else abs(hash(method))
    return OTHER_COLORS[idx % len(OTHER_COLORS)]


def figure_title(cfg: dict, what: str) -> str:
    """'<what>: <base model> on <corpus> (<run_name>)', from config run_name, models.base.name, data.source."""
    model, data = cfg["models"]["base"]["name"], cfg["data"]
    source = data["source"]
    corpus = "QuALITY" if source == "quality" else Path(str(data["custom"]["path"] or source)).name
    return f"{what}: {model} on {corpus} ({cfg['run_name']})"


def _style(fcfg: dict):
    style = fcfg["style"]
    if style not in ("default", *plt.style.available) and not Path(style).exists():
        raise InputError(f"figures.style {style!r} is not a matplotlib style; use one of: default, "
                         f"{', '.join(sorted(plt.style.available))} (or a .mplstyle path)")
    return plt.style.context(style)


def figure_formats(outputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, format) of every output; InputError on an unsupported one (checked before anything is drawn)."""
    out = []
    for path in map(Path, outputs):
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in ("png", "pdf", "svg"):
            raise InputError(f"{path}: unsupported figure format {fmt!r} (use .png, .pdf or .svg)")
        out.append((path, fmt))
    return out


def save_figure(fig: plt.Figure, outputs: Sequence[str | Path], dpi: int) -> None:
    for out, fmt in figure_formats(outputs):
        with atomic_path(out, suffix=out.suffix) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight",
                        metadata={"Software": None} if fmt == "png" else None)
    plt.close(fig)


def _token_axis(ax: plt.Axes, label: str = "Synthetic tokens (log scale)", ticks: Sequence[float] = ()) -> None:
    """Log x axis with engineering labels (4k, 16k, 455M); ticks at the measured budgets when the data span
    less than about two decades (where decade ticks alone would leave the axis almost unlabelled)."""
    ax.set_xscale("log")
    ticks = sorted({float(t) for t in ticks if t and t > 0})
    if ticks and ticks[-1] / ticks[0] < 150:
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _legend_below(ax: plt.Axes, legend: Legend, title: str | None = None) -> float:
    """Place the legend under the axis label (call after tight_layout); return its bottom in figure coordinates."""
    fig = ax.figure
    fig.canvas.draw()
    label_bottom = ax.xaxis.label.get_window_extent().y0
    y = ax.transAxes.inverted().transform((0, label_bottom))[1]
    if not legend:
        return fig.transFigure.inverted().transform((0, label_bottom))[1]
    handles, labels = zip(*legend)
    leg = ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y - 0.01), ncol=1, fontsize=8,
                    frameon=False, title=title, title_fontsize=8)
    fig.canvas.draw()
    return fig.transFigure.inverted().transform((0, leg.get_window_extent().y0))[1]


# ---------------------------------------------------------------------------------------------- scaling curve

def _series_label(method: str, mode: str, multi_mode: bool) -> str:
    return f"{method_label(method)}{f' [{mode}]' if multi_mode and mode else ''}"


def _fit_label(fit: dict) -> str:
    if not fit.get("terms"):
        return f"  constant {fit['asymptote']:.1f}% ({fit['n_points']} pts: too few for a curve)"
    text = f"  fit, {len(fit['terms'])} term(s): asymptote {fit['asymptote']:.1f}%"
    iv = fit.get("asymptote_interval")
    if iv:
        text += f" (95% profile CI {iv[0]:.0f}-{iv[1]:.0f})"
    return text


Legend = list  # [(handle, label)] in the order the legend should show them


def x_label(fcfg: dict) -> str:
    """The measured panel's x label under figures.x_axis (tokens, or the authors' fraction x fraction_scale)."""
    if fcfg["x_axis"] == "tokens":
        return "Synthetic training tokens (CPT budget, log scale)"
    return f"Fraction of the corpus x {fcfg['fraction_scale'] / 1e6:g}M tokens (the paper's axis, log scale)"


def external_level_style(row: Any) -> tuple[str, Any, str]:
    """(color, line style, legend name) of an evaluation-only model (evaluation.external_models): its label,
    marked as external, so a released checkpoint is never read as a model this run trained."""
    label = row.get("label") if isinstance(row.get("label"), str) and row.get("label") else row["model"]
    return "#8c564b", (0, (5, 1, 1, 1)), f"{label} (external checkpoint, evaluation only)"


def _draw_levels(ax: plt.Axes, levels: pd.DataFrame, multi_mode: bool, legend: Legend) -> None:
    """Base model, Raw CPT and API models as horizontal lines (they have no synthetic-token count)."""
    api_models = sorted(set(levels.loc[levels["method"] == "api", "model"]))
    for _, row in levels.iterrows():
        if row["method"] == "api":
            color = OTHER_COLORS[api_models.index(row["model"]) % len(OTHER_COLORS)]
            model = row["model"][len("api-"):] if row["model"].startswith("api-") else row["model"]
            style, name = (0, (1, 1)), f"{model} (API, closed-book)"
        elif row["method"] == "external":
            color, style, name = external_level_style(row)
        else:
            color = method_color(row["method"])
            style, name = ("-" if row["method"] == "base" else "-."), method_label(row["method"])
        if multi_mode and row["mode"]:
            name += f" [{row['mode']}]"
        n = f", n={int(row['n'])}" if pd.notna(row.get("n")) else ""
        label = f"{name}: {row['accuracy_pct']:.1f}%{n}"
        if pd.notna(row["ci_low_pct"]) and pd.notna(row["ci_high_pct"]):
            label += f" (band: 95% CI {row['ci_low_pct']:.0f}-{row['ci_high_pct']:.0f}%)"
            ax.axhspan(row["ci_low_pct"], row["ci_high_pct"], color=color, alpha=0.05, linewidth=0, zorder=1)
        legend.append((ax.axhline(row["accuracy_pct"], color=color, linestyle=style, linewidth=1.4, zorder=2), label))


def _draw_paper(ax: plt.Axes, with_prefix: bool, legend: Legend) -> None:
    """The paper's fitted curve and headline values, grey and dashed, labelled as the paper's."""
    pre = f"{paper.SHORT_LABEL}: " if with_prefix else ""
    xm = np.geomspace(paper.BUDGETS_MILLIONS[0], paper.BUDGETS_MILLIONS[-1], 200)
    (line,) = ax.plot(xm * 1e6, [paper.fit_curve(v) for v in xm], color=PAPER_COLOR, linestyle="--", linewidth=1.6)
    legend.append((line, f"{pre}EntiGraph fitted curve (sec. 6.3, asymptote {paper.FIT_ASYMPTOTE:.1f}%)"))
    for rep in paper.HEADLINE:
        if rep.tokens_millions is None:
            if rep.method in ("base", "raw"):
                line = ax.axhline(rep.accuracy_percent, color=PAPER_COLOR, linewidth=1.2,
                                  linestyle=":" if rep.method == "raw" else "-.")
                legend.append((line, f"{pre}{rep.label}: {rep.accuracy_percent:.2f}%"))
            continue
        if rep.method not in ("entigraph", "rephrase"):
            continue
        marker = "o" if rep.method == "entigraph" else "s"
        tag = " (unverified)" if not rep.verified else ""
        (line,) = ax.plot([rep.tokens_millions * 1e6], [rep.accuracy_percent], linestyle="none", marker=marker,
                          markerfacecolor="white", markeredgecolor=PAPER_COLOR, markeredgewidth=1.6, markersize=8)
        legend.append((line, f"{pre}{rep.label}: {rep.accuracy_percent:.2f}%{tag}"))


def _draw_paper_panel(ax: plt.Axes) -> Legend:
    """The reference-only panel: the paper's curve and reported values, greyed and labelled as the paper's."""
    legend: Legend = []
    _draw_paper(ax, with_prefix=False, legend=legend)
    _token_axis(ax)
    ax.set_ylabel("QuALITY closed-book QA accuracy (%)")
    ax.set_title(f"Reference only: {paper.SHORT_LABEL}, {paper.MODEL}", fontsize=11, color="#555555")
    ax.text(0.01, 0.99, "Curve: the paper's fitted formula, not data points.\n"
            "Reported values, not measured by this workflow.\n"
            f"Taken to be: {paper.CONVENTION_SHORT}.", transform=ax.transAxes, ha="left", va="top", fontsize=7.5,
            color="#666666")
    for spine in ax.spines.values():
        spine.set_edgecolor("#aaaaaa")
    return legend


def plotted_number(df: Any) -> str:
    """Which accuracy the figure draws, in words: the headline rows' split and convention (evaluation.report;
    the headline table's `plotted` column says it directly), or ''."""
    if "plotted" in df.columns:
        words = df["plotted"]
    elif {"split_label", "convention"} <= set(df.columns):
        conv = df["convention"].map(lambda c: CONVENTION_WORDS.get(c, ""))
        words = df["split_label"].fillna("").astype(str).where(conv == "", df["split_label"] + ", " + conv)
    else:
        return ""
    vals = sorted({str(v) for v in words.dropna() if str(v).strip()})
    return "; ".join(vals)


def _draw_missing(ax: plt.Axes, missing: pd.DataFrame, methods: Sequence[str], multi_mode: bool,
                  legend: Legend) -> list[dict]:
    """Models without a value (no attempted answers): an x on the floor of the axis at their budget, or for a
    level (base, Raw CPT, ...) a legend entry only, so that they are seen and never read as a measured 0%.
    Returns them as {model, mode, note}."""
    for _, row in missing.iterrows():
        name = (external_level_style(row)[2] if row["method"] == "external"
                else f"{method_label(row['method'])} ({row['model']})")
        if multi_mode and row["mode"]:
            name += f" [{row['mode']}]"
        n = f", n={int(row['n'])}" if pd.notna(row.get("n")) else ""
        label = f"{name}: {row['missing_note']}{n}; no value, not fitted"
        if pd.notna(row["tokens"]) and row["tokens"] > 0 and row["method"] not in LEVEL_METHODS:
            (mark,) = ax.plot([row["tokens"]], [0.02], transform=ax.get_xaxis_transform(), linestyle="none",
                              marker="x", markersize=8, markeredgewidth=2, color=method_color(row["method"], methods),
                              zorder=5, clip_on=False)
        else:
            (mark,) = ax.plot([], [], linestyle="none", marker="x", color="#888888")
        legend.append((mark, label))
    return [{"model": r["model"], "mode": r["mode"], "note": r["missing_note"]} for _, r in missing.iterrows()]


def plot_scaling(table: str | Path, fit_json: str | Path | None, cfg: dict, outputs: Sequence[str | Path]) -> dict:
    """Draw the scaling curve (see module docstring) into every path of `outputs`; return what was drawn."""
    figure_formats(outputs)
    cfg = with_defaults(cfg)
    fcfg = cfg["figures"]
    df = read_accuracy_table(table, fcfg["accuracy_scale"], fcfg["x_axis"], fcfg["fraction_scale"])
    if fcfg["modes"]:
        df = df[df["mode"].isin(fcfg["modes"])]
    fits: list[dict] = []
    if fit_json and fcfg["show_fit"]:
        with open(fit_json, encoding="utf-8") as f:
            fits = json.load(f).get("fits", [])
    modes = sorted(set(df["mode"]))
    multi_mode = len(modes) > 1
    pts = synthesis_points(df)
    levels = df[df["method"].isin(LEVEL_METHODS) & ~df["missing"]].drop_duplicates(["model", "mode"])
    layout = fcfg["paper_reference"]
    all_pts = synthesis_points(df, with_missing=True)
    methods = sorted(set(all_pts["method"]), key=lambda m: (m not in METHOD_COLORS, m))

    with _style(fcfg):
        figsize = fcfg["figsize"]
        if layout == "panel":
            fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=figsize, gridspec_kw={"width_ratios": [1.35, 1]})
        else:
            fig, ax = plt.subplots(figsize=(figsize[0] * 0.62, figsize[1]) if layout == "none" else figsize)
            ax_paper = None

        drawn = {"series": [], "levels": [], "fits": [], "paper": layout != "none", "missing": []}
        legend: Legend = []
        for (method, mode), group in pts.groupby(["method", "mode"], sort=False):
            group = group.sort_values("tokens")
            color = method_color(method, methods)
            x, y = group["tokens"].to_numpy(float), group["accuracy_pct"].to_numpy(float)
            lo, hi = group["ci_low_pct"].to_numpy(float), group["ci_high_pct"].to_numpy(float)
            yerr = None
            if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
                yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            n = group["n"].dropna()
            n_text = f", n={int(n.iloc[0])} questions" if len(n) and n.nunique() == 1 else ""
            bars = ax.errorbar(x, y, yerr=yerr, color=color, marker="o", markersize=6, capsize=4, linewidth=0.8,
                               alpha=0.85, zorder=4)
            legend.append((bars, f"{_series_label(method, mode, multi_mode)} (measured, 95% CI{n_text})"))
            capped = group["capped"].to_numpy(bool)
            if capped.any():
                (hollow,) = ax.plot(x[capped], y[capped], linestyle="none", marker="o", markersize=6,
                                    markerfacecolor="white", markeredgecolor=color, zorder=5)
                legend.append((hollow, "  hollow: budget capped (corpus smaller than the budget), not fitted"))
            drawn["series"].append({"method": method, "mode": mode, "points": len(group),
                                    "capped": int(capped.sum())})
            fit = next((f for f in fits if f.get("method") == method and f.get("mode", "") == mode), None)
            if fit is not None:
                model = ScalingFit.from_dict(fit)
                # Only over the measured range: beyond it the curve is an extrapolation the legend's asymptote
                # (with its interval) already states.
                lo_x, hi_x = (v * 1e6 for v in fit.get("x_range", (x.min() / 1e6, x.max() / 1e6)))
                xs = np.geomspace(max(lo_x, x.min()), max(hi_x, x.min()), 200)
                (line,) = ax.plot(xs, model.predict(xs / 1e6), color=color, linestyle="--", linewidth=1.4,
                                  alpha=0.9, zorder=3)
                legend.append((line, _fit_label(fit)))
                drawn["fits"].append(method)
        _draw_levels(ax, levels, multi_mode, legend)
        drawn["levels"] = list(levels["model"])
        drawn["missing"] = _draw_missing(ax, df[df["missing"]], methods, multi_mode, legend)
        if fcfg["show_chance"]:
            legend.append((ax.axhline(CHANCE_PERCENT, color="#bbbbbb", linestyle=":", linewidth=1.0),
                           "chance (25%, 4 options)"))
        if pts.empty:
            ax.text(0.5, 0.5, f"no synthesis-method points {'with a value' if len(all_pts) else 'yet'}",
                    transform=ax.transAxes, ha="center", va="center", color="#888888")
        if layout == "overlay":
            _draw_paper(ax, with_prefix=True, legend=legend)
        _token_axis(ax, x_label(fcfg),
                    ticks=[] if layout == "overlay" else all_pts["tokens"].tolist())
        plotted = plotted_number(df)
        ax.set_ylabel("Closed-book QA accuracy (%)" + (f"\n{plotted}" if plotted else ""))
        drawn["plotted"] = plotted
        mode_text = f", {'/'.join(m for m in modes if m)} scoring" if any(modes) else ""
        ax.set_title(f"This run (measured{mode_text})" if layout == "panel" else "", fontsize=11)

        paper_legend = _draw_paper_panel(ax_paper) if ax_paper is not None else []
        fig.suptitle(figure_title(cfg, "QA accuracy vs synthetic tokens"), fontsize=12)
        fig.tight_layout()
        bottom = _legend_below(ax, legend)
        if ax_paper is not None:
            bottom = min(bottom, _legend_below(ax_paper, paper_legend, title="the paper's reported values"))
        if layout != "none":
            fig.text(0.5, bottom - 0.01, f"Paper values: {paper.CITATION}.", ha="center", va="top", fontsize=7,
                     color="#666666")
        save_figure(fig, outputs, int(fcfg["dpi"]))
    return drawn


# ------------------------------------------------------------------------------------------------- diversity

def read_synth_report(path: str | Path) -> dict:
    path = Path(path)
    rep = read_json_object(path, "the synthesis stage")
    rep.setdefault("method", path.parent.name)
    return rep


def _tokens_of(d: dict) -> float | None:
    for key in TOKEN_KEYS:
        v = d.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return None


def _prefix_rows(rep: dict) -> list[dict]:
    """Per-prefix (per-budget) statistics of a report, whatever their container: a list of objects with a token
    count, or an object keyed by token count. Empty when the report has totals only."""
    for key in ("prefixes", "by_prefix", "per_prefix", "by_budget", "per_budget", "budgets", "curve"):
        val = rep.get(key)
        rows = []
        if isinstance(val, list):
            rows = [dict(r) for r in val if isinstance(r, dict) and _tokens_of(r)]
        elif isinstance(val, dict):
            for k, r in val.items():
                if isinstance(r, dict):
                    r = dict(r)
                    if _tokens_of(r) is None:
                        try:
                            r["tokens"] = float(k)
                        except ValueError:
                            continue
                    rows.append(r)
        if rows:
            return sorted(rows, key=lambda r: _tokens_of(r) or 0.0)
    return []


def _metric(d: dict, key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, dict):  # e.g. {"value": ..} or {"mean": ..}
        v = v.get("value", v.get("mean"))
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def diversity_series(reports: Sequence[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{method: {metric: [(tokens, value), ...]}} from per-prefix rows, or the totals when there are none."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    keys = ["distinct_1", "distinct_2", "distinct_3", "compression_ratio", "source_ngram_overlap", "entity_coverage"]
    for rep in reports:
        rows = _prefix_rows(rep) or [rep]
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            t = _tokens_of(row)
            if t is None:
                continue
            for key in keys:
                v = _metric(row, key)
                if v is not None:
                    series.setdefault(key, []).append((t, v))
        out[str(rep["method"])] = series
    return out


def plot_diversity(report_paths: Sequence[str | Path], cfg: dict, outputs: Sequence[str | Path]) -> dict:
    """Four panels of synthetic-data statistics against tokens, one colour per method (see module docstring)."""
    figure_formats(outputs)
    cfg = with_defaults(cfg)
    fcfg = cfg["figures"]
    reports = [read_synth_report(p) for p in report_paths]
    data = diversity_series(reports)
    methods = sorted(data, key=lambda m: (m not in METHOD_COLORS, m))
    drawn: dict[str, list[str]] = {}
    with _style(fcfg):
        fig, axes = plt.subplots(2, 2, figsize=fcfg["diversity_figsize"])
        for ax, (metric, ylabel, hint) in zip(axes.ravel(), DIVERSITY_METRICS):
            keys = [("distinct_1", "-", "o"), ("distinct_2", "--", "s"), ("distinct_3", ":", "^")] \
                if metric == "distinct" else [(metric, "-", "o")]
            drawn[metric] = []
            ticks: list[float] = []
            for method in methods:
                color = method_color(method, methods)
                for key, ls, marker in keys:
                    pts = data[method].get(key)
                    if not pts:
                        continue
                    x, y = zip(*pts)
                    ax.plot(x, y, color=color, linestyle=ls, marker=marker, markersize=5)
                    ticks.extend(x)
                    drawn[metric].append(f"{method}:{key}")
            _token_axis(ax, "Synthetic tokens (generator completion tokens, log scale)", ticks=ticks)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel}\n({hint})", fontsize=9.5)
            if drawn[metric]:
                # Colour = method; in the distinct-n panel, line style and marker = n.
                shown = [m for m in methods if any(d.startswith(f"{m}:") for d in drawn[metric])]
                handles = [Line2D([], [], color=method_color(m, methods), marker="o") for m in shown]
                labels = [method_label(m) for m in shown]
                if metric == "distinct":
                    handles += [Line2D([], [], color="#444444", linestyle=ls, marker=mk) for _, ls, mk in keys]
                    labels += [f"distinct-{k[-1]}" for k, _, _ in keys]
                ax.legend(handles, labels, fontsize=7.5, loc="best", framealpha=0.9)
            else:
                ax.text(0.5, 0.5, "not reported" if reports else "no synthesis methods configured",
                        transform=ax.transAxes, ha="center", va="center", color="#888888")
        single = all(len(v) <= 1 for s in data.values() for v in s.values())
        what = "Synthetic-data diversity (corpus totals)" if single else "Synthetic-data diversity vs tokens"
        fig.suptitle(figure_title(cfg, what), fontsize=12)
        fig.tight_layout()
        save_figure(fig, outputs, int(fcfg["dpi"]))
    return drawn


# -------------------------------------------------------------------------------- synthesis summary for the report

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested JSON object as dotted keys. Lists, long strings and per-article breakdowns are left
    out: the table is one screen per method, the JSON files keep the detail."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k in SUMMARY_SKIP:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            if not (isinstance(v, str) and len(v) > 80):
                out[key] = v
    return out


def synthesis_table(ledgers: Sequence[str | Path], reports: Sequence[str | Path], csv_out: str | Path,
                    html_out: str | Path) -> pd.DataFrame:
    """One row per synthesis method: its ledger (requests, tokens, cost, time) and report (diversity) scalars."""
    rows: dict[str, dict[str, Any]] = {}
    for kind, paths in (("ledger", ledgers), ("report", reports)):
        for path in paths:
            path = Path(path)
            obj = read_json_object(path, "the synthesis stage")
            method = str(obj.get("method") or path.parent.name)
            flat = {k: v for k, v in _flatten(obj).items() if k != "method"}
            rows.setdefault(method, {"method": method}).update({f"{kind}.{k}": v for k, v in flat.items()})
    df = pd.DataFrame(list(rows.values()))
    if df.empty:
        df = pd.DataFrame(columns=["method"])
    with atomic_path(csv_out, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    # Transposed for reading: metrics down, methods across.
    body = df.set_index("method").T if len(df) else df
    table_html = body.to_html(na_rep="", float_format=lambda v: f"{v:,.4g}", border=0, classes="synth")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Synthesis ledgers and reports</title>"
            "<style>body{font-family:sans-serif;font-size:13px} table.synth{border-collapse:collapse}"
            "table.synth td,table.synth th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}"
            "table.synth th{text-align:left}</style></head><body>"
            f"<h3>Synthesis: token and cost ledgers, corpus statistics ({html.escape(', '.join(rows)) or 'none'})"
            f"</h3>{table_html}</body></html>\n")
    write_text_atomic(html_out, page)
    return df


# ----------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = stage.parser("figures", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scaling", help="QA accuracy vs synthetic tokens with the fit (+ paper reference)")
    s.add_argument("--table", required=True, help="results/tables/qa_accuracy.csv (the long table; its headline rows)")
    s.add_argument("--fit", default=None, help="results/figures/scaling_fit.json (omit: no fitted curves)")
    s.add_argument("--output", nargs="+", required=True, help="figure files (.png/.pdf/.svg)")
    add_config_args(s)
    d = sub.add_parser("diversity", help="synthetic-data diversity vs tokens, per method")
    d.add_argument("--reports", nargs="*", default=[], help="results/synth/{method}/report.json files")
    d.add_argument("--output", nargs="+", required=True)
    add_config_args(d)
    t = sub.add_parser("synthesis-table", help="ledgers + reports of every method as CSV and HTML")
    t.add_argument("--ledgers", nargs="*", default=[])
    t.add_argument("--reports", nargs="*", default=[])
    t.add_argument("--csv", required=True)
    t.add_argument("--html", required=True)
    args = p.parse_args(argv)
    return stage.run(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "synthesis-table":
        df = synthesis_table(args.ledgers, args.reports, args.csv, args.html)
        print(f"synthesis table: {len(df)} method(s) -> {args.csv}, {args.html}", file=sys.stderr)
        return
    cfg = stage.config(args)
    if args.cmd == "scaling":
        drawn = plot_scaling(args.table, args.fit, cfg, args.output)
    else:
        drawn = plot_diversity(args.reports, cfg, args.output)
    print(json.dumps({"outputs": args.output, "drawn": drawn}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
