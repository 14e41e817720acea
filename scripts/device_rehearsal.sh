#!/usr/bin/env bash
# The device call rehearsed on the CPU, before a GPU is spent on it: a Python 3.12 virtual environment holding only
# the GPU image's packages that this project touches, at the image's versions (../shared/device/packages.txt; torch
# 2.11.0 is the image's cu130 build from PyPI, which runs on the CPU), then the exact device command in its CPU
# dry-run mode with the device's timeouts: the carried wheels installed from .whl/ with no index (as on the device),
# the tiny suite, the quick smoke.
#
#   bash scripts/download_wheels.sh && bash scripts/device_rehearsal.sh     # must pass before the GPU call
#
# The venv lives in the git-ignored .rehearsal/venv (about 6 GB, most of it the CUDA libraries torch 2.11 loads;
# built once in a few minutes, reused while the package list below is unchanged). Before the wheels are installed
# the venv must lack what the image lacks (ftfy, open_clip, zstandard, diffusers): checked. Outputs in .rehearsal/out.
# Environment: PYTHON312 = a python3.12 (default: python3.12 on PATH, else pyenv's newest 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REH=$ROOT/.rehearsal
VENV=$REH/venv
# The image's packages we import (directly, or the test helpers the suite reuses), pinned where the image pins them;
# unpinned ones are unpinned there too (pip takes what the pinned ones accept).
IMAGE_PACKAGES=(torch==2.11.0 numpy==2.5.2 safetensors==0.8.0 sentencepiece==0.2.2 transformers==5.17.0
  tokenizers==0.23.2 einops regex pillow tqdm requests filelock huggingface-hub pyyaml pytest)
ABSENT=(ftfy open_clip zstandard diffusers)  # not on the image: they may only come from .whl/

find_py312() {
  # the first candidate that runs (pyenv's shim for python3.12 exists but fails unless 3.12 is selected)
  local p
  for p in "${PYTHON312:-}" python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null \
      | sort -rV); do
    [ -n "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$p"; return; }
  done
  echo "device_rehearsal: no python3.12 found (set PYTHON312)" >&2
  exit 2
}

stamp="${IMAGE_PACKAGES[*]}"
if [ ! -x "$VENV/bin/python3" ] || [ "$(cat "$VENV/.image_packages" 2>/dev/null)" != "$stamp" ]; then
  PY312=$(find_py312)
  echo "== building $VENV with $("$PY312" -V) and the image's packages (once; a few minutes)"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q --upgrade pip
  nice -n 10 "$VENV/bin/python3" -m pip install -q "${IMAGE_PACKAGES[@]}"
  echo "$stamp" > "$VENV/.image_packages"
fi
"$VENV/bin/python3" - "${ABSENT[@]}" <<'EOF'
import importlib.util, sys
present = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"device_rehearsal: the venv has {present}, which the GPU image lacks: rebuild it (rm -r .rehearsal/venv)")
import torch
print(f"device_rehearsal: venv python {sys.version.split()[0]}, torch {torch.__version__}; absent as on the image: "
      f"{', '.join(sys.argv[1:])}")
EOF
ls .whl/*.whl >/dev/null 2>&1 || { echo "device_rehearsal: no .whl/; run scripts/download_wheels.sh first" >&2; exit 2; }

# ---- the device command, CPU dry-run mode, the device's timeouts; python3 is the venv's, nothing else on the path
rm -rf "$REH/out"
mkdir -p "$REH/out"
t0=$(date +%s)
set +e
env -i HOME="$HOME" PATH="$VENV/bin:/usr/bin:/bin" TMPDIR="${TMPDIR:-/tmp}" OUT="$REH/out" OMP_NUM_THREADS=2 \
  bash scripts/gpu_all.sh --cpu
code=$?
set -e
echo "device_rehearsal: scripts/gpu_all.sh --cpu exit $code in $(( $(date +%s) - t0 )) s; outputs in $REH/out"
exit $code
