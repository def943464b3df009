"""Shared fixtures: the real offline model (SmolLM2-135M-Instruct, converted once and cached) and a tiny random
model with the same tokenizer for fast tests. Everything runs offline. Also the tier check: every test carries
exactly one of the tiers declared in pyproject.toml's markers (unit, engine, slurm, e2e)."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest

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
