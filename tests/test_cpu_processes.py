"""Multi-process training on a CPU through the workflow (issue 19): with cpt.resources.cpu_processes (and
instruct.resources.cpu_processes) above 1 and no GPU, the CPT and instruction-tuning rules start their module with
torchrun, one process per CPU slot, FSDP2 over gloo; the scheduler is asked for processes x threads CPUs.

The engine test runs Snakemake on the tiny random Llama (2 layers, SmolLM2's tokenizer): one Raw CPT job and one
instruction-tuning job of the base model, each in 2 processes, and reads the world size and FSDP flag the trainer
recorded. The unit tests check the launcher and thread arithmetic (workflow_scripts/layout.py, rules/common.smk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_scripts import layout

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_processes_come_from_gpus_else_cpu_processes():
    assert layout.training_processes({"gpu": 8, "cpu_processes": 2}) == 8  # GPUs decide on a GPU job
    assert layout.training_processes({"gpu": 1, "cpu_processes": 4}) == 1
    assert layout.training_processes({"gpu": 0, "cpu_processes": 2}) == 2
    assert layout.training_processes({"gpu": 0}) == 1
    assert layout.training_launcher(1) == "python"
    assert layout.training_launcher(2) == "python -m torch.distributed.run --standalone --nproc_per_node 2"


def overlay(model: Path, processes: int) -> dict:
    return {
        "run_name": "cpu-processes",
        "data": {"max_articles": 1, "max_article_chars": 600},
        "models": {"base": {"source": "path", "name": str(model)}},
        "synthesis": {"methods": []},
        "cpt": {"block_size": 16, "global_batch": 4, "micro_batch": 1, "raw_epochs": 1, "threads": 1,
                "checkpoint_every": 0, "log_every": 1, "probe": {"max_tokens": 32},
                "resources": {"gpu": 0, "cpu_processes": processes}},
        "instruct": {"enabled": True, "models": ["base"], "data": {"source": "gutenberg", "max_examples": 4},
                     "train": {"block_size": 32, "global_batch": 2, "micro_batch": 1},
                     "resources": {"gpu": 0, "cpu_processes": processes}},
    }


def snakemake(work: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
                           "--configfile", str(work / "overlay.yaml"), *args], cwd=work, capture_output=True,
                          text=True, timeout=timeout)


TARGETS = ("results/models/raw/all", "results/models/base/instruct")


@pytest.mark.e2e
def test_the_rules_ask_for_processes_times_threads_cpus_and_launch_torchrun(tmp_path, tiny_model_dir):
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay(tiny_model_dir, 2)))
    r = snakemake(tmp_path, "-n", "-p", "--cores", "4", "--", *TARGETS, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    launch = "python -m torch.distributed.run --standalone --nproc_per_node 2 -m workflow_scripts."
    assert f"{launch}train " in out and f"{launch}instruct tune " in out, out[-3000:]
    assert "--init-model" in out and "OMP_NUM_THREADS=1 " in out
    # threads (sbatch --cpus-per-task under profiles/slurm): 2 processes x cpt.threads 1
    for rule in ("cpt", "instruct_tune"):
        block = out.split(f"rule {rule}:")[1].split("\n\n")[0]
        assert "threads: 2" in block, block
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay(tiny_model_dir, 1)))
    r = snakemake(tmp_path, "-n", "-p", "--cores", "4", "--", *TARGETS, timeout=300)
    assert r.returncode == 0 and "torch.distributed.run" not in r.stdout + r.stderr


@pytest.mark.e2e
def test_cpt_and_instruction_tuning_run_in_two_cpu_processes_through_their_rules(tmp_path, tiny_model_dir):
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay(tiny_model_dir, 2)))
    r = snakemake(tmp_path, "--cores", "2", "--", *TARGETS)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in (tmp_path / "results" / "logs").rglob("*.log"))
    assert r.returncode == 0, r.stderr[-3000:] + logs
    for target in TARGETS:
        summary = json.loads((tmp_path / target / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["fsdp"] is True, (target, summary)
        assert summary["device"] == "cpu" and summary["steps"] >= 1 and summary["final_loss"] > 0
        assert (tmp_path / target / "model.safetensors").exists()
