#!/usr/bin/env bash
# The one prepared device command: the carried wheels installed, then the GPU benchmark suite (the table, first: its
# rows land in $OUT as each is measured), then the GPU smoke run, each under a timeout. $OUT is the device machine's
# return folder (./gpu_out when unset).
#
#   bash scripts/download_wheels.sh            # here, once: .whl/ (carry ".whl" with the device call)
#   bash scripts/gpu_all.sh                    # on the GPU: suite <= SUITE_TIMEOUT (420 s), smoke <= SMOKE_TIMEOUT (120 s)
#   bash scripts/gpu_all.sh --cpu              # its CPU dry run (tiny suite, --quick smoke; no GPU numbers), same timeouts
#   bash scripts/device_rehearsal.sh           # the dry run in a venv of the image's packages (what must pass first)
#
# GPU_ALL_PARTS=suite (or smoke) runs one part; GPU_SUITE_ARGS / GPU_SMOKE_ARGS add arguments. Each part gets
# --budget-s = its timeout minus a margin, so rows / steps that would start too late print "SKIP (budget)" and it
# ends with its summary instead of being killed.
#
# $OUT/env.txt (nvidia-smi, versions, the carried packages), $OUT/gpu_suite.{txt,json,md}, $OUT/gpu_smoke.txt (one
# PASS / FAIL / SKIP line per step), $OUT/smoke_logs.txt (the tails of the entry points' logs).
# Exit status: 0 only if every part that ran passed.
set -u
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = --cpu ] && MODE=cpu
PY=${PYTHON:-python3}  # the image has python3, not python
OUT=${OUT:-$PWD/gpu_out}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-420}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-120}
PARTS=${GPU_ALL_PARTS:-suite,smoke}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_site.XXXXXX")   # the carried wheels, installed for this run only
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")  # checkpoints and states stay out of $OUT
trap 'rm -rf "$SITE" "$WORK"' EXIT
trap 'exit 143' INT TERM  # the EXIT trap then cleans up

# ---- the carried wheels, exactly as the device installs them: no index, no dependencies, into a folder of their own
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "FAIL gpu_all: no .whl/*.whl; run scripts/download_wheels.sh and carry .whl" | tee "$OUT/env.txt"
  exit 2
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
  echo "FAIL gpu_all: installing .whl/*.whl failed" | tee "$OUT/env.txt"
  exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  echo "mode $MODE, parts $PARTS, suite timeout $SUITE_TIMEOUT s, smoke timeout $SMOKE_TIMEOUT s"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import ftfy, zstandard, diffusers; print('carried: ftfy', ftfy.__version__, 'zstandard', \
zstandard.__version__, 'diffusers', diffusers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$MODE" = cpu ]; then
  SUITE_ARGS="--device cpu --preset tiny --batches 1"
  SMOKE_ARGS="--device cpu --quick"
else
  SUITE_ARGS="--device cuda"
  SMOKE_ARGS="--device cuda"
fi

suite=0
smoke=0
if [[ ",$PARTS," == *,suite,* ]]; then
  echo "== gpu_suite (timeout $SUITE_TIMEOUT s)"
  # shellcheck disable=SC2086  # the ARGS are lists of arguments
  timeout --kill-after=15 "$SUITE_TIMEOUT" "$PY" bench/gpu_suite.py --out "$OUT" \
    --budget-s $((SUITE_TIMEOUT - 30)) $SUITE_ARGS ${GPU_SUITE_ARGS:-} 2>&1 | tee "$OUT/gpu_suite.txt"
  suite=${PIPESTATUS[0]}
  [ "$suite" = 124 ] && echo "FAIL gpu_suite: timed out after $SUITE_TIMEOUT s" | tee -a "$OUT/gpu_suite.txt"
fi
if [[ ",$PARTS," == *,smoke,* ]]; then
  echo "== gpu_smoke (timeout $SMOKE_TIMEOUT s)"
  # shellcheck disable=SC2086
  timeout --kill-after=15 "$SMOKE_TIMEOUT" "$PY" scripts/gpu_smoke.py --out "$WORK" \
    --budget-s $((SMOKE_TIMEOUT * 3 / 4)) $SMOKE_ARGS ${GPU_SMOKE_ARGS:-} 2>&1 | tee "$OUT/gpu_smoke.txt"
  smoke=${PIPESTATUS[0]}
  [ "$smoke" = 124 ] && echo "FAIL gpu_smoke: timed out after $SMOKE_TIMEOUT s" | tee -a "$OUT/gpu_smoke.txt"
  # the logs' tails in one file ($OUT returns at most 8 files, two folders down)
  for f in "$WORK"/logs/*.log "$WORK"/runs/*/logs/train.log; do
    [ -f "$f" ] && { echo "==== ${f#"$WORK"/}"; tail -n 40 "$f"; }
  done > "$OUT/smoke_logs.txt" 2>/dev/null
fi
echo "gpu_all ($MODE): suite exit $suite, smoke exit $smoke; outputs in $OUT"
[ "$suite" = 0 ] && [ "$smoke" = 0 ]
