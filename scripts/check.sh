#!/usr/bin/env bash
# The project's checks in order, stopping at the first failure (the README's test command and CI, .ci/run):
#   1. snakemake --lint            the workflow's conventions (every rule has a log, no absolute paths, ...)
#   2. snakefmt --check            Snakefile and rules/ formatted (snakefmt 2.1.0, pyproject.toml [tool.snakefmt])
#   3. pytest -m unit              the fast tier, minutes
#   4. pytest -m "not unit"        the rest: engine, cluster (local SLURM) and end-to-end tests
# Extra arguments go to both pytest runs (e.g. -x). Runs with the interpreter of .venv (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
[ -x "$BIN/python" ] || { echo "error: no .venv here; run: bash scripts/bootstrap.sh" >&2; exit 2; }

echo "== 1/4 snakemake --lint" >&2
"$BIN/snakemake" --lint
echo "== 2/4 snakefmt --check Snakefile rules/" >&2
"$BIN/snakefmt" --check Snakefile rules/
echo "== 3/4 pytest -m unit" >&2
"$BIN/python" -m pytest -q -m unit --durations=25 "$@"
echo "== 4/4 pytest -m 'not unit' (engine, slurm, e2e)" >&2
"$BIN/python" -m pytest -q -m "not unit" --durations=25 "$@"
