"""Shared fixtures: the real offline model (SmolLM2-135M-Instruct, converted once and cached) and a tiny random
model with the same tokenizer for fast tests. Everything runs offline. Also the tier check: every test carries
exactly one of the tiers declared in pyproject.toml's markers (unit, engine, slurm, e2e)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "test-models"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiers(config: pytest.Config) -> list[str]:
    """The tier names: the markers declared in pyproject.toml (the one list of them)."""
    with open(config.inipath, "rb") as f:
        declared = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    return [line.split(":", 1)[0].strip() for line in declared]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything, so an unmarked test fails every run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    names = tiers(config)
    wrong: dict[str, str] = {}  # test (parameters left off) -> what it carries
    for item in items:
        found = [m.name for m in item.iter_markers() if m.name in names]
        if len(found) != 1:
            wrong[item.nodeid.split("[")[0]] = " and ".join(found) or "no tier"
    if wrong:
        listed = "; ".join(f"{test} has {found}" for test, found in wrong.items())
        raise pytest.UsageError(f"each test needs exactly one tier marker ({', '.join(names)}): {listed}; "
                                "add `pytestmark = pytest.mark.<tier>` to the file or mark the test")


def _convert_once() -> Path:
    from workflow_scripts.models import convert_packaged

    out = CACHE / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        convert_packaged("smollm2-135m-instruct", out)
    return out


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real offline model as a Hugging Face folder (converted from the packaged GGUF on first use)."""
    return _convert_once()


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: loads and runs in milliseconds."""
    out = CACHE / "tiny-llama"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(smollm_dir)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        tmp = out.with_name("tiny-llama.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def sample_zip() -> Path:
    return ROOT / "resources" / "quality" / "QuALITY.v1.0.1.zip"


# ------------------------------------------------------------------------------------ the shared tiny DAG
@pytest.fixture(scope="session")
def workflow_clone(tmp_path_factory) -> Path:
    """A copy of the repository as `git clone` of this working tree would give it: tracked and untracked files
    that .gitignore does not exclude (so no .venv, no .cache, nothing in results/ but its .gitkeep)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    dest = tmp_path_factory.mktemp("deploy") / "entigraph-workflow"
    for name in filter(None, r.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():  # a tracked file deleted in the working tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert (dest / "Snakefile").is_file() and [p.name for p in (dest / "results").iterdir()] == [".gitkeep"]
    return dest


def run_snakemake(project: Path, snakefile: Path | None, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it: from the project folder, without PYTHONPATH pointing at the workflow (the
    workflow finds its code and files itself, tests/test_deploy.py); `snakefile` None: the project's own."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = ["-s", str(snakefile), "--directory", str(project)] if snakefile else []
    cmd = [sys.executable, "-m", "snakemake", *where, *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_dag_overlay(generator: Path, base: Path) -> dict:
    """The smallest config whose DAG has every default stage: one article, EntiGraph synthesis by `generator`, CPT
    of `base` at two budgets (16, 32) and Raw with replay (config.yaml's rate), three questions, the scaling and
    diversity figures in PNG and PDF, and a dedup-filtered EntiGraph variant (MinHash, no model) whose report only
    is built (no CPT model of its own), drawn in the diversity figure."""
    return {
        "run_name": "tiny-shared",
        "data": {"max_articles": 1, "max_article_chars": 1200},
        "models": {"generator": {"source": "path", "name": str(generator)},
                   "base": {"source": "path", "name": str(base)}},
        "synthesis": {"methods": ["entigraph"], "sampling": {"max_new_tokens": 24},
                      "entigraph": {"max_entities": 3, "max_pairs": 3, "max_triples": 1,
                                    "extraction_max_new_tokens": 32}},
        "cpt": {"budgets": [16, 32], "block_size": 8, "global_batch": 2, "micro_batch": 2, "raw_epochs": 1,
                "probe": {"max_tokens": 32}, "method_budgets": {"entigraph_dedup": []}},
        "filters": {"variants": {"entigraph_dedup": {"source": "entigraph", "steps": ["dedup"]}}},
        "evaluation": {"max_questions": 3},
    }


@dataclass(frozen=True)
class TinyDag:
    """A finished tiny DAG in a user's own project folder, run from a clone of the repository."""

    project: Path  # holds only .snakemake, results/ and tiny.yaml (the config overlay)
    workflow: Path  # the clone; its results/ stays empty
    config: dict  # the overlay in tiny.yaml

    def snakemake(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """Snakemake on the finished run with its own Snakefile (another Snakefile path would be a code change)."""
        return run_snakemake(self.project, self.workflow / "Snakefile", *args, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory, workflow_clone, smollm_dir, tiny_model_dir) -> TinyDag:
    """The tiny config's whole DAG (default target: the figures, the table, the filter's report), run ONCE per
    session and shared by tests/test_end_to_end.py, tests/test_job_keys.py's finished-DAG tests and
    tests/test_deploy.py's other-folder test: the real offline model writes the synthetic texts, a tiny random
    Llama with its tokenizer is trained and evaluated. Run as `snakemake -s <clone>/Snakefile --directory
    <empty project folder>`. Tests that use it may only dry-run (`-n`) on it, write under results/ (--report) or
    write their own files outside the project folder: the folder's contents are asserted on."""
    project = tmp_path_factory.mktemp("tiny-dag") / "project"
    project.mkdir()
    overlay = tiny_dag_overlay(smollm_dir, tiny_model_dir)
    (project / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    dag = TinyDag(project, workflow_clone, overlay)
    r = dag.snakemake("--cores", "2", "--configfile", "tiny.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dag
