"""Deployment (issue 20): the workflow runs from a copy of the repository into a user's own empty project folder,
both as `snakemake -s <copy>/Snakefile --directory <project>` and as a Snakemake `module` of the user's own
Snakefile with the user's own config. No PYTHONPATH, no symlinks: the stage code, the config schema, the prompts
and the shipped resources/ are found beside the Snakefile, and only results/ lands in the project folder.

The first form is the session's shared tiny run (tests/conftest.py tiny_dag, also tests/test_end_to_end.py's and
tests/test_job_keys.py's finished DAG). The module runs its own smallest DAG that draws the scaling figure: one
article, EntiGraph synthesis and CPT at two budgets and Raw with a tiny random Llama (its entity list falls back
to the heuristic extractor), two questions."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_snakemake
from workflow_scripts.config import deep_merge

pytestmark = pytest.mark.e2e

FIGURE = "results/figures/scaling_curve.png"
MODELS = {"base", "raw-all", "entigraph-16", "entigraph-32"}


def tiny_overlay(tiny_model_dir: Path) -> dict:
    return {
        "run_name": "tiny-deploy",
        "data": {"max_articles": 1, "max_article_chars": 600},
        "models": {"generator": {"source": "path", "name": str(tiny_model_dir)},
                   "base": {"source": "path", "name": str(tiny_model_dir)}},
        "synthesis": {"methods": ["entigraph"], "sampling": {"max_new_tokens": 16},
                      "entigraph": {"max_entities": 3, "max_pairs": 2, "max_triples": 1,
                                    "extraction_max_new_tokens": 8}},
        "cpt": {"budgets": [16, 32], "block_size": 8, "global_batch": 2, "micro_batch": 2, "raw_epochs": 1,
                "replay": {"rate": 0.0}, "probe": {"max_tokens": 16}},
        "evaluation": {"max_questions": 2},
        "figures": {"formats": ["png"]},
    }


@pytest.fixture(scope="module")
def clone(workflow_clone) -> Path:
    """A copy of the repository as `git clone` of this working tree would give it (tests/conftest.py)."""
    return workflow_clone


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it: from the project folder, without PYTHONPATH pointing at the workflow."""
    return run_snakemake(project, None, "--cores", "2", *args)


def assert_figure_and_table(project: Path, clone: Path) -> None:
    png = project / FIGURE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = list(csv.DictReader(open(project / "results/tables/qa_accuracy.csv", encoding="utf-8")))
    assert {r["model"] for r in rows} == MODELS  # the user's budgets (16, 32), not config.yaml's
    # Results land in the project only; the copy of the workflow is left as it was.
    assert [p.name for p in (clone / "results").iterdir()] == [".gitkeep"]


def test_runs_from_another_folder(tiny_dag, clone):
    """The session's shared run (tests/conftest.py tiny_dag) is this deployment: `snakemake -s <clone>/Snakefile
    --directory <project> --configfile tiny.yaml` in an empty project folder, the workflow's config.yaml (beside
    its Snakefile) first, then the user's overlay, as in the repository. Its default target draws the figure."""
    assert tiny_dag.workflow == clone
    project = tiny_dag.project
    assert_figure_and_table(project, clone)
    assert sorted(p.name for p in project.iterdir()) == [".snakemake", "results", "tiny.yaml"]


def test_runs_as_a_module_with_its_own_config(clone, tmp_path, tiny_model_dir):
    project = tmp_path / "my-project"
    (project / "config").mkdir(parents=True)
    # A module's config replaces the workflow's config.yaml: the user starts from a copy of it. Its relative
    # resources/ paths name files the project lacks, so they resolve to the workflow's own copies.
    cfg = deep_merge(yaml.safe_load((clone / "config.yaml").read_text(encoding="utf-8")),
                     tiny_overlay(tiny_model_dir))
    cfg["run_name"] = "my-module-run"
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (project / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n\n'
        "module entigraph:\n"
        f"    snakefile:\n        {str(clone / 'Snakefile')!r}\n"
        "    config:\n        config\n\n\n"
        "use rule * from entigraph as entigraph_*\n")
    r = snakemake(project, FIGURE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_figure_and_table(project, clone)
