#!/usr/bin/env bash
# The checks that need a CUDA device, in at most 8 minutes on one GPU (issue 14):
#   1. the tests marked `cuda` (tests/test_gpu_ready.py: an AMP step against the CPU in
#      float32, every assigner on CUDA against the CPU, no host sync in the training loop);
#   2. `python benchmarks/gpu_train.py`: 200 AMP iterations of yolox_s at 640 px (images/s,
#      peak GPU memory);
#   3. `python benchmarks/assign.py --device cuda`: every assigner on every scene (one run
#      per scene);
# then one summary table. Exit status 0 only when every part passed; 2 without CUDA.
#
#   bash scripts/gpu_check.sh
#   GPU_CHECK_BUDGET=450   seconds for the three parts together (each part also has its own cap)
#   GPU_CHECK_INSTALL=1    (re)install densedet into .venv first even when it already imports
#   GPU_CHECK_LOGS=DIR     where the full outputs go (default: a new temporary folder)
#   VENV=path              another environment folder (default .venv, as scripts/venv.sh)
set -uo pipefail
cd "$(dirname "$0")/.."

# --- the project's environment (as scripts/test.sh): scripts/venv.sh makes .venv and installs
# densedet[dev] into it. A .venv that already imports densedet and pytest is used as it is
# (a GPU machine is often offline, and pip would then fail) unless GPU_CHECK_INSTALL=1.
VENV=${VENV:-.venv}
if [ -z "${GPU_CHECK_INSTALL:-}" ] && [ -x "$VENV/bin/python" ] \
    && "$VENV/bin/python" -c "import densedet, pytest" 2>/dev/null; then
  echo "== using $VENV as it is (GPU_CHECK_INSTALL=1 reinstalls)"
  export PATH="$PWD/$VENV/bin:$PATH"
  export VIRTUAL_ENV="$PWD/$VENV"
else
  EXTRAS=dev source scripts/venv.sh || exit 1
fi

# --- a CUDA device, or stop here
if ! python - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device: torch {torch.__version__} (built for CUDA "
          f"{torch.version.cuda or 'none: a CPU-only build'}) sees none"
          + ("; CUDA_VISIBLE_DEVICES is set" if __import__("os").environ.get("CUDA_VISIBLE_DEVICES") is not None else ""),
          file=sys.stderr)
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"== {torch.cuda.device_count()} CUDA device(s); using 0: {p.name}, "
      f"{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
  echo "gpu_check: this script needs a CUDA GPU; run the CPU suite with scripts/test.sh" >&2
  exit 2
fi

LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t densedet_gpu_check.XXXXXX)}
mkdir -p "$LOGS"
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$SECONDS
SUMMARY=()
FAILED=0

# run NAME CAP_SECONDS COMMAND...: at most min(CAP, what is left of BUDGET); the output goes
# to the terminal and to $LOGS/NAME.log. Sets LAST_STATUS, LAST_TOOK, LAST_LOG.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  LAST_LOG="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9_.\n-' '_').log"
  : > "$LAST_LOG"
  if [ "$limit" -lt 15 ]; then
    LAST_STATUS="not run: the ${BUDGET}s budget is spent" LAST_TOOK=0
    FAILED=1
    return
  fi
  echo
  echo "== $name (at most ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$LAST_LOG"
  local rc=${PIPESTATUS[0]}
  LAST_TOOK=$((SECONDS - t0))
  LAST_STATUS=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    LAST_STATUS="TIMEOUT after ${limit}s"
    FAILED=1
  elif [ "$rc" -ne 0 ]; then
    LAST_STATUS="FAILED (exit $rc)"
    FAILED=1
  fi
}

# 1. the CUDA tests (-rP: their printed notes, e.g. the detectors' own host-sync sites)
run "CUDA tests" 180 python -m pytest -p no:cacheprovider -m cuda -rP tests/test_gpu_ready.py
result=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s" "$LAST_LOG" | tail -1 \
  | tr -d '=' | sed 's/^ *//; s/ *$//')
if [ "$LAST_STATUS" = ok ] && ! grep -q "passed" <<< "$result"; then
  LAST_STATUS="FAILED (no test ran on the device)"  # e.g. all skipped: torch saw no CUDA there
  FAILED=1
fi
SUMMARY+=("| CUDA tests (pytest -m cuda) | $LAST_STATUS | $LAST_TOOK | ${result:-see $LAST_LOG} |")

# 2. 200 AMP iterations of yolox_s at 640 px (before the assigner tables: if time runs short,
#    the huge assignment scenes are what is left out)
run "train yolox_s" 150 python benchmarks/gpu_train.py --preset yolox_s --size 640 --batch 64 \
  --iters 200 --json "$LOGS/gpu_train.json"
if [ -s "$LOGS/gpu_train.json" ]; then
  result=$(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['images_per_s']} images/s; step {r['step_ms_wall']} ms wall, {r['step_ms_device']} ms device; peak {r['peak_gib']} GiB\")" "$LOGS/gpu_train.json")
else
  result="no result (see $LAST_LOG)"
fi
SUMMARY+=("| yolox_s, 640 px, batch 64, AMP, 200 iterations | $LAST_STATUS | $LAST_TOOK | $result |")

# 3. every assigner on every scene; a scene per run, so that a slow scene cannot take the
#    others' tables with it (the two huge scenes get longer)
SCENES=$(python -c "from densedet.bench.assign import SCENES; print('\n'.join(SCENES))")
while IFS= read -r scene; do
  case "$scene" in *G5000*) cap=100 ;; *) cap=60 ;; esac
  run "assign $scene" "$cap" python benchmarks/assign.py --device cuda --scenes "$scene"
  rows=$(grep -c "^| $scene |" "$LAST_LOG" || true)
  bad=$(grep "^| $scene |" "$LAST_LOG" | grep -c "failed:" || true)
  if [ "${bad:-0}" -gt 0 ]; then
    FAILED=1
    LAST_STATUS="$LAST_STATUS; $bad method(s) failed"
  fi
  SUMMARY+=("| assign.py --device cuda, scene $scene | $LAST_STATUS | $LAST_TOOK | ${rows:-0} rows (table above) |")
done <<< "$SCENES"

echo
echo "== summary ($((SECONDS - START))s; full outputs in $LOGS)"
echo "| check | status | seconds | result |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
