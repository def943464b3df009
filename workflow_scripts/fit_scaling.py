"""The scaling-curve fit: QA accuracy against synthetic tokens as a mixture of exponentials (paper section 6.3).

    y(x) = p - sum_k c_k * r_k^x        x: synthetic tokens in millions, y: accuracy in %

with asymptote p, weights c_k >= 0 and rates 0 < r_k < 1 (each term a decay constant d_k = -ln r_k > 0), fitted
by bounded least squares (scipy.optimize.least_squares) from several starting points; the best fit wins.

Identifiability: the model has 1 + 2K parameters, so K terms need at least 2K + 1 distinct token counts. With
n distinct counts the fit uses K = min(max_terms, floor((n - 1) / 2)) terms and says so in its `note`: 7+
points give the paper's three terms, 5-6 points two, 3-4 points one, and 1-2 points no term at all (a constant:
the mean accuracy, reported as the "asymptote" with that caveat). With exactly 2K + 1 points the curve
interpolates (rmse 0, no degrees of freedom left): the rmse then says nothing about fit quality.

Decay constants are bounded to where the data can see them (on x scaled to [0, 1] by the largest count): no
slower than 0.05 (e-folding 20x beyond the data; slower terms are indistinguishable from a straight line and
would let the asymptote run off) and no faster than 50 per smallest positive count (faster terms are fully
decayed at every measured point). The asymptote is bounded to [0, 100] (accuracy in %).

Command lines:
    python -m workflow_scripts.fit_scaling POINTS.csv --output FIT.json   # columns tokens_millions, accuracy_percent
    python -m workflow_scripts.fit_scaling --table results/tables/qa_accuracy.csv --output scaling_fit.json \
        [--config-json '{"figures": {...}}']                              # the workflow's rule: one fit per method

The workflow side fits the headline accuracy of the long table (workflow_scripts/aggregate.py). A model without
a value there (no attempted answers) is skipped, and the fit's JSON names it (`skipped`, and one line in `note`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, lsq_linear

from . import stage
from .config import config_hash, with_defaults
from .io_utils import InputError

X_UNIT = "millions of synthetic tokens"
Y_UNIT = "accuracy (%)"
DECAY_MIN = 0.05  # per unit of x scaled to [0, 1]
DECAY_MAX_AT_XMIN = 50.0  # decay x smallest positive x (scaled)
LEVEL_METHODS = ("base", "raw", "api", "external")  # drawn as horizontal levels, never fitted
X_AXES = ("tokens", "fraction")  # figures.x_axis: this workflow's tokens, or the authors' fraction x fraction_scale


@dataclass
class ScalingFit:
    """A fitted curve y(x) = asymptote - sum_k weight_k * exp(-decay_k * x)."""

    asymptote: float
    weights: list[float]
    decays: list[float]  # per unit of x (per million tokens in the workflow)
    rmse: float
    n_points: int
    n_distinct_x: int
    requested_terms: int
    note: str = ""
    x_range: tuple[float, float] = (0.0, 0.0)
    extra: dict = field(default_factory=dict)

    @property
    def n_terms(self) -> int:
        return len(self.weights)

    @property
    def rates(self) -> list[float]:
        return [math.exp(-d) for d in self.decays]

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        y = np.full_like(x, self.asymptote, dtype=float)
        for c, d in zip(self.weights, self.decays):
            y = y - c * np.exp(-d * x)
        return y

    def to_dict(self) -> dict:
        """The JSON shape of a fit: asymptote, terms [{weight, rate, decay_per_million}], rmse, n_points, ..."""
        return {
            "asymptote": self.asymptote,
            "terms": [{"weight": c, "rate": math.exp(-d), "decay_per_million": d}
                      for c, d in zip(self.weights, self.decays)],
            "rmse": self.rmse,
            "n_points": self.n_points,
            "n_distinct_x": self.n_distinct_x,
            "n_terms": self.n_terms,
            "requested_terms": self.requested_terms,
            "dof": self.n_points - (1 + 2 * self.n_terms),
            "x_range": list(self.x_range),
            "note": self.note,
            "formula": "y = asymptote - sum_k weight_k * rate_k ** x",
            "x_unit": X_UNIT,
            "y_unit": Y_UNIT,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ScalingFit":
        terms = d.get("terms") or []
        decays = [float(t["decay_per_million"]) if "decay_per_million" in t else -math.log(float(t["rate"]))
                  for t in terms]
        return cls(asymptote=float(d["asymptote"]), weights=[float(t["weight"]) for t in terms], decays=decays,
                   rmse=float(d.get("rmse", float("nan"))), n_points=int(d.get("n_points", 0)),
                   n_distinct_x=int(d.get("n_distinct_x", d.get("n_points", 0))),
                   requested_terms=int(d.get("requested_terms", len(terms))), note=d.get("note", ""),
                   x_range=tuple(d.get("x_range", (0.0, 0.0))))  # type: ignore[arg-type]


def max_identifiable_terms(n_distinct_x: int) -> int:
    """Terms a fit can pin down with this many distinct x values: each costs two parameters, plus the asymptote."""
    return max(0, (n_distinct_x - 1) // 2)


def _linear_part(xs: np.ndarray, y: np.ndarray, decays: np.ndarray, p_bounds: tuple[float, float]) -> np.ndarray:
    """Given decay constants, the best asymptote and weights (linear, bounded): a good starting point."""
    a = np.column_stack([np.ones_like(xs)] + [-np.exp(-d * xs) for d in decays])
    lb = np.r_[p_bounds[0], np.zeros(len(decays))]
    ub = np.r_[p_bounds[1], np.full(len(decays), p_bounds[1] - p_bounds[0])]
    return lsq_linear(a, y, bounds=(lb, ub)).x


def fit_mixture(x: np.ndarray | list[float], y: np.ndarray | list[float], max_terms: int = 3, n_starts: int = 24,
                seed: int = 0, asymptote_bounds: tuple[float, float] = (0.0, 100.0),
                interval_level: float | None = 0.95) -> ScalingFit:
    """Fit y = p - sum_k c_k r_k^x by bounded least squares from several starting points (see module docstring).

    x: synthetic tokens (millions), >= 0; y: accuracy (%). Fewer than 2K+1 distinct x values: fewer terms, said in
    the fit's note. With `interval_level`, the fit also carries a profile-likelihood interval of the asymptote
    (extra["asymptote_interval"]): how far the data actually pin the extrapolated asymptote down.
    Raises InputError on empty, non-finite or negative input.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise InputError(f"x and y differ in length ({x.size} vs {y.size})")
    if x.size == 0:
        raise InputError("no points to fit")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError("points contain NaN or infinite values; drop or fix those rows")
    if np.any(x < 0):
        raise InputError(f"token counts must be >= 0 (got {x.min()})")
    lo, hi = asymptote_bounds
    if np.any(y < lo) or np.any(y > hi):
        raise InputError(f"accuracy outside [{lo}, {hi}] (got {y.min():.4g}..{y.max():.4g}); the fit expects "
                         "accuracy in percent")
    n = int(x.size)
    n_distinct = int(np.unique(x).size)
    k = min(int(max_terms), max_identifiable_terms(n_distinct))
    x_range = (float(x.min()), float(x.max()))
    notes = []
    if k < max_terms:
        notes.append(f"{n_distinct} distinct token count(s) identify at most {max_identifiable_terms(n_distinct)} "
                     f"term(s) (K terms need 2K+1): fitted {k} of the {max_terms} requested")
    if k == 0:
        p = float(np.mean(y))
        notes.append("constant fit: 'asymptote' is the mean accuracy, not an extrapolation")
        rmse = float(np.sqrt(np.mean((y - p) ** 2)))
        return ScalingFit(p, [], [], rmse, n, n_distinct, max_terms, "; ".join(notes), x_range)
    if n_distinct == 2 * k + 1:
        notes.append("exactly determined (2K+1 distinct points, no degrees of freedom left): rmse says nothing about "
                     "fit quality")

    x_max = float(x.max())
    xs = x / x_max
    x_min_pos = float(xs[xs > 0].min())
    log_dlo, log_dhi = math.log(DECAY_MIN), math.log(max(DECAY_MAX_AT_XMIN / x_min_pos, DECAY_MIN * 10))
    rng = np.random.default_rng(seed)
    starts = []
    # Deterministic starts spread the decays evenly over the admissible range, then seeded random ones.
    for shift in np.linspace(0.15, 0.85, max(1, min(n_starts, 5))):
        width = (log_dhi - log_dlo) * 0.7
        base = log_dlo + (log_dhi - log_dlo - width) * shift
        starts.append(np.linspace(base, base + width, k) if k > 1 else np.array([base + width / 2]))
    while len(starts) < max(n_starts, 1):
        starts.append(np.sort(rng.uniform(log_dlo, log_dhi, size=k)))

    y_scale = max(float(np.ptp(y)), 1e-6)
    lb = np.r_[lo, np.zeros(k), np.full(k, log_dlo)]
    # A weight above the accuracy scale would put y(0) below zero: bound it there (keeps degenerate fits finite).
    ub = np.r_[hi, np.full(k, hi - lo), np.full(k, log_dhi)]

    def residuals(theta: np.ndarray) -> np.ndarray:
        return mixture_residuals(theta, xs, y, y_scale)

    def jacobian(theta: np.ndarray) -> np.ndarray:
        return mixture_jacobian(theta, xs, y_scale)

    def fixed_p_start(p: float, logd0: np.ndarray) -> np.ndarray:
        """Weights that best fit y at a fixed asymptote p for given decays (linear, bounded)."""
        e = np.exp(-np.outer(xs, np.exp(logd0)))
        c = lsq_linear(e, p - y, bounds=(np.zeros(k), np.full(k, hi - lo))).x
        return np.r_[c, logd0]

    theta = _multistart(residuals, [np.r_[_linear_part(xs, y, np.exp(d), (lo, hi)), d] for d in starts], lb, ub,
                        jacobian)
    interval = None
    if interval_level:
        profile_starts = starts[:min(len(starts), 6)]
        for _ in range(3):  # a profile that finds a better optimum than the global search restarts from it
            interval, better = _profile_asymptote(residuals, theta, lb, ub, n - (1 + 2 * k), interval_level,
                                                  fixed_p_start, profile_starts, jacobian)
            if better is None:
                break
            theta = better
    p, c, decays_scaled = float(theta[0]), theta[1:1 + k], np.exp(theta[1 + k:])
    order = np.argsort(decays_scaled)  # slowest term first, as the paper lists them
    weights = [float(c[i]) for i in order]
    decays = [float(decays_scaled[i] / x_max) for i in order]
    fit = ScalingFit(p, weights, decays, 0.0, n, n_distinct, max_terms, "", x_range)
    fit.rmse = float(np.sqrt(np.mean((fit.predict(x) - y) ** 2)))
    if interval is not None:
        fit.extra["asymptote_interval"] = interval
        fit.extra["asymptote_interval_level"] = interval_level
        if interval[1] >= hi - 1e-6 * max(1.0, abs(hi)):
            notes.append(f"asymptote not pinned down by the data: its {interval_level:.0%} profile interval "
                         f"reaches the bound {hi:g}")
    if p >= hi - 1e-6 * max(1.0, abs(hi)) and interval is None:
        notes.append(f"asymptote hit its upper bound {hi:g}: the data do not pin it down")
    fit.note = "; ".join(notes)
    return fit


def mixture_residuals(theta: np.ndarray, xs: np.ndarray, y: np.ndarray, y_scale: float) -> np.ndarray:
    """(p - sum_k c_k exp(-d_k xs) - y) / y_scale for theta = (p, c_1..c_K, log d_1..log d_K)."""
    k = (theta.size - 1) // 2
    p, c, logd = theta[0], theta[1:1 + k], theta[1 + k:]
    return (p - np.exp(-np.outer(xs, np.exp(logd))) @ c - y) / y_scale


def mixture_jacobian(theta: np.ndarray, xs: np.ndarray, y_scale: float) -> np.ndarray:
    """d mixture_residuals / d theta, analytic: finite differences would cost 1 + 2K evaluations per step."""
    k = (theta.size - 1) // 2
    c, d = theta[1:1 + k], np.exp(theta[1 + k:])
    e = np.exp(-np.outer(xs, d))
    return np.column_stack([np.ones_like(xs), -e, e * np.outer(xs, c * d)]) / y_scale


def _inside(theta: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """Clip a start strictly inside the bounds, as the trust-region method requires."""
    lo = lb + 1e-9 * (1 + np.abs(lb))
    hi = np.where(np.isfinite(ub), ub - 1e-9 * (1 + np.abs(np.where(np.isfinite(ub), ub, 0))), np.inf)
    return np.minimum(np.maximum(theta, lo), hi)


def _multistart(fun, starts: list[np.ndarray], lb: np.ndarray, ub: np.ndarray, jac=None) -> np.ndarray:
    """Bounded least squares (trust-region reflective) from every start; the parameters of the lowest cost.
    `jac`: the residuals' Jacobian (default: finite differences)."""
    best = None
    for theta0 in starts:
        res = least_squares(fun, _inside(theta0, lb, ub), jac="2-point" if jac is None else jac, bounds=(lb, ub),
                            method="trf", x_scale="jac", max_nfev=4000)
        if best is None or res.cost < best.cost - 1e-15:
            best = res
    assert best is not None
    return best.x


def _profile_asymptote(residuals, theta: np.ndarray, lb: np.ndarray, ub: np.ndarray, dof: int, level: float,
                       fixed_p_start, starts: list[np.ndarray],
                       jacobian=None) -> tuple[list[float] | None, np.ndarray | None]:
    """Profile-likelihood interval of the asymptote: the p whose best fit (other parameters free) keeps
    SSE(p) <= SSE_min * (1 + F(level; 1, dof) / dof). (None, None) without residual degrees of freedom.

    Each side is walked outward on a geometric grid; every fixed-p fit starts from its neighbour's solution and
    from a few spread decays (the profile has local minima too), and the crossing is refined by bisection.
    A side that never crosses returns its bound (the data do not limit it). Also returns full parameters with a
    lower SSE than `theta` if the walk met any (then `theta` was not the global optimum), else None.
    """
    from scipy.stats import f as f_dist

    if dof < 1:
        return None, None
    sse_min = max(float(np.sum(residuals(theta) ** 2)), 1e-30)
    limit = sse_min * (1.0 + f_dist.ppf(level, 1, dof) / dof)
    p_hat = float(theta[0])
    rest_lb, rest_ub = lb[1:], ub[1:]
    better: list = [None, sse_min]

    def sse_at(p: float, warm: np.ndarray) -> tuple[float, np.ndarray]:
        cands = [warm] + [fixed_p_start(p, d) for d in starts]
        rest = _multistart(lambda r: residuals(np.r_[p, r]), cands, rest_lb, rest_ub,
                           None if jacobian is None else lambda r: jacobian(np.r_[p, r])[:, 1:])
        sse = float(np.sum(residuals(np.r_[p, rest]) ** 2))
        if sse < better[1] * (1 - 1e-6):
            better[0], better[1] = np.r_[p, rest], sse
        return sse, rest

    ends = []
    for bound in (float(lb[0]), float(ub[0])):
        if abs(bound - p_hat) < 1e-9:
            ends.append(bound)
            continue
        # Geometric steps away from p_hat: fine near the optimum, coarse towards the bound.
        steps = p_hat + (bound - p_hat) * np.geomspace(1e-3, 1.0, 14)
        inside_p, warm, end = p_hat, theta[1:].copy(), bound
        for p in steps:
            sse, rest = sse_at(float(p), warm)
            if sse > limit:
                out_p = float(p)
                for _ in range(4):  # bisect between the last p inside and the first outside
                    mid = 0.5 * (inside_p + out_p)
                    sse_mid, rest_mid = sse_at(mid, warm)
                    if sse_mid > limit:
                        out_p = mid
                    else:
                        inside_p, warm = mid, rest_mid
                end = 0.5 * (inside_p + out_p)
                break
            inside_p, warm = float(p), rest
        ends.append(float(end))
    return [min(ends), max(ends)], better[0]


# ---- the workflow side: qa_accuracy.csv -> one fit per synthesis method (and evaluation mode) ----

def x_tokens(df: pd.DataFrame, x_axis: str = "tokens", fraction_scale: float = 455e6) -> pd.Series:
    """The x of every row: budget_tokens (this workflow's corpus tokens), or with x_axis `fraction` the authors'
    axis, budget_fraction x fraction_scale (the paper plots subsample_ratio x 455M; docs/figures.md)."""
    if x_axis == "tokens":
        return pd.to_numeric(df["budget_tokens"], errors="coerce")
    if x_axis != "fraction":
        raise InputError(f"figures.x_axis must be one of {', '.join(X_AXES)} (got {x_axis!r})")
    if "budget_fraction" not in df.columns:
        raise InputError("figures.x_axis fraction needs the table's budget_fraction column (re-run aggregate)")
    return pd.to_numeric(df["budget_fraction"], errors="coerce") * float(fraction_scale)


def read_accuracy_table(path: str | Path, accuracy_scale: str = "auto", x_axis: str = "tokens",
                        fraction_scale: float = 455e6) -> pd.DataFrame:
    """The headline accuracy per model and mode, from the long table results/tables/qa_accuracy.csv (its rows
    with headline True) or the headline table qa_headline.csv (workflow_scripts/aggregate.py), with
    accuracy (the value), accuracy_pct, ci_low_pct, ci_high_pct, tokens, tokens_millions, capped, and `missing`
    (no value: e.g. no attempted answers, with the reason in `missing_note`).

    accuracy_scale: fraction (0-1), percent (0-100) or auto (fraction when every value and interval bound is
    <= 1). A missing required column, a value that is not a number, or two headline rows for one model and mode
    raise InputError naming the file (and line).
    """
    path = Path(path)
    text = {c: str for c in ("model", "method", "mode", "metric", "split", "convention", "note", "label", "budget")}
    try:
        df = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (the evaluation stage's aggregate rule writes it)") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; expected the long accuracy table (workflow_scripts/aggregate.py)") \
            from None
    if "value" not in df.columns and "accuracy" in df.columns:
        raise InputError(f"{path}: a wide accuracy table (an accuracy column, no metric/value): the table is long "
                         "now; re-run the aggregate rule")
    missing = [c for c in ("model", "method", "budget_tokens", "mode", "metric", "value") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (have {list(df.columns)})")
    df["line"] = df.index + 2  # +1 header, +1 one-based: where a bad value is
    if "headline" in df.columns:
        df = df[df["headline"].astype(str).str.strip().str.lower().isin(("true", "1"))]
    df = df[df["metric"] == "accuracy"].copy()
    for col in ("mode", "note", "split", "convention"):
        df[col] = df[col].fillna("").astype(str) if col in df.columns else ""
    df["method"] = df["method"].astype(str).str.strip()
    twice = df[df.duplicated(["model", "mode"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise InputError(f"{path}:{first['line']}: model {first['model']} mode {first['mode']!r} has "
                         f"{len(twice[(twice['model'] == first['model']) & (twice['mode'] == first['mode'])])} "
                         "headline rows; expected one")
    for col in ("ci_low", "ci_high", "n"):
        if col not in df.columns:
            df[col] = np.nan
    df["accuracy"] = pd.to_numeric(df["value"], errors="coerce")
    bad = df["accuracy"].isna() & df["value"].notna()
    if bad.any():
        raise InputError(f"{path}:{int(df.loc[bad, 'line'].iloc[0])}: value is not a number")
    # A model without a value (no attempted answers, ...) stays in the table: drawn as such, never fitted.
    df["missing"] = df["accuracy"].isna()
    df["missing_note"] = df["note"].where(df["note"] != "", "no value")
    for col in ("ci_low", "ci_high", "n"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    if accuracy_scale == "auto":
        vals = pd.concat([df["accuracy"], df["ci_low"], df["ci_high"]]).dropna()
        accuracy_scale = "fraction" if vals.empty or float(vals.max()) <= 1.0 else "percent"
    if accuracy_scale not in ("fraction", "percent"):
        raise InputError(f"accuracy_scale must be auto, fraction or percent (got {accuracy_scale!r})")
    factor = 100.0 if accuracy_scale == "fraction" else 1.0
    for col in ("accuracy", "ci_low", "ci_high"):
        df[f"{col}_pct"] = df[col] * factor
    # budget_tokens: empty for base (and possibly raw, or "all"); a count for synthesis methods.
    df["tokens"] = x_tokens(df, x_axis, fraction_scale)
    df["tokens_millions"] = df["tokens"] / 1e6
    # budget_capped (from the CPT train summary): the method's corpus was smaller than the budget, so the model
    # trained on fewer tokens than its nominal budget: such points are marked in the plot and left out of the fit.
    capped = df["budget_capped"] if "budget_capped" in df.columns else pd.Series(False, index=df.index)
    df["capped"] = capped.astype(str).str.strip().str.lower().isin(("true", "1", "yes"))
    df.attrs["accuracy_scale"] = accuracy_scale
    return df


def synthesis_points(df: pd.DataFrame, with_missing: bool = False) -> pd.DataFrame:
    """Rows of synthesis methods with a token budget (not the base / Raw CPT / API levels); with_missing: those
    without a value too (no attempted answers), which the figure marks and the fit skips."""
    keep = ~df["method"].isin(LEVEL_METHODS) & df["tokens"].notna() & (df["tokens"] > 0)
    return df[keep if with_missing else keep & ~df["missing"]]


def skipped_models(df: pd.DataFrame) -> list[dict]:
    """The models (and modes) without a value: kept in the table, drawn marked, left out of every fit."""
    return [{"model": r["model"], "mode": r["mode"], "note": r["missing_note"]}
            for _, r in df[df["missing"]].iterrows()]


def fit_table(df: pd.DataFrame, fcfg: dict) -> list[dict]:
    """One fit per (synthesis method, mode) of the table, as dicts with method, mode and the fit's fields."""
    fit_cfg = fcfg["fit"]
    wanted = fit_cfg["methods"]
    pts = synthesis_points(df)
    fits = []
    for (method, mode), group in pts.groupby(["method", "mode"], sort=True):
        if wanted is not None and method not in wanted:
            continue
        capped = sorted(int(t) for t in group.loc[group["capped"], "tokens"])
        group = group[~group["capped"]]
        if group.empty:
            continue
        x = group["tokens_millions"].to_numpy(float)
        y = group["accuracy_pct"].to_numpy(float)
        anchored = None
        if fit_cfg["include_base"]:
            base = df[(df["method"] == "base") & (df["mode"] == mode) & ~df["missing"]]
            if len(base):
                anchored = float(base["accuracy_pct"].iloc[0])
                x, y = np.r_[0.0, x], np.r_[anchored, y]
        fit = fit_mixture(x, y, max_terms=int(fit_cfg["max_terms"]), n_starts=int(fit_cfg["n_starts"]),
                          seed=int(fit_cfg["seed"]), interval_level=fit_cfg["interval_level"])
        d = {"method": method, "mode": mode, **fit.to_dict()}
        d["base_anchor_percent"] = anchored
        d["excluded_capped_budgets"] = capped
        if capped:
            d["note"] = "; ".join(filter(None, [d["note"], f"budgets {capped} left out: capped (corpus smaller "
                                                          "than the budget)"]))
        fits.append(d)
    return fits


def skipped_line(skipped: list[dict]) -> str:
    """One line naming the models the fit left out for want of a value."""
    names = ", ".join(f"{s['model']}{'/' + s['mode'] if s['mode'] else ''} ({s['note']})" for s in skipped)
    return f"skipped {len(skipped)} model(s) without a value: {names}"


def fit_workflow(table: str | Path, cfg: dict) -> dict:
    """The content of results/figures/scaling_fit.json: the fits of every synthesis method, with provenance."""
    fcfg = with_defaults(cfg)["figures"]
    df = read_accuracy_table(table, fcfg["accuracy_scale"], fcfg["x_axis"], fcfg["fraction_scale"])
    fits = fit_table(df, fcfg)
    skipped = skipped_models(df)
    notes = ["" if fits else "no synthesis-method rows with a token budget in the table: nothing to fit"]
    if skipped:
        notes.append(skipped_line(skipped))
    return {
        "table": str(table),
        "accuracy_scale_read": df.attrs["accuracy_scale"],
        "model_form": "y = asymptote - sum_k weight_k * rate_k ** x (x in millions of synthetic tokens, y in %)",
        "x_axis": (fcfg["x_axis"] if fcfg["x_axis"] == "tokens"
                   else f"fraction of the corpus x {fcfg['fraction_scale']:.6g} tokens (the paper's axis)"),
        "fits": fits,
        "skipped": skipped,
        "note": "; ".join(n for n in notes if n),
        "config_hash": config_hash(fcfg),
    }


def read_points_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A POINTS.csv with columns tokens_millions, accuracy_percent."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; expected columns tokens_millions, accuracy_percent") from None
    missing = [c for c in ("tokens_millions", "accuracy_percent") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (have {list(df.columns)})")
    for col in ("tokens_millions", "accuracy_percent"):
        vals = pd.to_numeric(df[col], errors="coerce")
        if vals.isna().any():
            raise InputError(f"{path}:{int(vals.index[vals.isna()][0]) + 2}: {col} is not a number")
        df[col] = vals
    return df["tokens_millions"].to_numpy(float), df["accuracy_percent"].to_numpy(float)


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("fit_scaling", __doc__, config=True)
    p.add_argument("points", nargs="?", help="CSV with columns tokens_millions, accuracy_percent")
    p.add_argument("--table", help="results/tables/qa_accuracy.csv: fit every synthesis method (the workflow rule)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--max-terms", type=int, default=None, help="terms of the mixture (default: figures.fit.max_terms)")
    p.add_argument("--starts", type=int, default=None, help="starting points of the optimiser (figures.fit.n_starts)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random starting points (figures.fit.seed)")
    args = p.parse_args(argv)
    if bool(args.points) == bool(args.table):
        p.error("give either POINTS.csv or --table")
    return stage.run(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    cfg = stage.config(args)
    fcfg = cfg["figures"]["fit"]
    for key, val in (("max_terms", args.max_terms), ("n_starts", args.starts), ("seed", args.seed)):
        if val is not None:
            fcfg[key] = val
    if args.table:
        out = fit_workflow(args.table, cfg)
    else:
        x, y = read_points_csv(args.points)
        fit = fit_mixture(x, y, max_terms=fcfg["max_terms"], n_starts=fcfg["n_starts"], seed=fcfg["seed"],
                          interval_level=fcfg["interval_level"])
        out = {**fit.to_dict(), "points": str(args.points)}
    stage.write_stats(args.output, out)
    if out.get("skipped"):
        print(skipped_line(out["skipped"]), file=sys.stderr)
    for f in out["fits"] if "fits" in out else [out]:
        label = f"{f.get('method', 'points')}{'/' + f['mode'] if f.get('mode') else ''}"
        print(f"{label}: asymptote {f['asymptote']:.2f}%, {f['n_terms']} term(s), rmse {f['rmse']:.3f} "
              f"over {f['n_points']} points{'; ' + f['note'] if f['note'] else ''}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
