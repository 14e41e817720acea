#!/usr/bin/env bash
# The carried wheels: what the device command needs beyond the GPU machine's image, downloaded here for its
# Python 3.12 / manylinux x86_64 into the git-ignored .whl/ (the image's package list: ../shared/device/packages.txt;
# nothing can be installed from a registry there). scripts/gpu_all.sh installs them with no index, no dependencies:
#
#   bash scripts/download_wheels.sh            # -> .whl/*.whl (about 12 MiB), then carry ".whl" with the device call
#
# What is carried and why (everything else the project imports is on the image, at the versions listed there):
#   ftfy + wcwidth   CLIP text cleaning (models/tokenizers.py): the cleaning open_clip and the original CLIP
#                    tokenizer apply (mojibake repair, ligatures, widths); token ids must match theirs.
#   zstandard        data/store.py's compressed shards (cache.compress = true).
#   diffusers        the reference side of bench/gpu_suite.py (ours vs diffusers); never imported by the trainer.
# Not carried: open_clip (its CLIP BPE vocabulary is bundled as models/assets/bpe_simple_vocab_16e6.txt.gz).
# diffusers' importlib_metadata requirement is for Python < 3.8 only; its other requirements are on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
WHEELS=(ftfy==6.3.1 wcwidth==0.2.13 zstandard==0.25.0 diffusers==0.42.1)
PY=${PYTHON:-python3}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop the whole install there
# one pip call per wheel: pip matches manylinux tags exactly, and a pure-Python wheel ignores them
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  name=${spec%%==*}
  ls "$DEST"/"${name}"-*.whl >/dev/null 2>&1 || { echo "download_wheels: no wheel for $spec" >&2; exit 1; }
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
limit=$((20 * 1024 * 1024))
ls -1 "$DEST"
echo "download_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST"
[ "$total" -le "$limit" ] || { echo "download_wheels: over the 20 MiB the device call can carry" >&2; exit 1; }
