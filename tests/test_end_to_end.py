"""The whole DAG on the smallest config (issue 6 acceptance): raw articles -> synthesis with the real offline
generator -> corpora -> CPT of a tiny model at two budgets + Raw -> closed-book QA -> table -> fit -> figures, run
by Snakemake in a scratch working directory. Then single-target regeneration of the plot and the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_scripts import layout

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # No PYTHONPATH, no links to the repository: the workflow finds its code and files itself (tests/test_deploy.py)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm_dir, tiny_model_dir):
    work = tmp_path_factory.mktemp("e2e")
    overlay = {
        "run_name": "tiny-e2e",
        "data": {"max_articles": 1, "max_article_chars": 1200},
        # The real offline model writes the synthetic texts; a tiny random Llama with its tokenizer is trained
        # and evaluated, so the test exercises every stage in about a minute.
        "models": {"generator": {"source": "path", "name": str(smollm_dir)},
                   "base": {"source": "path", "name": str(tiny_model_dir)}},
        "synthesis": {"methods": ["entigraph"], "sampling": {"max_new_tokens": 24},
                      "entigraph": {"max_entities": 3, "max_pairs": 3, "max_triples": 1,
                                    "extraction_max_new_tokens": 32}},
        "cpt": {"budgets": [16, 32], "block_size": 8, "global_batch": 2, "micro_batch": 2, "raw_epochs": 1,
                "probe": {"max_tokens": 32}},
        "evaluation": {"max_questions": 3},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    r = snakemake(work, "--cores", "2", "--configfile", "tiny.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


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


def test_single_plot_regenerates_without_retraining(tiny_run):
    work = tiny_run
    r = snakemake(work, "--cores", "1", "--configfile", "tiny.yaml", "--force",
                  "results/figures/scaling_curve.png", "-n", "--quiet", "rules")
    assert r.returncode == 0, r.stderr[-2000:]
    planned = r.stdout
    assert "plot_scaling" in planned
    for rule in ("cpt", "synthesize", "eval_qa", "build_corpus"):
        assert rule not in planned, planned


def test_report_builds(tiny_run):
    work = tiny_run
    r = snakemake(work, "--cores", "1", "--configfile", "tiny.yaml", "--report",
                  "results/report.html")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    html = (work / "results/report.html").read_text(errors="replace")
    assert len(html) > 50_000
    for caption_word in ("scaling_curve.png", "qa_accuracy.csv"):
        assert caption_word in html
