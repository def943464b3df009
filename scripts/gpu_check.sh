#!/usr/bin/env bash
# One-shot GPU check (issue 11): the project's training loop and log-likelihood evaluation on one GPU, offline.
#
#     bash scripts/gpu_check.sh [--output gpu_check.json] [--steps N]   # on an H100/H200: about 2-4 minutes
#     bash scripts/gpu_check.sh --dry-run                                  # CPU, tiny model: the code path anywhere
#
# Needs only Python with torch, transformers and accelerate (no vLLM, Snakemake, jsonschema, network or model
# download); PYTHON selects the interpreter (default: .venv/bin/python if present, else python3). Stops after
# 8 minutes whatever happens. What it measures: workflow_scripts/gpu_check.py; results: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PYTHON" -m workflow_scripts.gpu_check "$@"
