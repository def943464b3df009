"""The whole DAG on the smallest config (issue 6 acceptance): raw articles -> synthesis with the real offline
generator -> corpora -> CPT of a tiny model at two budgets + Raw -> closed-book QA -> table -> fit -> figures, run
by Snakemake from a clone of the repository into an empty project folder: the session's shared run
(tests/conftest.py tiny_dag). Then single-target regeneration of the plot (a dry run) and the report."""

from __future__ import annotations

import csv
import json
import pytest

from workflow_scripts import layout

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_run(tiny_dag):
    """The session's finished tiny DAG (tests/conftest.py tiny_dag: the real offline generator, a tiny random
    Llama trained at budgets 16 and 32 and Raw, three questions), run from a clone into an empty project folder."""
    return tiny_dag.project


def test_dag_produces_the_figure_and_the_table(tiny_run):
    work = tiny_run
    png = work / "results/figures/scaling_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (work / "results/figures/scaling_curve.pdf").stat().st_size > 1_000
    assert (work / "results/figures/diversity.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(work / layout.QA_TABLE)))
    assert {r["model"] for r in rows} == {"base", "raw-all", "entigraph-16", "entigraph-32"}
    head = list(csv.DictReader(open(work / layout.QA_HEADLINE)))
    assert sorted(r["model"] for r in head) == sorted({r["model"] for r in rows})  # one per model (one mode)
    assert all(r["n"] == "3" and 0.0 <= float(r["value"]) <= 1.0 for r in head)
    accuracies = [r for r in rows if r["metric"] == "accuracy" and r["value"]]
    assert accuracies and all(0.0 <= float(r["value"]) <= 1.0 for r in accuracies)
    fit = json.loads((work / "results/figures/scaling_fit.json").read_text())
    assert fit["fits"], fit
    # Budgets are exact, nested prefixes of one shuffled corpus.
    s32 = json.loads((work / "results/models/entigraph/32/train_summary.json").read_text())
    s16 = json.loads((work / "results/models/entigraph/16/train_summary.json").read_text())
    assert s16["budget_tokens"] == 16 and not s16["budget_capped"] and s16["padding_tokens"] == 0
    # The tiny generator may write fewer than 32 tokens: the budget is then capped (allowed by config.yaml).
    assert s32["budget_tokens"] == min(32, s32["corpus_total_tokens"])
    assert s32["budget_capped"] == (s32["corpus_total_tokens"] < 32)
    report = json.loads((work / "results/synth/entigraph/report.json").read_text())
    assert report["records"] > 0 and report["tokens"] > 32


def test_single_plot_regenerates_without_retraining(tiny_dag):
    r = tiny_dag.snakemake("--cores", "1", "--configfile", "tiny.yaml", "--force",
                           "results/figures/scaling_curve.png", "-n", "--quiet", "rules")
    assert r.returncode == 0, r.stderr[-2000:]
    planned = r.stdout
    assert "plot_scaling" in planned
    for rule in ("cpt", "synthesize", "eval_qa", "build_corpus"):
        assert rule not in planned, planned


def test_report_builds(tiny_dag):
    # Writes results/report.html only: the shared run's results stay as they were (tests/conftest.py tiny_dag).
    work = tiny_dag.project
    r = tiny_dag.snakemake("--cores", "1", "--configfile", "tiny.yaml", "--report", "results/report.html")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    html = (work / "results/report.html").read_text(errors="replace")
    assert len(html) > 50_000
    for caption_word in ("scaling_curve.png", "qa_accuracy.csv"):
        assert caption_word in html
