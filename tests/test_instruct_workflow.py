"""Issue 15: the instruction stages in the DAG: off in the demo, planned by the CPU overlay and the paper overlay."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
INSTRUCT_RULES = ("instruct_corpus", "instruct_tune", "summarize", "judge_summaries", "claims_table",
                  "instruct_examples")


def planned(*overlays: str) -> dict[str, int]:
    args = [sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "1", "--quiet", "rules"]
    if overlays:
        args += ["--configfile", *overlays]  # one flag: a repeated --configfile keeps only the last list
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", r.stdout, re.M)}


def test_demo_does_not_plan_the_instruction_stages():
    jobs = planned()
    assert not set(INSTRUCT_RULES) & set(jobs), jobs


@pytest.mark.parametrize("overlay,models", [("experiments/cpu-instruct.yaml", 2), ("experiments/paper.yaml", 6)])
def test_overlays_plan_the_instruction_stages(overlay, models):
    jobs = planned(overlay)
    assert jobs["instruct_corpus"] == 1 and jobs["claims_table"] == 1
    for rule in ("instruct_tune", "summarize", "judge_summaries", "instruct_examples"):
        assert jobs[rule] == models, (rule, jobs)


def test_human_summaries_add_their_judging_to_the_plan(tmp_path):
    human = tmp_path / "human.jsonl"
    human.write_text('{"article_uid": "30029", "summary": "A prisoner outwits his captors."}\n')
    over = tmp_path / "human.yaml"
    over.write_text(f"instruct: {{judge: {{human_summaries: {human}}}}}\n")
    jobs = planned("experiments/cpu-instruct.yaml", str(over))
    assert jobs["judge_human_summaries"] == 1 and jobs["claims_table"] == 1
