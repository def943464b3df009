"""The figures (workflow_scripts/figures.py), the paper's reference values, the synthesis summary table and the
figures block of the config schema."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pandas as pd
import pytest

from workflow_scripts import figures, paper_reference as paper
from workflow_scripts.config import load_config, validate_config
from workflow_scripts.io_utils import InputError

pytestmark = pytest.mark.unit

CFG = {"run_name": "unit-test", "models": {"base": {"source": "package", "name": "smollm2-135m-instruct"}},
       "data": {"source": "quality"}, "figures": {"dpi": 60, "fit": {"n_starts": 4}}}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def write_table(path: Path, modes=("loglik",), percent=False) -> Path:
    rows = []
    for mode in modes:
        rows += [("base", "base", "", mode, 0.28), ("raw-all", "raw", "", mode, 0.30)]
        rows += [(f"entigraph-{b}", "entigraph", b, mode, a) for b, a in [(4000, .30), (8000, .33), (16000, .36)]]
        rows += [(f"rephrase-{b}", "rephrase", b, mode, a) for b, a in [(4000, .29), (8000, .30), (16000, .31)]]
    df = pd.DataFrame(rows, columns=["model", "method", "budget_tokens", "mode", "value"])
    df["ci_low"], df["ci_high"], df["n"] = df["value"] - 0.08, df["value"] + 0.08, 120
    if percent:
        for c in ("value", "ci_low", "ci_high"):
            df[c] = df[c] * 100
    df["metric"], df["split"], df["split_label"], df["convention"], df["headline"] = \
        "accuracy", "all", "all questions", "wrong", True
    # a non-headline row of the long table (another split) is never drawn
    other = df.assign(split="val", split_label="val split", value=df["value"] / 3, headline=False)
    pd.concat([df, other]).to_csv(path, index=False)
    return path


@pytest.fixture()
def table_and_fit(tmp_path):
    from workflow_scripts.fit_scaling import fit_workflow

    table = write_table(tmp_path / "qa_accuracy.csv")
    fit = tmp_path / "scaling_fit.json"
    fit.write_text(json.dumps(fit_workflow(table, CFG)))
    return table, fit


def test_paper_reference_values_match_the_protocol():
    # Values transcribed from the paper (workflow_scripts/paper_reference.py); the fitted curve reproduces its own form.
    assert paper.FIT_ASYMPTOTE == 64.5456 and paper.FIT_TERMS[0] == (13.8352, 0.9989)
    assert {r.method: r.accuracy_percent for r in paper.HEADLINE if r.method in ("base", "raw", "entigraph")} == \
        {"base": 39.49, "raw": 38.15, "entigraph": 56.22}
    (reph,) = paper.headline("rephrase")
    assert reph.accuracy_percent == 43.08 and not reph.verified and "46.89" in reph.source
    # The paper's curve at its end point lies close to its reported 455M accuracy (56.22%).
    assert abs(paper.fit_curve(455.0) - 56.22) < 0.5
    assert paper.fit_curve(0.182) < paper.fit_curve(4.55) < paper.fit_curve(455.0) < paper.FIT_ASYMPTOTE
    assert "arXiv:2409.07431" in paper.CITATION


@pytest.mark.parametrize("layout", ["panel", "overlay", "none"])
def test_scaling_plot_writes_png_and_pdf(tmp_path, table_and_fit, layout):
    table, fit = table_and_fit
    cfg = copy.deepcopy(CFG)
    cfg["figures"]["paper_reference"] = layout
    outs = [tmp_path / "scaling_curve.png", tmp_path / "scaling_curve.pdf"]
    drawn = figures.plot_scaling(table, fit, cfg, outs)
    w, h = png_size(outs[0])
    assert w > h > 150 and w >= 0.5 * 12 * 60  # figsize 12 in at 60 dpi (tight bbox trims or grows a little)
    assert outs[1].read_bytes()[:5] == b"%PDF-" and outs[1].stat().st_size > 5000
    assert [s["method"] for s in drawn["series"]] == ["entigraph", "rephrase"]
    assert sorted(drawn["levels"]) == ["base", "raw-all"] and drawn["fits"] == ["entigraph", "rephrase"]
    assert drawn["paper"] is (layout != "none")
    assert drawn["plotted"] == "all questions, unparseable counted wrong" and drawn["missing"] == []
    assert not list(tmp_path.glob(".scaling_curve*"))  # no temporary files left behind


def test_scaling_plot_handles_percent_tables_several_modes_and_no_fit(tmp_path):
    table = write_table(tmp_path / "t.csv", modes=("loglik", "cot"), percent=True)
    out = tmp_path / "s.png"
    drawn = figures.plot_scaling(table, None, CFG, [out])
    assert len(drawn["series"]) == 4 and drawn["fits"] == [] and png_size(out)[0] > 0
    cfg = copy.deepcopy(CFG)
    cfg["figures"]["modes"] = ["cot"]
    drawn = figures.plot_scaling(table, None, cfg, [out])
    assert {s["mode"] for s in drawn["series"]} == {"cot"}


def test_scaling_plot_with_only_the_base_model(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("model,method,budget_tokens,mode,metric,value,ci_low,ci_high,n,headline\n"
                     "base,base,,loglik,accuracy,0.3,0.2,0.4,50,True\n")
    drawn = figures.plot_scaling(table, None, CFG, [tmp_path / "s.png"])
    assert drawn["series"] == [] and drawn["levels"] == ["base"]
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_unknown_style_and_format_are_input_errors(tmp_path, table_and_fit):
    table, fit = table_and_fit
    cfg = copy.deepcopy(CFG)
    cfg["figures"]["style"] = "no-such-style"
    with pytest.raises(InputError, match="not a matplotlib style"):
        figures.plot_scaling(table, fit, cfg, [tmp_path / "s.png"])
    # every output's format is checked before anything is drawn: no PNG is left beside the refused JPEG
    with pytest.raises(InputError, match="s.jpg: unsupported figure format 'jpg'"):
        figures.plot_scaling(table, fit, CFG, [tmp_path / "s.png", tmp_path / "s.jpg"])
    with pytest.raises(InputError, match="d.gif: unsupported figure format 'gif'"):
        figures.plot_diversity([], CFG, [tmp_path / "d.png", tmp_path / "d.gif"])
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*"))


def write_reports(root: Path) -> tuple[list[Path], list[Path]]:
    prefixes = [{"tokens": t, "distinct_1": d1, "distinct_2": d1 + .3, "distinct_3": d1 + .45,
                 "compression_ratio": 2 + t / 1e4, "source_ngram_overlap": .4, "entity_coverage": t / 2e4}
                for t, d1 in [(4000, .45), (8000, .4), (16000, .36)]]
    reports = {
        "entigraph": {"records": 60, "tokens": 16000, **{k: v for k, v in prefixes[-1].items() if k != "tokens"},
                      "prefixes": prefixes},
        "rephrase": {"records": 12, "tokens": 9000, "distinct_1": .3, "distinct_2": .6, "distinct_3": .7,
                     "compression_ratio": 3.5, "source_ngram_overlap": .7, "entity_coverage": None},
    }
    ledgers = {"entigraph": {"requests": 63, "prompt_tokens": 90000, "completion_tokens": 16000, "cost_usd": 0.0,
                             "wall_seconds": 321.0, "by_kind": {"pair": 40, "triple": 20}},
               "rephrase": {"requests": 12, "prompt_tokens": 20000, "completion_tokens": 9000, "cost_usd": 0.0,
                            "wall_seconds": 80.5}}
    rep_paths, led_paths = [], []
    for m in reports:
        (root / m).mkdir(parents=True, exist_ok=True)
        (root / m / "report.json").write_text(json.dumps(reports[m]))
        (root / m / "ledger.json").write_text(json.dumps(ledgers[m]))
        rep_paths.append(root / m / "report.json")
        led_paths.append(root / m / "ledger.json")
    return rep_paths, led_paths


def test_diversity_series_prefers_per_prefix_values(tmp_path):
    reps, _ = write_reports(tmp_path / "synth")
    data = figures.diversity_series([figures.read_synth_report(p) for p in reps])
    assert data["entigraph"]["distinct_1"] == [(4000.0, .45), (8000.0, .4), (16000.0, .36)]
    assert data["rephrase"]["compression_ratio"] == [(9000.0, 3.5)]
    assert "entity_coverage" not in data["rephrase"]  # null: not reported, not zero
    # A report keyed by budget ({"4000": {...}}) reads the same way.
    keyed = {"method": "x", "by_budget": {"4000": {"distinct_1": .5}, "8000": {"distinct_1": .4}}}
    assert figures.diversity_series([keyed])["x"]["distinct_1"] == [(4000.0, .5), (8000.0, .4)]


def test_diversity_plot(tmp_path):
    reps, _ = write_reports(tmp_path / "synth")
    outs = [tmp_path / "diversity.png", tmp_path / "diversity.pdf"]
    drawn = figures.plot_diversity(reps, CFG, outs)
    assert len(drawn["distinct"]) == 6 and drawn["entity_coverage"] == ["entigraph:entity_coverage"]
    w, h = png_size(outs[0])
    assert w > 400 and h > 300 and outs[1].stat().st_size > 5000
    # No synthesis methods configured: still a (labelled, empty) figure, not a crash.
    assert figures.plot_diversity([], CFG, [tmp_path / "empty.png"]) == {m: [] for m, *_ in figures.DIVERSITY_METRICS}


def test_malformed_report_names_the_file(tmp_path):
    bad = tmp_path / "entigraph" / "report.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(InputError, match="entigraph/report.json:1: malformed JSON"):
        figures.plot_diversity([bad], CFG, [tmp_path / "d.png"])


def test_synthesis_table_joins_ledgers_and_reports(tmp_path):
    reps, leds = write_reports(tmp_path / "synth")
    df = figures.synthesis_table(leds, reps, tmp_path / "s.csv", tmp_path / "s.html")
    assert list(df["method"]) == ["entigraph", "rephrase"]
    row = df.set_index("method").loc["entigraph"]
    assert row["ledger.requests"] == 63 and row["ledger.by_kind.pair"] == 40 and row["report.distinct_1"] == .36
    assert "report.prefixes" not in df.columns  # lists stay out of the table
    assert pd.read_csv(tmp_path / "s.csv").shape == df.shape
    page = (tmp_path / "s.html").read_text()
    assert "<table" in page and "ledger.wall_seconds" in page and "rephrase" in page


def test_cli_scaling_and_error_exit(tmp_path, table_and_fit, capsys):
    table, fit = table_and_fit
    out = tmp_path / "c.png"
    assert figures.main(["scaling", "--table", str(table), "--fit", str(fit), "--output", str(out),
                         "--config-json", json.dumps(CFG)]) == 0
    assert png_size(out)[0] > 0
    assert figures.main(["scaling", "--table", str(tmp_path / "missing.csv"), "--output", str(out),
                         "--config-json", json.dumps(CFG)]) == 2
    assert "missing.csv: file not found" in capsys.readouterr().err


def test_figures_schema_defaults_and_validation():
    cfg = load_config()
    f = cfg["figures"]
    assert f["formats"] == ["png", "pdf"] and f["paper_reference"] == "panel" and f["fit"]["max_terms"] == 3
    bad = copy.deepcopy(cfg)
    bad["figures"]["formats"] = ["pdf"]  # the report needs the PNG
    with pytest.raises(ValueError, match="figures.formats"):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["figures"]["colour"] = "red"
    with pytest.raises(ValueError, match="Additional properties"):
        validate_config(bad)


def test_api_levels_and_capped_budgets(tmp_path):
    from workflow_scripts.fit_scaling import fit_workflow

    table = tmp_path / "t.csv"
    table.write_text(
        "model,method,budget_tokens,mode,metric,value,ci_low,ci_high,n,budget_capped\n"
        "base,base,,loglik,accuracy,0.28,0.2,0.37,100,\n"
        "api-gpt-4o-mini,api,,loglik,accuracy,0.5,0.4,0.6,100,\n"
        "entigraph-4000,entigraph,4000,loglik,accuracy,0.3,0.22,0.39,100,False\n"
        "entigraph-8000,entigraph,8000,loglik,accuracy,0.33,0.25,0.42,100,False\n"
        "entigraph-16000,entigraph,16000,loglik,accuracy,0.36,0.27,0.45,100,False\n"
        "entigraph-32000,entigraph,32000,loglik,accuracy,0.36,0.27,0.45,100,True\n")
    (fit,) = fit_workflow(table, CFG)["fits"]
    assert fit["n_points"] == 3 and fit["excluded_capped_budgets"] == [32000] and "capped" in fit["note"]
    fit_path = tmp_path / "fit.json"
    fit_path.write_text(json.dumps({"fits": [fit]}))
    drawn = figures.plot_scaling(table, fit_path, CFG, [tmp_path / "s.png"])
    assert drawn["series"] == [{"method": "entigraph", "mode": "loglik", "points": 4, "capped": 1}]
    assert drawn["levels"] == ["base", "api-gpt-4o-mini"]
