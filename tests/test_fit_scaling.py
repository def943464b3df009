"""The scaling-curve fit (workflow_scripts/fit_scaling.py): recovery of known curves, the identifiability
fallbacks, the asymptote's profile interval, the command line and the qa_accuracy.csv side."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from workflow_scripts import fit_scaling, paper_reference as paper
from workflow_scripts.fit_scaling import (ScalingFit, fit_mixture, fit_workflow, max_identifiable_terms,
                                          read_accuracy_table)
from workflow_scripts.io_utils import InputError

pytestmark = pytest.mark.unit

PAPER_X = np.array(paper.BUDGETS_MILLIONS)
# Budgets past the paper's 455M, where the slowest term (rate 0.9989/M) has decayed: the asymptote is observable.
SATURATING_X = np.r_[PAPER_X, 700, 1000, 1500, 2000, 3000, 4000, 5000]


def paper_curve(x: np.ndarray) -> np.ndarray:
    return np.array([paper.fit_curve(v) for v in x])


def test_noise_free_paper_curve_recovers_all_parameters():
    fit = fit_mixture(PAPER_X, paper_curve(PAPER_X), interval_level=None)
    assert fit.n_terms == 3
    assert fit.asymptote == pytest.approx(paper.FIT_ASYMPTOTE, abs=0.5)
    for (c, r), w, rate in zip(paper.FIT_TERMS, fit.weights, fit.rates):
        assert rate == pytest.approx(r, abs=0.01)
        assert w == pytest.approx(c, rel=0.1)
    assert fit.rmse < 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_points_recover_asymptote_within_a_point(seed):
    y = paper_curve(SATURATING_X) + np.random.default_rng(seed).normal(0, 0.3, SATURATING_X.size)
    fit = fit_mixture(SATURATING_X, y)
    assert fit.n_terms == 3
    assert abs(fit.asymptote - paper.FIT_ASYMPTOTE) < 1.0
    lo, hi = fit.extra["asymptote_interval"]
    assert lo <= fit.asymptote <= hi and hi - lo < 3.0  # pinned down: a narrow interval
    assert 0.2 < fit.rmse < 0.4  # about the noise level: neither under- nor overfitted
    assert "not pinned down" not in fit.note


def test_paper_budgets_alone_do_not_pin_the_asymptote_and_the_fit_says_so():
    # Within the paper's budgets (up to 455M) the slowest term has only decayed to 0.9989^455 = 0.61: with 0.3
    # points of noise, asymptotes from the low 60s to 100 fit equally well. The fit must follow the data within
    # the measured range, report an interval that contains the truth, and flag the asymptote as undetermined.
    y = paper_curve(PAPER_X) + np.random.default_rng(1).normal(0, 0.3, PAPER_X.size)
    fit = fit_mixture(PAPER_X, y)
    lo, hi = fit.extra["asymptote_interval"]
    assert lo <= paper.FIT_ASYMPTOTE <= hi
    assert hi == pytest.approx(100.0)
    assert "not pinned down" in fit.note
    grid = np.geomspace(PAPER_X.min(), PAPER_X.max(), 50)
    assert np.sqrt(np.mean((fit.predict(grid) - paper_curve(grid)) ** 2)) < 0.3


@pytest.mark.parametrize("n,expected_terms", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3), (9, 3)])
def test_fewer_points_fit_fewer_terms_and_say_so(n, expected_terms):
    x = PAPER_X[:: max(1, PAPER_X.size // n)][:n]
    y = paper_curve(x)
    fit = fit_mixture(x, y, interval_level=None)
    assert fit.n_terms == expected_terms == min(3, max_identifiable_terms(n))
    assert fit.to_dict()["requested_terms"] == 3
    if expected_terms < 3:
        assert f"fitted {expected_terms} of the 3 requested" in fit.note
    else:
        assert "requested" not in fit.note
    if expected_terms == 0:
        assert fit.asymptote == pytest.approx(float(np.mean(y)))
        assert "constant fit" in fit.note
    # Whatever the number of terms, the curve stays within the data's range at the data.
    assert np.all(fit.predict(x) <= y.max() + 1e-6) and np.all(fit.predict(x) >= y.min() - 1e-6)


def test_one_point_is_a_constant():
    fit = fit_mixture([0.016], [31.0])
    d = fit.to_dict()
    assert d["asymptote"] == 31.0 and d["terms"] == [] and d["rmse"] == 0.0 and d["n_points"] == 1


def test_identifiability_counts_distinct_budgets_not_rows():
    # Five rows but two distinct budgets (repeated evaluations): still only a constant.
    fit = fit_mixture([1, 1, 1, 2, 2], [40, 41, 39, 45, 46])
    assert fit.n_terms == 0 and fit.n_distinct_x == 2
    assert fit.asymptote == pytest.approx(42.2)


def test_exactly_determined_fit_has_no_interval():
    fit = fit_mixture([1.0, 4.0, 16.0], [40.0, 45.0, 47.0])
    assert fit.n_terms == 1
    assert "asymptote_interval" not in fit.extra
    assert "no degrees of freedom" in fit.note
    assert fit.rmse < 0.05


def test_fitted_curve_is_increasing_and_bounded():
    y = paper_curve(PAPER_X) + np.random.default_rng(3).normal(0, 0.5, PAPER_X.size)
    fit = fit_mixture(PAPER_X, y, interval_level=None)
    grid = np.geomspace(0.01, 1e5, 400)
    pred = fit.predict(grid)
    assert np.all(np.diff(pred) >= -1e-9)
    assert 0 <= fit.asymptote <= 100 and all(w >= 0 for w in fit.weights) and all(0 < r < 1 for r in fit.rates)


def test_roundtrip_through_dict():
    fit = fit_mixture(PAPER_X, paper_curve(PAPER_X), interval_level=None)
    again = ScalingFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert np.allclose(again.predict(PAPER_X), fit.predict(PAPER_X))


def test_the_analytic_jacobian_matches_central_differences():
    rng = np.random.default_rng(7)
    xs, y = np.sort(rng.uniform(0, 1, 9)), rng.uniform(30, 60, 9)
    theta = np.r_[60.0, 5.0, 8.0, 3.0, np.log([0.3, 4.0, 30.0])]
    jac, h = fit_scaling.mixture_jacobian(theta, xs, 7.0), 1e-6
    fd = np.column_stack([(fit_scaling.mixture_residuals(theta + h * e, xs, y, 7.0)
                           - fit_scaling.mixture_residuals(theta - h * e, xs, y, 7.0)) / (2 * h)
                          for e in np.eye(theta.size)])
    assert jac.shape == (9, 7) and np.allclose(jac, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("x,y,match", [
    ([], [], "no points"),
    ([1.0, np.nan], [40.0, 41.0], "NaN"),
    ([-1.0, 2.0], [40.0, 41.0], ">= 0"),
    ([1.0, 2.0], [0.4, 140.0], "percent"),
])
def test_bad_points_raise_input_error(x, y, match):
    with pytest.raises(InputError, match=match):
        fit_mixture(x, y)


# ---- command line ----

def test_cli_points_csv(tmp_path):
    pts = tmp_path / "points.csv"
    pd.DataFrame({"tokens_millions": PAPER_X, "accuracy_percent": paper_curve(PAPER_X)}).to_csv(pts, index=False)
    out = tmp_path / "fit.json"
    assert fit_scaling.main([str(pts), "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    assert {"asymptote", "terms", "rmse", "n_points"} <= set(d)
    assert d["n_points"] == PAPER_X.size and len(d["terms"]) == 3
    assert all({"weight", "rate"} <= set(t) for t in d["terms"])
    assert d["asymptote"] == pytest.approx(paper.FIT_ASYMPTOTE, abs=0.5)


def test_cli_two_points_do_not_crash(tmp_path):
    pts = tmp_path / "points.csv"
    pts.write_text("tokens_millions,accuracy_percent\n0.004,30\n0.008,34\n")
    out = tmp_path / "fit.json"
    assert fit_scaling.main([str(pts), "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["terms"] == [] and d["asymptote"] == pytest.approx(32.0) and "fitted 0 of the 3" in d["note"]


def test_cli_bad_csv_exits_2_naming_the_problem(tmp_path, capsys):
    pts = tmp_path / "points.csv"
    pts.write_text("tokens,accuracy\n1,40\n")
    assert fit_scaling.main([str(pts), "--output", str(tmp_path / "f.json")]) == 2
    assert "missing column(s) ['tokens_millions', 'accuracy_percent']" in capsys.readouterr().err
    pts.write_text("tokens_millions,accuracy_percent\n1,40\nx,41\n")
    assert fit_scaling.main([str(pts), "--output", str(tmp_path / "f.json")]) == 2
    assert "points.csv:3: tokens_millions is not a number" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


# ---- the workflow side: qa_accuracy.csv ----

def write_table(path, scale=1.0):
    rows = [("base", "base", "", 0.30), ("raw-all", "raw", "", 0.31)]
    rows += [(f"entigraph-{b}", "entigraph", b, a) for b, a in [(4000, .32), (8000, .35), (16000, .37),
                                                                   (32000, .38), (64000, .385)]]
    rows += [(f"rephrase-{b}", "rephrase", b, a) for b, a in [(4000, .31), (8000, .33)]]
    df = pd.DataFrame(rows, columns=["model", "method", "budget_tokens", "value"])
    df["value"] = df["value"] * scale
    df["ci_low"], df["ci_high"] = df["value"] - 0.05 * scale, df["value"] + 0.05 * scale
    df["mode"], df["n"], df["metric"], df["split"], df["convention"], df["headline"] = \
        "loglik", 200, "accuracy", "all", "wrong", True
    # The long table's other rows (another convention, the attempt rate) are never fitted.
    other = df.assign(convention="dropped", value=df["value"] / 2, headline=False)
    rate = df.assign(metric="attempted", convention="", value=1.0, ci_low=np.nan, ci_high=np.nan, headline=False)
    pd.concat([df, other, rate]).to_csv(path, index=False)
    return path


def test_table_in_fraction_or_percent_reads_the_same(tmp_path):
    a = read_accuracy_table(write_table(tmp_path / "frac.csv"))
    b = read_accuracy_table(write_table(tmp_path / "pct.csv", scale=100.0))
    assert a.attrs["accuracy_scale"] == "fraction" and b.attrs["accuracy_scale"] == "percent"
    assert np.allclose(a["accuracy_pct"], b["accuracy_pct"]) and a["accuracy_pct"].max() == pytest.approx(38.5)


def test_fit_workflow_fits_each_synthesis_method(tmp_path):
    out = fit_workflow(write_table(tmp_path / "t.csv"), {"figures": {"fit": {"n_starts": 6}}, "run_name": "t"})
    fits = {f["method"]: f for f in out["fits"]}
    assert set(fits) == {"entigraph", "rephrase"}  # base and raw are levels, not curves
    assert fits["entigraph"]["n_terms"] == 2 and fits["entigraph"]["mode"] == "loglik"
    assert fits["rephrase"]["n_terms"] == 0 and "constant fit" in fits["rephrase"]["note"]
    assert 38.0 <= fits["entigraph"]["asymptote"] <= 100.0
    x = np.array([4000, 8000, 16000, 32000, 64000]) / 1e6
    pred = ScalingFit.from_dict(fits["entigraph"]).predict(x)
    assert np.max(np.abs(pred - [32, 35, 37, 38, 38.5])) < 1.0


def test_fit_workflow_include_base_adds_the_zero_point(tmp_path):
    cfg = {"figures": {"fit": {"include_base": True, "n_starts": 6, "methods": ["rephrase"]}}}
    out = fit_workflow(write_table(tmp_path / "t.csv"), cfg)
    (fit,) = out["fits"]
    assert fit["method"] == "rephrase" and fit["n_points"] == 3 and fit["base_anchor_percent"] == pytest.approx(30.0)
    assert fit["n_terms"] == 1 and fit["x_range"][0] == 0.0


def test_fit_workflow_without_synthesis_rows_writes_an_empty_fit(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("model,method,budget_tokens,mode,metric,value,ci_low,ci_high,n,headline\n"
                    "base,base,,loglik,accuracy,0.3,0.2,0.4,50,True\n")
    out = fit_workflow(path, {"figures": {}})
    assert out["fits"] == [] and "nothing to fit" in out["note"]


def test_cli_table_mode(tmp_path):
    out = tmp_path / "scaling_fit.json"
    cfg = json.dumps({"figures": {"fit": {"n_starts": 4}}, "run_name": "t"})
    assert fit_scaling.main(["--table", str(write_table(tmp_path / "t.csv")), "--config-json", cfg,
                             "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [f["method"] for f in d["fits"]] == ["entigraph", "rephrase"] and d["accuracy_scale_read"] == "fraction"


def test_table_missing_column_is_an_input_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("model,method,mode,metric,value\nbase,base,loglik,accuracy,0.3\n")
    with pytest.raises(InputError, match=r"t.csv: missing column\(s\) \['budget_tokens'\]"):
        read_accuracy_table(path)
    path.write_text("model,method,budget_tokens,accuracy\nbase,base,,0.3\n")  # the wide table before issue 20
    with pytest.raises(InputError, match="t.csv: a wide accuracy table .* re-run the aggregate rule"):
        read_accuracy_table(path)


def test_two_headline_rows_for_one_model_are_an_input_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("model,method,budget_tokens,mode,metric,value,headline\n"
                    "base,base,,loglik,accuracy,0.3,True\nbase,base,,loglik,accuracy,0.4,True\n")
    with pytest.raises(InputError, match=r"t.csv:2: model base mode 'loglik' has 2 headline rows"):
        read_accuracy_table(path)


def test_the_headline_table_reads_as_the_long_one(tmp_path):
    long = read_accuracy_table(write_table(tmp_path / "t.csv"))
    head = tmp_path / "h.csv"
    pd.read_csv(tmp_path / "t.csv").query("headline").drop(columns="headline").to_csv(head, index=False)
    assert list(read_accuracy_table(head)["accuracy"]) == list(long["accuracy"])
    assert len(long) == 9 and not long["missing"].any()
