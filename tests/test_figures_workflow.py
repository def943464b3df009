"""rules/figures.smk under Snakemake on a tiny prepared results tree: the figure rules run from existing tables
and synthesis reports, a single figure rebuilds alone, restyling reruns only the plots, and
`snakemake --report` collects the figures, the fit and the synthesis summary with their captions.

The workflow here is the real common.smk + figures.smk (copied) under a minimal Snakefile, so that the test does
not depend on the other stages' rules; the upstream files are written as fixtures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("snakemake")

SNAKEFILE = """\
configfile: "config.yaml"
report: "report/workflow.rst"
include: "rules/common.smk"
include: "rules/figures.smk"
rule all:
    input:
        all_targets(),
    default_target: True
"""

TABLE = """\
model,method,budget_tokens,mode,split,convention,metric,value,ci_low,ci_high,n,headline
base,base,,loglik,all,wrong,accuracy,0.28,0.2,0.37,100,True
base,base,,loglik,all,,attempted,1.0,,,100,False
raw-all,raw,,loglik,all,wrong,accuracy,0.3,0.22,0.39,100,True
entigraph-4000,entigraph,4000,loglik,all,wrong,accuracy,0.3,0.22,0.39,100,True
entigraph-8000,entigraph,8000,loglik,all,wrong,accuracy,0.33,0.25,0.42,100,True
entigraph-16000,entigraph,16000,loglik,all,wrong,accuracy,0.36,0.27,0.45,100,True
rephrase-4000,rephrase,4000,loglik,all,wrong,accuracy,0.29,0.21,0.38,100,True
rephrase-8000,rephrase,8000,loglik,all,wrong,accuracy,0.3,0.22,0.39,100,True
rephrase-16000,rephrase,16000,loglik,all,wrong,accuracy,0.31,0.23,0.4,100,True
"""


def snakemake(workdir: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def planned_jobs(output: str) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    lines = output.split("Job stats:", 1)[1].splitlines()[3:]
    jobs = set()
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs.add(parts[0])
    return jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("figures-workflow")
    (wd / "rules").mkdir()
    for name in ("common.smk", "figures.smk"):
        shutil.copy(ROOT / "rules" / name, wd / "rules" / name)
    for folder in ("schemas", "report", "envs"):
        shutil.copytree(ROOT / folder, wd / folder)
    (wd / "workflow_scripts").symlink_to(ROOT / "workflow_scripts")
    (wd / "Snakefile").write_text(SNAKEFILE)
    (wd / "config.yaml").write_text(
        "run_name: wf-test\n"
        "models:\n  base: {source: hf, name: tiny/model}\n  generator: {source: hf, name: tiny/model}\n"
        "synthesis: {methods: [entigraph, rephrase]}\ncpt: {budgets: [4000, 8000, 16000]}\n"
        "figures: {dpi: 50, fit: {n_starts: 4}}\n")
    (wd / "results" / "tables").mkdir(parents=True)
    (wd / "results" / "tables" / "qa_accuracy.csv").write_text(TABLE)
    for m, tokens in (("entigraph", 16000), ("rephrase", 9000)):
        d = wd / "results" / "synth" / m
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"records": 10, "tokens": tokens, "distinct_1": .4, "distinct_2": .7,
                                                   "distinct_3": .8, "compression_ratio": 2.5,
                                                   "source_ngram_overlap": .5, "entity_coverage": .6}))
        (d / "ledger.json").write_text(json.dumps({"requests": 10, "prompt_tokens": 5000, "completion_tokens": tokens,
                                                   "cost_usd": 0.0, "wall_seconds": 12.5}))
    snakemake(wd)
    return wd


def test_all_figure_outputs_are_built(workdir):
    figs = workdir / "results" / "figures"
    for name in ("scaling_curve.png", "scaling_curve.pdf", "diversity.png", "diversity.pdf", "scaling_fit.json"):
        assert (figs / name).stat().st_size > 500, name
    fit = json.loads((figs / "scaling_fit.json").read_text())
    assert [f["method"] for f in fit["fits"]] == ["entigraph", "rephrase"] and fit["fits"][0]["n_terms"] == 1
    assert (workdir / "results" / "tables" / "synthesis_summary.html").exists()
    assert (workdir / "results" / "logs" / "figures" / "plot_scaling.log").exists()


def test_one_figure_rebuilds_alone(workdir):
    out = snakemake(workdir, "-n", "--force", "results/figures/scaling_curve.png")
    assert planned_jobs(out) == {"plot_scaling"}


def test_restyling_reruns_only_the_plots(workdir):
    (workdir / "restyle.yaml").write_text("figures: {dpi: 50, style: ggplot, fit: {n_starts: 4}}\n")
    out = snakemake(workdir, "-n", "--configfile", "config.yaml", "restyle.yaml")
    assert planned_jobs(out) == {"plot_scaling", "plot_diversity", "all"}
    (workdir / "refit.yaml").write_text("figures: {dpi: 50, fit: {n_starts: 4, max_terms: 0}}\n")
    out = snakemake(workdir, "-n", "--configfile", "config.yaml", "refit.yaml")
    assert planned_jobs(out) == {"fit_scaling", "plot_scaling", "all"}


def test_report_contains_figures_fit_and_synthesis_table(workdir):
    snakemake(workdir, "--report", "results/report.html")
    page = (workdir / "results" / "report.html").read_text(encoding="utf-8", errors="replace")
    for item in ("scaling_curve.png", "diversity.png", "scaling_fit.json", "synthesis_summary.html"):
        assert item in page, item
    # Captions (report/*.rst) are rendered into the report.
    assert "Raw CPT (continued pretraining" in page and "profile-likelihood interval" in page
    assert "synthesis ledger" in page
