"""Scoring a released checkpoint (issue 21, item 5): evaluation.external_models under Snakemake.

The real common.smk + evaluation.smk + figures.smk run on a tiny prepared tree: the base model is the tiny random
Llama, and the offline SmolLM2-135M-Instruct plays a released checkpoint under another id (ext-released_smollm,
source: path). The external model is scored like the base model, listed in the table as kind `external` with its
label, and drawn in the scaling figure as a labelled external level.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_scripts import layout
from workflow_scripts.config import ROOT, load_config, validate_config

pytestmark = pytest.mark.e2e
pytest.importorskip("snakemake")

SNAKEFILE = """\
configfile: "config.yaml"
report: "report/workflow.rst"
wildcard_constraints:
    method="[a-z0-9_]+",
    budget=r"\\d+|all|r\\d+\\.\\d+",
    model="[A-Za-z0-9_.-]+",
include: "rules/common.smk"
include: "rules/evaluation.smk"
include: "rules/figures.smk"
"""
LABEL = "SmolLM2-135M (offline, as a released model)"


def test_paper_overlay_lists_the_authors_model():
    paper = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    ext = paper["evaluation"]["external_models"]
    assert ext[0]["path_or_id"] == "zitongyang/llama-3-8b-entigraph-quality" and ext[0]["source"] == "hf"
    assert "ext-authors_entigraph" in layout.eval_models(paper)
    assert layout.model_dir("ext-authors_entigraph", paper) == "zitongyang/llama-3-8b-entigraph-quality"
    assert "56.22" in (ROOT / "experiments" / "paper.yaml").read_text()  # the check before spending
    assert not layout.is_cpt_model("ext-authors_entigraph")
    assert layout.parse_model_id("ext-authors_entigraph") == ("external", None)
    with pytest.raises(Exception, match="no evaluation.external_models entry"):
        layout.model_dir("ext-nobody", validate_config({}))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, smollm_dir) -> Path:
    from test_rag import ARTICLES, QUESTIONS

    wd = tmp_path_factory.mktemp("external-models")
    (wd / "rules").mkdir()
    for name in ("common.smk", "evaluation.smk", "figures.smk"):
        shutil.copy(ROOT / "rules" / name, wd / "rules" / name)
    for folder in ("schemas", "report", "envs"):
        shutil.copytree(ROOT / folder, wd / folder)
    (wd / "workflow_scripts").symlink_to(ROOT / "workflow_scripts")
    (wd / "Snakefile").write_text(SNAKEFILE)
    data = wd / "results" / "data"
    data.mkdir(parents=True)
    (data / "articles.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    (data / "questions.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in q.items() if k != "needle"}) + "\n" for q in QUESTIONS))
    raw = wd / "results" / "models" / "raw" / "all"  # Raw CPT is always evaluated: a stand-in model folder
    shutil.copytree(tiny_model_dir, raw)
    (raw / "train_summary.json").write_text(json.dumps({"budget_tokens": 900, "corpus_total_tokens": 900}))
    (wd / "config.yaml").write_text(json.dumps({
        "run_name": "external-test",
        "models": {"base": {"source": "path", "name": str(tiny_model_dir)},
                   "generator": {"source": "path", "name": str(tiny_model_dir)}},
        "synthesis": {"methods": []},
        "evaluation": {"modes": ["loglik"], "device": "cpu", "threads": 1, "ci": {"bootstrap": 0},
                       "external_models": [{"name": "released_smollm", "source": "path",
                                            "path_or_id": str(smollm_dir), "label": LABEL}]},
        "figures": {"dpi": 50, "formats": ["png"], "fit": {"n_starts": 2}},
    }))
    return wd


def test_external_model_is_scored_listed_and_drawn(workdir):
    target = "results/figures/scaling_curve.png"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", target]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "results/eval/qa/ext-released_smollm.json").read_text())
    assert summary["external"] == {"label": LABEL, "source": "path", "path_or_id": summary["model_path"]}
    assert summary["n"] == 3 and summary["mode"] == "loglik"
    rows = {r["model"]: r for r in csv.DictReader((workdir / layout.QA_HEADLINE).open())}
    assert set(rows) == {"base", "raw-all", "ext-released_smollm"}
    ext = rows["ext-released_smollm"]
    assert (ext["kind"], ext["method"], ext["label"], ext["budget_tokens"]) == ("external", "external", LABEL, "")
    assert rows["base"]["kind"] == "base" and rows["raw-all"]["kind"] == "cpt"
    log = (workdir / "results/logs/figures/plot_scaling.log").read_text()
    drawn = json.loads(log.strip().splitlines()[-1])["drawn"]
    assert "ext-released_smollm" in drawn["levels"]
    assert (workdir / target).stat().st_size > 0
