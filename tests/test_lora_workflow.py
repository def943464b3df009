"""The demo's LoRA comparison (cpt.compare_adapter, experiments/cpu-lora.yaml): `snakemake -n` plans a LoRA twin of
every method x budget model, trained by the cpt rule's command with a lora adapter, evaluated on QA and aggregated
with the full-CPT models; the demo itself plans none."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def dry_run(*configfiles: str) -> str:
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "1",
                        "--configfile", *configfiles], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def job_counts(out: str) -> dict[str, int]:
    table = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal", out, re.S)
    assert table, out[-3000:]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)$", table.group(1), re.M)}


def test_the_cpu_lora_overlay_plans_the_twins_and_the_demo_does_not():
    demo = dry_run("config.yaml")
    assert "cpt_lora" not in job_counts(demo) and "-lora" not in demo
    out = dry_run("config.yaml", "experiments/cpu-lora.yaml")
    jobs = job_counts(out)
    assert jobs["cpt_lora"] == 6 and jobs["cpt"] == 7  # 2 methods x 3 budgets, + Raw CPT without a twin
    assert jobs["eval_qa"] == job_counts(demo)["eval_qa"] + 6
    commands = [line.strip() for line in out.splitlines() if "-m workflow_scripts.train" in line]
    twins = [c for c in commands if "--output results/models/entigraph/128-lora " in c]
    assert len(twins) == 1 and "--workdir results/checkpoints/entigraph/128-lora " in twins[0]
    args = shlex.split(twins[0][twins[0].index("--config-json"):])
    assert json.loads(args[1])["cpt"]["adapter"]["kind"] == "lora"
    full = [c for c in commands if "--output results/models/entigraph/128 " in c]
    assert json.loads(shlex.split(full[0][full[0].index("--config-json"):])[1])["cpt"]["adapter"]["kind"] == "none"
    # the aggregate table reads every twin's QA summary
    aggregate = out[out.index("rule aggregate:"):]
    assert "results/eval/qa/entigraph-128-lora.json" in aggregate.split("output:")[0]
