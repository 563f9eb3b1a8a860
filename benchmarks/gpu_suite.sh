#!/usr/bin/env bash
# The GPU numbers from a plain checkout on an offline machine, in parts that each fit a 10-minute job.
#
#   benchmarks/gpu_suite.sh [PARTS] [OUT_DIR]
#
#   PARTS    comma-separated, run in order; default `all` =
#            smoke,accuracy,throughput20,profile,tune,tune_modes,throughput200,kernels,tta,data
#              smoke          every GPU path once, one PASS/FAIL/SKIP line per item (SMOKE_ITEMS, benchmarks/smoke.py):
#                             the fast-path checks an accuracy run needs, the official code's DataLoader probe, 3
#                             training steps, one n=200 step, DALI; smoke.json's "gate" says which fast paths an
#                             accuracy run may use (overrides) and whether to try the official code
#              accuracy       fastemp's n=20 official 1-epoch recipe (c10_n20_official_1ep@1), official evaluation
#                             protocol, CIFAR-10 JPEG copy: ACCURACY_SEEDS seeds (default 2: the next two not yet in
#                             ACCURACY_HISTORY), in this order: the first seed, the official code's own run
#                             (benchmarks/official_peer.py, from .official/ or FASTEMP_OFFICIAL_DIR, scored by the
#                             same evaluator with the same overrides), the other seeds if they fit; one accuracy.json
#                             holding every seed and official run so far. The part FAILs unless the official run
#                             PASSed (dry runs without FASTEMP_OFFICIAL_DIR excepted)
#              throughput20   n=20, B=100: the torch backend + the reference-style baseline
#              profile        where an n=20 step's time goes, kernel by kernel (torch.profiler; in details/)
#              tune           n=20, B=100, compile default: cudnn.benchmark off/on x compiled patch recipe
#                             off/on (fastemp tune; tuned_n20.md/.yaml say which won, in details/)
#              tune_modes     n=20, B=100: compile modes default, reduce-overhead (CUDA graphs),
#                             max-autotune-no-cudagraphs (tune_modes_n20.md/.yaml in details/)
#              throughput200  n=200, B=100 with cifar10_n200_1ep: one pass with ghost BatchNorm (grad chunks
#                             chosen from free memory) and the 10-chunk gradient cache: speed and peak memory
#              kernels        cosine-to-mean, TCR and the augmentation backends in isolation
#              tta            time to 85% linear probe, n=20, on the CIFAR-10 JPEG copy; short of 85%
#                             within its limit it reports the best accuracy and the times to 70/75/80%
#              data           the data path (fastemp bench data): Pillow workers vs DALI (nvJPEG, prefetch) vs
#                             resident images vs the step alone, on synthetic JPEGs of 32, 64 and 400 px
#                             (n=20, B=100; 224-px patches and the ImageNet stem for 400 px); its rows go
#                             into suite.json (a data.json of its own would be a 9th file)
#   OUT_DIR  default benchmarks/results/<device>/ (e.g. benchmarks/results/h100-80gb-hbm3/)
#
# OUT_DIR ends up with at most 8 files, so a remote node's results can be fetched whole: one JSON per
# part (smoke.json, accuracy.json, official_peer.json, throughput_n20.json, throughput_n200.json,
# time_to_85_n20.json, kernels.json: the first five present in that order; the others stay in details.tar.gz),
# suite.json (every part's status, limit and seconds), suite.md (all of it for people) and details.tar.gz (logs,
# per-part markdown, the other JSON, nvidia-smi, pip freeze). OUT_DIR/details/ (or SUITE_DETAILS) is the working
# copy. OUT_DIR is published after every part and every PUBLISH_EVERY (30) s during one, so whatever kills the
# whole script finds OUT_DIR holding what was measured up to then.
#
# Offline-proof: it never asks a package index for anything. fastemp is imported from this checkout
# (an installed copy elsewhere is ignored: a folder of links on PYTHONPATH, no pip at all). Every step
# runs under `timeout`; a part that runs out is reported as TIMEOUT with what it had written so far (the
# benchmarks write their JSON as they go) and the next part still runs. Exit status: 0 when every part
# passed, 1 otherwise.
#
# Environment:
#   FASTEMP_PYTHON       the interpreter that has torch (default python3; never assumes `python`)
#   FASTEMP_CIFAR10_JPEG the CIFAR-10 JPEG tar.gz (default: .data/, shared/data/ or ../shared/data/)
#   FASTEMP_COMMIT       the commit to record when the checkout has no .git (a copied working tree)
#   FASTEMP_OFFICIAL_DIR the official checkout (default .official/; dry runs: only when set, e.g. a stand-in)
#   FASTEMP_OFFICIAL_PYTHON the interpreter with the official code's dependencies (default FASTEMP_PYTHON)
#   SUITE_DRY_RUN=1      CPU, toy sizes, synthetic data (the tiny FASTEMP_CIFAR10_JPEG when given): the whole driver
#                        in about a minute (CI)
#   SUITE_DETAILS        the details folder (default OUT_DIR/details)
#   SUITE_DEADLINE       epoch seconds by which the script must have published and ended: every part's limit is
#                        cut to what is left (benchmarks/lease.sh sets it from its call's time)
#   LIMIT_<PART>         seconds for a part; LIMIT_SMOKE_<ITEM> for a smoke item (LIMIT_SMOKE_ITEM: all of them);
#                        defaults below
#   SUITE_OVERRIDES      config overrides for every fastemp run and the official run's evaluation, e.g.
#                        "data.patch_compile=off" when the smoke gate switched a fast path off (recorded in the
#                        results)
#   LEASE_PEER           "skip: REASON" keeps the official run out of the accuracy part (the smoke gate's verdict)
#   ACCURACY_HISTORY     the accuracy.json seeds are added to (default benchmarks/results/<device>/accuracy.json)
#   SUITE_BACKENDS       patch backends of the throughput parts (default: torch)
#   ACCURACY_SEEDS (2: a count of new seeds, or a list), SMOKE_ITEMS (all), TTA_EPOCHS (3), TTA_EVAL_EVERY (250), TTA_PROTOCOL (cheap: 16 patches, 20 probe epochs),
#   BASELINE_WORKERS, KERNELS_N (20,50,200), KERNELS_BATCH (100,256), DATA_SOURCES (32,64,400), DATA_BATCH (100),
#   DATA_WORKERS (min(16, cores): the Pillow arm's processes)
set -uo pipefail

PARTS="${1:-all}"
[ "$PARTS" = all ] && PARTS=smoke,accuracy,throughput20,profile,tune,tune_modes,throughput200,kernels,tta,data
IFS=, read -r -a PART_LIST <<<"$PARTS"
for part in "${PART_LIST[@]}"; do
  case "$part" in
    smoke | accuracy | throughput20 | profile | tune | tune_modes | throughput200 | kernels | tta | data) ;;
    *)
      echo "usage: benchmarks/gpu_suite.sh [all|smoke,accuracy,throughput20,profile,tune,tune_modes,throughput200,kernels,tta,data]" \
        "[OUT_DIR]" >&2
      exit 2
      ;;
  esac
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
PY="${FASTEMP_PYTHON:-python3}"
DRY="${SUITE_DRY_RUN:-0}"
log() { echo "gpu_suite: $*"; }

if ! command -v "$PY" >/dev/null; then
  echo "gpu_suite: interpreter '$PY' not found (set FASTEMP_PYTHON)" >&2
  exit 2
fi
if ! timeout 120 "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_suite: '$PY' cannot import torch (set FASTEMP_PYTHON to the interpreter that has it)" >&2
  exit 2
fi

# fastemp from this checkout, without installing: links laid out as setup.py's package_dir maps them.
SITE="$(mktemp -d)/site"
mkdir -p "$SITE/fastemp"
for f in "$REPO"/fastemp/*; do ln -s "$f" "$SITE/fastemp/"; done
for sub in kernels configs benchmarks; do ln -s "$REPO/$sub" "$SITE/fastemp/$sub"; done
# PYTHONSAFEPATH: `python -m` must not put the working directory (this checkout, whose fastemp/ lacks the
# mapped subpackages) ahead of the links
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if [ -z "${FASTEMP_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  log "no git checkout here and FASTEMP_COMMIT is unset: results record commit 'unknown'"
fi
log "fastemp from $REPO (not installed; PYTHONPATH=$SITE), python $("$PY" -c 'import sys; print(sys.executable)')"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
else
  DEVICE=cuda
fi
[ "$DRY" = 1 ] || SLUG="$(timeout 120 "$PY" -c "
import torch
from fastemp.benchmarks.common import device_slug
from fastemp.runs import environment
print(device_slug(environment(torch.device('$DEVICE' if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 'cpu'))))
" 2>/dev/null)" || SLUG=unknown-device
[ "$DRY" = 1 ] && SLUG=cpu-dry-run
OUT="${2:-benchmarks/results/$SLUG}"
DETAILS="${SUITE_DETAILS:-$OUT/details}"
mkdir -p "$DETAILS"
SUITE_LOG="$DETAILS/suite.log"
log "parts '$PARTS' on $SLUG, writing into $OUT" | tee -a "$SUITE_LOG"

limit_of() {  # LIMIT_<PART> or the default for the part (seconds)
  local var="LIMIT_${1^^}"
  echo "${!var:-$2}"
}

# Runs "$@" under the limit in $1; status 124 (137 after the kill) = cut at its limit. --foreground keeps
# it in the caller's process group, so a part's watchdog (run_part) reaches it too.
limited() {
  local seconds="$1"
  shift
  timeout --foreground --kill-after=15 "$seconds" "$@"
}

record_part() {  # name status seconds limit: one line of suite.json's record
  printf '{"part": "%s", "status": "%s", "seconds": %s, "limit_seconds": %s, "dry_run": %s}\n' \
    "$1" "$2" "$3" "$4" "$([ "$DRY" = 1 ] && echo true || echo false)" >>"$DETAILS/parts.jsonl"
}

environment_files() {
  [ "$DRY" = 1 ] && return
  { limited 30 nvidia-smi || echo "nvidia-smi failed or is missing"; } >"$DETAILS/nvidia-smi.txt" 2>&1
  limited 60 "$PY" -m pip freeze >"$DETAILS/pip-freeze.txt" 2>&1 || true
}

# ---------------------------------------------------------------------------------------- data
DATA="${FASTEMP_CIFAR10_JPEG:-}"
for candidate in .data/cifar10-jpeg.tar.gz shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
  if [ -z "$DATA" ] && [ -f "$candidate" ]; then DATA="$candidate"; fi
done
[ -n "$DATA" ] && [ ! -f "$DATA" ] && DATA=""
if [ "$DRY" = 1 ]; then
  SIZES=(data.source=synthetic data.synthetic_train=96 data.synthetic_test=48 model.width=8 model.hidden_dim=32
    model.z_dim=16)
  THROUGHPUT_DATA=("${SIZES[@]}")
else
  # throughput does not depend on image content: synthetic data spares the decode
  THROUGHPUT_DATA=(data.source=synthetic data.synthetic_train=5000)
fi
read -r -a OVERRIDES <<<"${SUITE_OVERRIDES:-}"
THROUGHPUT_DATA+=("${OVERRIDES[@]}")
OFFICIAL="${FASTEMP_OFFICIAL_DIR:-}"
[ -z "$OFFICIAL" ] && [ "$DRY" != 1 ] && OFFICIAL="$REPO/.official"
OFFICIAL_PY="${FASTEMP_OFFICIAL_PYTHON:-$PY}"
export FASTEMP_OFFICIAL_DIR="$OFFICIAL" FASTEMP_OFFICIAL_PYTHON="$OFFICIAL_PY"
[ -n "$DATA" ] && export FASTEMP_CIFAR10_JPEG="$(realpath "$DATA")"

decode_data() {  # decode + cache both splits once (under data.root); prints the descriptions
  limited "$(limit_of decode 240)" "$PY" - "$(realpath "$DATA")" "$DEVICE" <<'EOF'
import sys
from fastemp.config import DataConfig
from fastemp.data import load_split
cfg = DataConfig(source="imagefolder", path=sys.argv[1])
for split in ("train", "test"):
    print("gpu_suite:", load_split(cfg, split, sys.argv[2]).description, flush=True)
EOF
}

DALI_OK=0
if [ "$DRY" != 1 ] && limited 120 "$PY" -c "import nvidia.dali" 2>/dev/null; then DALI_OK=1; fi
BACKENDS="${SUITE_BACKENDS:-torch}"  # CIFAR is resident: DALI reads image files (its numbers: the data part)
[ "$DRY" = 1 ] || log "DALI $([ "$DALI_OK" = 1 ] && echo imports || echo 'does NOT import: torch backend only, no DALI number')" | tee -a "$SUITE_LOG"

# ---------------------------------------------------------------------------------------- parts
FASTEMP=("$PY" -m fastemp)

# Each item in its own process under its own limit: LIMIT_SMOKE_<ITEM> (or LIMIT_SMOKE_ITEM), cut to what is left of
# the part. Defaults hold cold compilations on a fresh machine (ESTIMATES: ~30-60 s each, docs/benchmarks.md): check
# compiles the model, the patch recipe, LARS and the evaluation forward; train the model, recipe and LARS again at
# the accuracy run's shapes; official_loader decodes the JPEG copy once (~30 s) before its 5 s probe.
declare -A SMOKE_LIMIT=([environment]=60 [check]=300 [official_loader]=150 [train]=240 [large_n]=90 [dali]=120)
part_smoke() {
  local record="$DETAILS/smoke.jsonl" item status item_limit var left items="${SMOKE_ITEMS:-environment,check,official_loader,train,large_n,dali}"
  rm -f "$record"
  IFS=, read -r -a SMOKE_LIST <<<"$items"
  for item in "${SMOKE_LIST[@]}"; do
    var="LIMIT_SMOKE_${item^^}"
    item_limit="${!var:-${LIMIT_SMOKE_ITEM:-${SMOKE_LIMIT[$item]:-120}}}"
    left=$((PART_END - SECONDS - 5))
    if [ "$left" -lt 10 ]; then
      printf '{"item": "%s", "status": "SKIP", "reason": "no time left in the part", "seconds": 0, "details": {}}\n' \
        "$item" >>"$record"
      echo "smoke $item SKIP no time left in the part"
      continue
    fi
    [ "$left" -lt "$item_limit" ] && item_limit=$left
    limited "$item_limit" "$PY" -m fastemp.benchmarks.smoke run "$item" --record "$record" \
      $([ "$DRY" = 1 ] && echo --dry-run)
    status=$?
    if [ $status = 124 ] || [ $status = 137 ]; then
      printf '{"item": "%s", "status": "FAIL", "reason": "timed out after %s s (LIMIT_SMOKE_%s)", "seconds": %s, "details": {}}\n' \
        "$item" "$item_limit" "${item^^}" "$item_limit" >>"$record"
      echo "smoke $item FAIL timed out after $item_limit s"
    fi
  done
  "$PY" -m fastemp.benchmarks.smoke report --record "$record" --out "$DETAILS" --items "$items"
}

# Accuracy parity (issue 21). ESTIMATES for an H200, not measurements (benchmarks/lease.sh sums them): fastemp
# trains an n=20 epoch in ~15 s (3,434 images/s, benchmarks/results/h200) after compiling (~30-60 s cold, less on
# the compile caches smoke's train item left); the official evaluation is 60,000 images x 128 patches forward
# (~40 s) + 100 probe epochs (~15 s) + compiling the encoder: ~60-100 s; with the JPEG decode (~30 s unless cached)
# the first seed takes ~150-200 s. The official code runs at the reference-style baseline's ~360 images/s (16
# workers): ~140 s of training after ~20 s of startup, then the same evaluation. A later seed: ~110 s.
# Order: first seed, official run, later seeds; each bounded by what is left of the part (--budget, --time-limit).
part_accuracy() {
  local end=$((PART_END - 20)) status=0 data_args peer_args first later count left
  local history="${ACCURACY_HISTORY:-benchmarks/results/$SLUG/accuracy.json}" rc
  if [ "$DRY" = 1 ]; then
    local dry=(model.width=8 model.hidden_dim=32 model.z_dim=16 model.compile=none eval.patches=2 eval.probe_epochs=2
      eval.probe_batch_size=16 eval.batch_size=16)
    data_args=(train.n_patches=4 train.batch_size=16 "${dry[@]}")
    if [ -n "$DATA" ]; then data_args+=(--cifar10 "$(realpath "$DATA")"); else data_args+=("${SIZES[@]}"); fi
    peer_args=(--cpu-dry-run --n 4 --train-images 200 --test-images 40 --no-progress "${dry[@]}")
  elif [ -n "$DATA" ] && decode_data; then
    data_args=(--cifar10 "$(realpath "$DATA")")
    peer_args=(--n 20 --no-progress)
  else
    echo "gpu_suite: accuracy needs the CIFAR-10 JPEG archive (FASTEMP_CIFAR10_JPEG); none could be loaded" >&2
    return 2
  fi
  data_args+=("${OVERRIDES[@]}")
  if [ ! -f "$DETAILS/accuracy.json" ] && [ -f "$history" ]; then
    cp "$history" "$DETAILS/accuracy.json" && echo "gpu_suite: adding to $history"
  fi
  count="${ACCURACY_SEEDS:-2}"
  if [[ "$count" == *,* ]]; then  # a list; a trailing comma keeps one seed a list ("3" alone is a count)
    first="${count%%,*}," later="${count#*,}"
    [ -n "$later" ] && later="${later%,},"
  else
    first="next:1" later="$([ "$count" -gt 1 ] && echo "next:$((count - 1))")"
  fi
  run_seeds() {
    if [ $((end - SECONDS)) -lt 60 ]; then
      echo "gpu_suite: seeds $1 not run: only $((end - SECONDS)) s left of the part"
      return
    fi
    "${FASTEMP[@]}" bench accuracy --rows c10_n20_official_1ep@1 --seeds "$1" --device "$DEVICE" \
      --budget "$((end - SECONDS))" "${data_args[@]}" --accumulate --out "$DETAILS" --name accuracy || status=1
  }
  run_seeds "$first"
  left=$((end - SECONDS))
  rm -f "$DETAILS/official_peer.json"
  if [[ "${LEASE_PEER:-run}" == skip* ]]; then
    peer_skip "${LEASE_PEER#skip: }"
  elif [ -z "$OFFICIAL" ] || [ ! -f "$OFFICIAL/main.py" ]; then
    peer_skip "no checkout of tsb0601/EMP-SSL at ${OFFICIAL:-.official/ (dry run: set FASTEMP_OFFICIAL_DIR)}"
  elif [ -z "$DATA" ]; then
    peer_skip "no CIFAR-10 JPEG archive"
  elif [ "$left" -lt 60 ]; then
    peer_skip "only $left s left of the part"
  else
    # its seed and evaluation reserve come from accuracy.json, and it adds itself there (any status)
    "$PY" -m fastemp.benchmarks.official_peer --official-dir "$OFFICIAL" --data "$(realpath "$DATA")" \
      --python "$OFFICIAL_PY" --out "$DETAILS" --accuracy "$DETAILS/accuracy.json" --epochs 1 --time-limit "$left" \
      "${peer_args[@]}" "${OVERRIDES[@]}"
    rc=$?
    [ -f "$DETAILS/official_peer.json" ] || printf '{"benchmark": "official_peer", "status": "FAIL", "error": "exit %s before it started (%s)"}\n' \
      "$rc" "see accuracy.log" >"$DETAILS/official_peer.json"
    if [ "$rc" != 0 ]; then
      echo "gpu_suite: official run FAILED (exit $rc): see official_peer.json/.log"
      status=1
    fi
  fi
  [ -n "$later" ] && run_seeds "$later"
  return $status
}

peer_skip() {  # official_peer.json saying why the official code did not run; a FAIL of the part (but in a dry run
  # without FASTEMP_OFFICIAL_DIR, which has nothing to run)
  printf '{"benchmark": "official_peer", "status": "SKIP", "reason": "%s"}\n' "$1" >"$DETAILS/official_peer.json"
  echo "gpu_suite: official peer SKIP: $1"
  { [ "$DRY" = 1 ] && [ -z "$OFFICIAL" ]; } || status=1
}

part_throughput20() {
  local args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" --device "$DEVICE" --n 20 --batch 100
    --backend "$BACKENDS" --baseline --baseline-workers "${BASELINE_WORKERS:-$(nproc)}")
  [ "$DRY" = 1 ] && args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" --device cpu --n 4 --batch 16
    --backend torch --compile none --steps 2 --warmup 0 --split-steps 1 --baseline --baseline-workers 0
    --baseline-steps 2 --peak-size 64)
  "${FASTEMP[@]}" bench throughput "${args[@]}" --force --out "$DETAILS" --name throughput_n20
}

part_profile() {
  local args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" --device "$DEVICE")
  [ "$DRY" = 1 ] && args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" --device cpu train.n_patches=4
    train.batch_size=16 model.compile=none --warmup 0 --steps 2)
  "${FASTEMP[@]}" bench profile "${args[@]}" --force --out "$DETAILS" --name profile
}

# fastemp tune at n=20, B=100 over the speed-only settings ($1: name, then tune's arguments); its JSON stays in
# details/ (the folder holds at most 8 files), its markdown goes into suite.md, the winning config into details/
tune_part() {
  local name="$1"
  shift
  local args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" --device "$DEVICE" --batch 100 --backend torch
    --warmup 3 --steps 10 "$@")
  [ "$DRY" = 1 ] && args=(--config cifar10_n20_1ep "${THROUGHPUT_DATA[@]}" train.n_patches=4 --device cpu --batch 16
    --backend torch --compile none --cudnn-benchmark off --patch-compile off --warmup 0 --steps 1)
  "${FASTEMP[@]}" tune "${args[@]}" --force --out "$DETAILS/$name.yaml"
}

part_tune() {
  tune_part tuned_n20 --compile default --cudnn-benchmark off,on --patch-compile off,on
}

part_tune_modes() {
  tune_part tune_modes_n20 --compile default,reduce-overhead,max-autotune-no-cudagraphs --cudnn-benchmark on \
    --patch-compile on
}

part_throughput200() {
  # grad chunks 0: one pass with ghost BatchNorm when it fits (chosen from free memory), 10: the two-pass
  # gradient cache with the same BatchNorm groups (the same gradients): both in one run, for the ratio
  local args=(--config cifar10_n200_1ep "${THROUGHPUT_DATA[@]}" --device "$DEVICE" --n 200 --batch 100
    --grad-chunks "${N200_GRAD_CHUNKS:-0,10}" --backend torch --steps 10 --split-steps 5)
  [ "$DRY" = 1 ] && args=(--config cifar10_n200_1ep "${THROUGHPUT_DATA[@]}" train.bn_groups=2 --device cpu --n 8
    --batch 16 --grad-chunks 0,2 --backend torch --compile none --steps 2 --warmup 0 --split-steps 1 --peak-size 64)
  "${FASTEMP[@]}" bench throughput "${args[@]}" --force --out "$DETAILS" --name throughput_n200
}

part_kernels() {
  local args=(--device "$DEVICE" --n "${KERNELS_N:-20,50,200}" --batch "${KERNELS_BATCH:-100,256}")
  [ "$DRY" = 1 ] && args=(--device cpu --n 4 --batch 16 --dim 32 --warmup 0 --iters 2 --no-compile --images 64
    --baseline-aug-patches 4)
  "${FASTEMP[@]}" bench kernels "${args[@]}" --force --out "$DETAILS"
}

part_tta() {
  local data_args
  if [ "$DRY" = 1 ]; then
    data_args=("${SIZES[@]}" train.n_patches=4 train.batch_size=16 model.compile=none)
  elif [ -n "$DATA" ] && decode_data; then
    data_args=(data.source=imagefolder "data.path=$(realpath "$DATA")" "${OVERRIDES[@]}")
  else
    echo "gpu_suite: time to accuracy needs the CIFAR-10 JPEG archive (FASTEMP_CIFAR10_JPEG); none could be loaded" >&2
    return 2
  fi
  local budget
  budget=$(($(limit_of tta 420) - 30)) # stop training in time to write the results
  "${FASTEMP[@]}" bench time-to-accuracy --config cifar10_n20_10ep "${data_args[@]}" \
    train.epochs="${TTA_EPOCHS:-3}" --protocol "${TTA_PROTOCOL:-cheap}" eval.knn=false --device "$DEVICE" --target 0.85 \
    --milestones 0.70,0.75,0.80 --eval-every "${TTA_EVAL_EVERY:-250}" --max-wall-seconds "$budget" --force \
    --out "$DETAILS" --name time_to_85_n20
}

part_data() {  # DALI's arm runs when nvidia.dali imports on this box (staged like the other parts), else SKIPPED
  local cores workers
  cores="$(nproc)"
  workers="${DATA_WORKERS:-$((cores < 16 ? cores : 16))}"
  local args=(--device "$DEVICE" --sources "${DATA_SOURCES:-32,64,400}" --n 20 --batch "${DATA_BATCH:-100}"
    --workers "$workers" --warmup 2 --steps 10 "${OVERRIDES[@]}")
  [ "$DRY" = 1 ] && args=(--device cpu --sources 24 --patch 16 --n 2 --batch 4 --workers 0 --warmup 0 --steps 1
    --classes 2 --per-class 2 model.width=8 model.hidden_dim=16 model.z_dim=8)
  "${FASTEMP[@]}" bench data "${args[@]}" --force --out "$DETAILS" --name data
}

declare -A DEFAULT_LIMIT=([smoke]=540 [accuracy]=570 [throughput20]=420 [profile]=180 [tune]=540 [tune_modes]=600
  [throughput200]=480 [kernels]=240 [tta]=420 [data]=540)
[ "$DRY" = 1 ] && DEFAULT_LIMIT=([smoke]=300 [accuracy]=240 [throughput20]=240 [profile]=240 [tune]=240 [tune_modes]=240
  [throughput200]=240 [kernels]=240 [tta]=240 [data]=240)

# Publishes what is there: JSON per part, suite.json/suite.md, details.tar.gz (at most 8 files in OUT).
publish() {
  local name published=() packed=()
  for name in smoke accuracy official_peer throughput_n20 throughput_n200 time_to_85_n20 kernels; do
    [ -f "$DETAILS/$name.json" ] || continue
    if [ ${#published[@]} -lt 5 ]; then
      cp "$DETAILS/$name.json" "$OUT/$name.json"
      published+=("--exclude=./$name.json")
    else
      rm -f "$OUT/$name.json"
      packed+=("$name.json")
    fi
  done
  [ ${#packed[@]} -gt 0 ] && log "in details.tar.gz only (8 files at most here): ${packed[*]}"
  limited 60 "$PY" -m fastemp.benchmarks.suite_report --details "$DETAILS" --out "$OUT" || log "suite report failed"
  tar -C "$DETAILS" -czf "$OUT/details.tar.gz.tmp" "${published[@]}" --exclude='*.tmp' . 2>/dev/null
  mv -f "$OUT/details.tar.gz.tmp" "$OUT/details.tar.gz" 2>/dev/null || log "packing details failed"
}

# A part runs in its own process group with a watchdog: whatever hangs inside it (a decode, a compile, a
# collective) is ended at the part's limit, what it wrote so far is kept, and the next part runs. The watchdog
# also publishes every PUBLISH_EVERY seconds, so OUT holds the part's partial results while it runs.
run_part() {
  local part="$1" seconds="$2" pid dog status
  rm -f "$DETAILS/$part.timeout"
  PART_END=$((SECONDS + seconds))
  set -m
  (part_"$part") >"$DETAILS/$part.log" 2>&1 </dev/null &
  pid=$!
  set +m
  (
    next=$((SECONDS + ${PUBLISH_EVERY:-30}))
    while [ $SECONDS -lt $PART_END ]; do
      sleep 1
      kill -0 "$pid" 2>/dev/null || exit 0
      if [ $SECONDS -ge $next ]; then
        publish >/dev/null 2>&1
        next=$((SECONDS + ${PUBLISH_EVERY:-30}))
      fi
    done
    touch "$DETAILS/$part.timeout"
    kill -TERM -- "-$pid" 2>/dev/null
    for ((i = 0; i < 15; i++)); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || exit 0
    done
    kill -KILL -- "-$pid" 2>/dev/null
  ) >/dev/null 2>&1 &
  dog=$!
  wait "$pid"
  status=$?
  wait "$dog"
  [ -f "$DETAILS/$part.timeout" ] && return 124
  return $status
}

failed=0
environment_files
for part in "${PART_LIST[@]}"; do
  part_limit="$(limit_of "$part" "${DEFAULT_LIMIT[$part]}")"
  if [ -n "${SUITE_DEADLINE:-}" ]; then  # leave 25 s to stop the part (15 s) and publish
    left=$((SUITE_DEADLINE - $(date +%s) - 25))
    [ "$left" -lt "$part_limit" ] && part_limit=$left
    if [ "$part_limit" -lt 10 ]; then
      log "part $part: SKIP, no time left before SUITE_DEADLINE" | tee -a "$SUITE_LOG"
      record_part "$part" SKIP 0 0
      failed=1
      continue
    fi
  fi
  log "part $part: start (limit $part_limit s)" | tee -a "$SUITE_LOG"
  start=$(date +%s)
  run_part "$part" "$part_limit"
  status=$?
  seconds=$(($(date +%s) - start))
  case $status in
    0) verdict=PASS ;;
    124) verdict=TIMEOUT ;;
    *) verdict=FAIL ;;
  esac
  [ $verdict = PASS ] || failed=1
  grep -E '^(smoke|gpu_suite:|step |accuracy |fastemp bench:|fastemp: |wrote )' "$DETAILS/$part.log" | tail -n 40
  [ $verdict = FAIL ] && tail -n 5 "$DETAILS/$part.log"
  log "part $part: $verdict (status $status) in $seconds s of $part_limit s" | tee -a "$SUITE_LOG"
  record_part "$part" "$verdict" "$seconds" "$part_limit"
  publish
done
log "done: $(ls "$OUT" | tr '\n' ' ')"
exit $failed
