#!/usr/bin/env bash
# The GPU numbers from a plain checkout on an offline machine, in parts that each fit a 10-minute job.
#
#   benchmarks/gpu_suite.sh [all|PART,PART,...] [OUT_DIR]
#   benchmarks/gpu_suite.sh --lease call1|call2|call3 OUT    (issue 21's accuracy lease: smoke.py's lease)
#
# The parts, their limits and the result folder (at most 8 files) are benchmarks/suite.py's; docs/benchmarks.md
# lists them. This script only makes the checkout importable without installing anything: fastemp comes from this
# checkout through a folder of links on PYTHONPATH (laid out as setup.py maps it), and no package index is asked.
# FASTEMP_PYTHON: the interpreter that has torch (default python3).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
PY="${FASTEMP_PYTHON:-python3}"
if ! command -v "$PY" >/dev/null || ! timeout 120 "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_suite: '$PY' is missing or cannot import torch (set FASTEMP_PYTHON to the interpreter that has it)" >&2
  exit 2
fi
SITE="$(mktemp -d)/site"
mkdir -p "$SITE/fastemp"
for f in "$REPO"/fastemp/*; do ln -s "$f" "$SITE/fastemp/"; done
for sub in kernels configs benchmarks; do ln -s "$REPO/$sub" "$SITE/fastemp/$sub"; done
# PYTHONSAFEPATH: `python -m` must not put this checkout (whose fastemp/ lacks the mapped subpackages) first
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if [ -z "${FASTEMP_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  echo "gpu_suite: no git checkout here and FASTEMP_COMMIT is unset: results record commit 'unknown'"
fi
exec "$PY" -m fastemp.benchmarks.suite "$@"
