#!/usr/bin/env bash
# One-shot GPU check (issues 11, 18): the project's training loop and log-likelihood evaluation on one GPU, then
# FSDP2 in bf16 over NCCL under torchrun (world size 1, FSDP forced on) with a distributed-checkpoint save and
# resume, and the peak memory against workflow_scripts.memory's estimate; offline.
#
#     bash scripts/gpu_check.sh [--output gpu_check.json] [--steps N] [--no-fsdp]   # on an H100/H200: 3-5 minutes
#     bash scripts/gpu_check.sh --dry-run                                  # CPU (gloo, fp32), tiny model
#
# Needs only Python with torch, transformers and accelerate (no vLLM, Snakemake, jsonschema, network or model
# download); PYTHON selects the interpreter (default: .venv/bin/python if present, else python3). Stops after
# 8 minutes whatever happens. What it measures: workflow_scripts/gpu_check.py; results: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PYTHON" -m workflow_scripts.gpu_check "$@"
