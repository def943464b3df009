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


@pytest.mark.unit
@pytest.mark.parametrize("mid,parsed", [("base", ("base", None)), ("raw-all", ("raw", None)),
                                        ("entigraph-4096", ("entigraph", 4096)), ("my-method-16", ("my-method", 16)),
                                        ("api-gpt-4o", ("api", None))])
def test_model_ids_round_trip(mid, parsed):
    assert layout.parse_model_id(mid) == parsed
    method, budget = parsed
    if method not in ("base", "api"):
        assert layout.model_id(method, "all" if budget is None else budget) == mid
        assert layout.model_dir(mid, {}) == f"results/models/{method}/{'all' if budget is None else budget}"


@pytest.mark.unit
def test_bad_model_id_is_one_clear_error():
    with pytest.raises(InputError, match="budget 'x' is not a token count"):
        layout.parse_model_id("entigraph-x")


@pytest.mark.unit
def test_model_lists_of_the_demo():
    cfg = load_config()
    assert layout.cpt_models(cfg)[0] == ("raw", "all")
    assert layout.eval_models(cfg) == ["base", "raw-all"] + [f"{m}-{b}" for m in ("entigraph", "rephrase")
                                                             for b in (128, 256, 384)]
    assert layout.rag_models(cfg) == ["base", "entigraph-384"]
    assert layout.model_dir("base", cfg) == "results/hf_models/smollm2-135m-instruct"


@pytest.mark.e2e
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


@pytest.mark.unit
def test_derived_and_instruction_targets():
    """The filter and import reports, and the instruction stages' table, figure and examples (when enabled), are
    final targets of their stages; instruct model ids name their folders."""
    judge = load_config([ROOT / "config.yaml", ROOT / "experiments" / "cpu-judge.yaml"])
    assert layout.stage_targets(judge, "filters") == ["results/filtered/entigraph_judge/report.json"]
    assert layout.derived_records("imported", "released") == "results/imported/released/records.jsonl"
    assert layout.stage_targets(load_config(), "instruct") == []
    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "cpu-instruct.yaml"])
    assert layout.instruct_models(cfg) == ["base-instruct", "entigraph-128-instruct"]
    assert layout.stage_targets(cfg, "instruct") == [
        "results/tables/summary_claims.csv", "results/figures/summary_claims.png",
        "results/instruct/examples/base-instruct.html", "results/instruct/examples/entigraph-128-instruct.html"]
    assert layout.model_dir("entigraph-128-instruct", cfg) == "results/models/entigraph-128/instruct"
    assert layout.instruct_models(load_config())[:2] == ["base-instruct", "raw-all-instruct"]
    # each config asks `rule all` for its own stages' outputs only: the instruction targets under the instruct
    # overlay, the judge variant's report under the judge overlay, neither under the other
    instruct_targets = set(layout.stage_targets(cfg, "instruct"))
    filter_targets = set(layout.stage_targets(judge, "filters"))
    assert instruct_targets <= set(layout.final_targets(cfg)) and not instruct_targets & set(layout.final_targets(judge))
    assert filter_targets <= set(layout.final_targets(judge)) and not filter_targets & set(layout.final_targets(cfg))
