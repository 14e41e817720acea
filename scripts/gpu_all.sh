#!/usr/bin/env bash
# The one prepared device command: the GPU smoke run, then the GPU benchmark suite, each under a timeout; every
# output lands in $OUT (the device machine's return folder; ./gpu_out when unset).
#
#   bash scripts/gpu_all.sh
#   SMOKE_TIMEOUT=300 SUITE_TIMEOUT=240 GPU_SUITE_ARGS="..." bash scripts/gpu_all.sh
#   GPU_SMOKE_ARGS="--device cpu --quick" GPU_SUITE_ARGS="--device cpu --preset tiny --batches 1" \
#     bash scripts/gpu_all.sh                          # the CPU dry run of this script (no GPU numbers)
#
# The suite gets --budget-s = SUITE_TIMEOUT - 60 (its default 420 s at SUITE_TIMEOUT=480; GPU_SUITE_ARGS may override
# it), so rows that would start too late print "SKIP (budget)" and it ends with its summary instead of being killed.
#
# $OUT/env.txt (nvidia-smi, torch / CUDA versions), $OUT/gpu_smoke.txt (one PASS / FAIL / SKIP line per step),
# $OUT/smoke_logs/ (each entry point's log, each run's train.log and metrics.jsonl), $OUT/gpu_suite.txt.
# bench/gpu_suite.py is skipped with a message while it does not exist. Exit status: 0 only if both passed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")   # checkpoints and states stay out of $OUT
{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

echo "== gpu_smoke (timeout ${SMOKE_TIMEOUT:-300} s)"
# shellcheck disable=SC2086  # GPU_SMOKE_ARGS is a list of arguments
timeout --kill-after=20 "${SMOKE_TIMEOUT:-300}" python scripts/gpu_smoke.py --out "$WORK" ${GPU_SMOKE_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_smoke.txt"
smoke=${PIPESTATUS[0]}
[ "$smoke" = 124 ] && echo "FAIL gpu_smoke: timed out after ${SMOKE_TIMEOUT:-300} s" | tee -a "$OUT/gpu_smoke.txt"
mkdir -p "$OUT/smoke_logs"
cp "$WORK"/logs/*.log "$OUT/smoke_logs/" 2>/dev/null
for run in "$WORK"/runs/*/; do
  [ -d "$run" ] || continue
  name=$(basename "$run")
  cp "$run/logs/train.log" "$OUT/smoke_logs/$name.train.log" 2>/dev/null
  cp "$run/logs/metrics.jsonl" "$OUT/smoke_logs/$name.metrics.jsonl" 2>/dev/null
done
rm -rf "$WORK"

echo "== gpu_suite (timeout ${SUITE_TIMEOUT:-240} s)"
if [ -f bench/gpu_suite.py ]; then
  # shellcheck disable=SC2086  # GPU_SUITE_ARGS is a list of arguments
  OUT="$OUT" timeout --kill-after=20 "${SUITE_TIMEOUT:-240}" python bench/gpu_suite.py \
    --budget-s $(( ${SUITE_TIMEOUT:-240} - 60 )) ${GPU_SUITE_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_suite.txt"
  suite=${PIPESTATUS[0]}
  [ "$suite" = 124 ] && echo "FAIL gpu_suite: timed out after ${SUITE_TIMEOUT:-240} s" | tee -a "$OUT/gpu_suite.txt"
else
  echo "SKIP gpu_suite: bench/gpu_suite.py does not exist yet" | tee "$OUT/gpu_suite.txt"
  suite=0
fi
echo "gpu_all: smoke exit $smoke, suite exit $suite; outputs in $OUT"
[ "$smoke" = 0 ] && [ "$suite" = 0 ]
