"""The workflow as a whole (issue 2): lint, dry runs of the demo and the paper configs, and every stage module's
command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
STAGE_MODULES = sorted(
    p.stem for p in (ROOT / "workflow_scripts").glob("*.py")
    if p.stem not in {"__init__", "io_utils", "config", "paper_reference"} and "def main(" in p.read_text()
)


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.e2e
def test_lint_is_clean():
    r = run(SNAKEMAKE + ["--lint", "--cores", "1"])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.unit
def test_rules_are_formatted():
    """snakefmt 2.1.0 with pyproject.toml's [tool.snakefmt]; `.venv/bin/snakefmt Snakefile rules/` fixes it."""
    r = run([str(Path(sys.executable).parent / "snakefmt"), "--check", "Snakefile", "rules/"])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.unit
def test_ci_runs_the_readme_test_command_with_lint_and_format_first():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("bash scripts/bootstrap.sh --vllm && "))
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()[-1] == command
    assert command.endswith("bash scripts/check.sh")
    steps = [line for line in (ROOT / "scripts" / "check.sh").read_text(encoding="utf-8").splitlines()
             if line.startswith('"$BIN/')]
    assert [s.split()[:2] for s in steps[:2]] == [['"$BIN/snakemake"', "--lint"], ['"$BIN/snakefmt"', "--check"]]
    tiers = [s.split(" -m ")[2].split(' "$@"')[0] for s in steps[2:]]
    # Each run names its tier and prints its slowest tests, so a CI log shows where the time goes.
    assert tiers == ["unit --durations=25", '"not unit" --durations=25'], steps


@pytest.mark.e2e
@pytest.mark.parametrize("overlay", [None, "experiments/paper.yaml", "experiments/single-gpu.yaml",
                                     "experiments/cpu-judge.yaml", "experiments/cpu-curriculum.yaml"])
def test_dry_run_plans_the_dag(overlay, tmp_path):
    args = SNAKEMAKE + ["-n", "--forceall", "--cores", "1", "--quiet", "rules"]
    if overlay:
        args += ["--configfile", overlay]
    r = run(args)
    assert r.returncode == 0, r.stdout + r.stderr
    # The checkpoint defers per-article jobs, but every stage's rule must already be planned.
    for rule in ("prepare_articles", "all"):
        assert rule in r.stdout, r.stdout


@pytest.mark.unit
def test_every_module_a_rule_runs_is_a_stage_module_with_a_command_line():
    """Each `-m workflow_scripts.X` in the Snakefile and rules/ names a module of the package with a main(), so the
    --help test below covers every command a rule runs."""
    texts = [(ROOT / "Snakefile").read_text()] + [p.read_text() for p in sorted((ROOT / "rules").glob("*.smk"))]
    run_by_rules = set(re.findall(r"-m workflow_scripts\.(\w+)", "\n".join(texts)))
    assert {"quality", "synthesis", "corpus", "train", "qa_eval", "aggregate", "figures"} <= run_by_rules
    assert run_by_rules - set(STAGE_MODULES) == set()


@pytest.mark.e2e
@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_command_line_help(module):
    r = run([sys.executable, "-m", f"workflow_scripts.{module}", "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
