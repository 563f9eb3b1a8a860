#!/usr/bin/env bash
# The GPU numbers in one command: correctness check, throughput (n=20 with the baseline, n=200),
# kernels, and time to 85% linear probe for n=20 on CIFAR-10 from the JPEG archive.
#
#   benchmarks/gpu_suite.sh [PART] [OUT_DIR]
#
#   PART     all (default) | env | check | throughput20 | throughput200 | kernels | tta
#            Every part except `all` ends within 10 minutes on an H100, so a machine whose remote
#            calls are limited to 10 minutes runs the parts one call each. Every part first writes
#            the environment (nvidia-smi, pip freeze, DALI status) into OUT_DIR.
#   OUT_DIR  default: benchmarks/results/<device>/ (e.g. benchmarks/results/h100-80gb-hbm3/)
#
# Data: CIFAR-10 as JPEG files in a tar.gz (train/<class>/*.jpg, test/<class>/*.jpg), taken from
# $FASTEMP_CIFAR10_JPEG, else shared/data/cifar10-jpeg.tar.gz, else ../shared/data/cifar10-jpeg.tar.gz.
# Throughput does not depend on image content: without the archive the throughput parts use the
# synthetic set (and say so in their results); the time-to-accuracy part needs the archive.
#
# DALI is optional: when `import nvidia.dali` fails, only the torch backend runs, the output says
# so, and no DALI number is written.
#
# Knobs (environment): TTA_EVAL_EVERY (250 steps), TTA_EVAL_PATCHES (32), TTA_PROBE_EPOCHS (30),
# TTA_MAX_WALL (540 s), BASELINE_WORKERS (min(16, cores)).
set -uo pipefail

PART="${1:-all}"
case "$PART" in
  all | env | check | throughput20 | throughput200 | kernels | tta) ;;
  *)
    echo "usage: benchmarks/gpu_suite.sh [all|env|check|throughput20|throughput200|kernels|tta] [OUT_DIR]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."  # the repo root: results land in benchmarks/results/

if ! python -c "import fastemp.benchmarks" 2>/dev/null; then  # a bare machine: install the checkout
  echo "gpu_suite: installing fastemp from this checkout (editable, no dependencies)"
  python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
FASTEMP=(python -m fastemp)

device_slug() {
  python - <<'EOF'
import torch
from fastemp.benchmarks.common import device_slug
from fastemp.runs import environment
print(device_slug(environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))))
EOF
}

OUT="${2:-benchmarks/results/$(device_slug)}"
mkdir -p "$OUT"
echo "gpu_suite: part '$PART', writing into $OUT"

DATA="${FASTEMP_CIFAR10_JPEG:-}"
for candidate in shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
  if [ -z "$DATA" ] && [ -f "$candidate" ]; then DATA="$candidate"; fi
done
if [ -n "$DATA" ] && [ -f "$DATA" ]; then
  DATA_ARGS=(data.source=imagefolder "data.path=$(realpath "$DATA")")
  echo "gpu_suite: data = $DATA (CIFAR-10 JPEG copy, quality 75)"
else
  DATA=""
fi
# Decode (and cache under data.root) both splits once, on the device the runs use; a copy that
# cannot be decoded here (no DALI and no Pillow, say) is reported and treated as missing.
if [ -n "$DATA" ] && [ "$PART" != env ] && [ "$PART" != check ] && [ "$PART" != kernels ]; then
  if ! python - "$(realpath "$DATA")" <<'EOF'
import sys, torch
from fastemp.config import DataConfig
from fastemp.data import load_split
cfg = DataConfig(source="imagefolder", path=sys.argv[1])
for split in ("train", "test"):
    print("gpu_suite:", load_split(cfg, split, "cuda" if torch.cuda.is_available() else "cpu").description)
EOF
  then
    echo "gpu_suite: could not load $DATA (see above)"
    DATA=""
  fi
fi
if [ -z "$DATA" ]; then
  DATA_ARGS=(data.source=synthetic data.synthetic_train=50000 data.synthetic_test=10000)
  echo "gpu_suite: no usable CIFAR-10 JPEG archive: throughput parts use the synthetic set"
fi

if python -c "import nvidia.dali" 2>/dev/null; then
  BACKENDS="torch,dali"
  DALI_STATUS="DALI $(python -c 'import nvidia.dali as d; print(d.__version__)') imports: torch and dali backends measured"
else
  BACKENDS="torch"
  DALI_STATUS="DALI does NOT import: the torch backend only; no DALI number was measured"
fi
echo "gpu_suite: $DALI_STATUS"

part_env() {
  { nvidia-smi || echo "nvidia-smi failed"; } >"$OUT/nvidia-smi.txt" 2>&1
  python -m pip freeze >"$OUT/pip-freeze.txt" 2>&1
  echo "$DALI_STATUS" >"$OUT/dali-status.txt"
}

part_check() {
  "${FASTEMP[@]}" check --device cuda --json "$OUT/check.json" 2>&1 | tee "$OUT/check.txt"
}

part_throughput20() {
  "${FASTEMP[@]}" bench throughput --config cifar10_n20_1ep "${DATA_ARGS[@]}" --device cuda --n 20 --batch 100 \
    --backend "$BACKENDS" --baseline --baseline-workers "${BASELINE_WORKERS:-$(python -c 'import os; print(min(16, os.cpu_count()))')}" \
    --out "$OUT" --name throughput_n20
}

part_throughput200() {
  "${FASTEMP[@]}" bench throughput --config cifar10_n200_1ep "${DATA_ARGS[@]}" --device cuda --n 200 --batch 100 \
    --backend "$BACKENDS" --out "$OUT" --name throughput_n200
}

part_kernels() {
  "${FASTEMP[@]}" bench kernels --device cuda --out "$OUT"
}

part_tta() {
  if [ -z "$DATA" ]; then
    echo "gpu_suite: time-to-accuracy needs the CIFAR-10 JPEG archive (set FASTEMP_CIFAR10_JPEG)" >&2
    return 2
  fi
  "${FASTEMP[@]}" bench time-to-accuracy --config cifar10_n20_10ep "${DATA_ARGS[@]}" \
    eval.patches="${TTA_EVAL_PATCHES:-32}" eval.probe_epochs="${TTA_PROBE_EPOCHS:-30}" eval.knn=false \
    --device cuda --target 0.85 --eval-every "${TTA_EVAL_EVERY:-250}" --max-wall-seconds "${TTA_MAX_WALL:-540}" --out "$OUT" --name time_to_85_n20
}

run_part() {
  local name="$1" start status
  start=$(date +%s)
  "part_$name"
  status=$?
  echo "gpu_suite: part $name finished with status $status in $(( $(date +%s) - start )) s"
  return $status
}

part_env
case "$PART" in
  env) ;;
  check | throughput20 | throughput200 | kernels | tta) run_part "$PART" ;;
  all)
    failed=0
    for p in check throughput20 throughput200 kernels tta; do run_part "$p" || failed=1; done
    exit $failed
    ;;
esac
