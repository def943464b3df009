"""The workflow's shared names (issue 13, item 3): workflow_scripts/layout.py, read by the rules and the stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workflow_scripts import layout
from workflow_scripts.config import load_config
from workflow_scripts.io_utils import InputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mid,parsed", [("base", ("base", None)), ("raw-all", ("raw", None)),
                                        ("entigraph-4096", ("entigraph", 4096)), ("my-method-16", ("my-method", 16)),
                                        ("api-gpt-4o", ("api", None))])
def test_model_ids_round_trip(mid, parsed):
    assert layout.parse_model_id(mid) == parsed
    method, budget = parsed
    if method not in ("base", "api"):
        assert layout.model_id(method, "all" if budget is None else budget) == mid
        assert layout.model_dir(mid, {}) == f"results/models/{method}/{'all' if budget is None else budget}"


def test_bad_model_id_is_one_clear_error():
    with pytest.raises(InputError, match="budget 'x' is not a token count"):
        layout.parse_model_id("entigraph-x")


def test_model_lists_of_the_demo():
    cfg = load_config()
    assert layout.cpt_models(cfg)[0] == ("raw", "all")
    assert layout.eval_models(cfg) == ["base", "raw-all"] + [f"{m}-{b}" for m in ("entigraph", "rephrase")
                                                             for b in (128, 256, 384)]
    assert layout.rag_models(cfg) == ["base", "entigraph-384"]
    assert layout.model_dir("base", cfg) == "results/hf_models/smollm2-135m-instruct"


def test_final_targets_are_what_rule_all_asks_for():
    """`snakemake -n --forceall all` plans every final target: the stage files add layout.stage_targets."""
    cfg = load_config()
    targets = layout.final_targets(cfg)
    assert "results/tables/qa_accuracy.csv" in targets and "results/models/raw/all" in targets
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "1", "--printshellcmds"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    planned_all = r.stdout.split("rule all:", 1)[1].split("\n\n", 1)[0]
    for t in targets:
        assert t in planned_all, t
