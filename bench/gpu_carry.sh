#!/usr/bin/env bash
# Prepares what bench/gpu_check.py needs on a lent GPU machine that has torch, torchvision
# and pynvml but not catkd's storage libraries (it reaches no package registry): the
# cp312 wheels of zarr, numcodecs, webdataset and their small dependencies, at the
# versions of constraints.txt, in .whl/ (git ignores it; the device tool carries it).
#
#   bash bench/gpu_carry.sh                  # here: fills .whl/ (11 MB)
#   bash bench/gpu_carry.sh --install-there  # there: installs them under /tmp/site
#
# The check itself, there, in one command:
#   bash bench/gpu_carry.sh --install-there && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py \
#       --work /tmp/gpu_check --out docs/results/gpu_check_h200.json
# For the Ray path (--ray) Ray must be there too: ../shared/device/pack-ray.sh packs it,
# and Ray Train needs pyarrow, which does not fit in the same 64 MiB carry; without Ray
# the figures come from the in-process path, and the JSON says so.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PACKAGES="zarr numcodecs webdataset braceexpand donfig google-crc32c fsspec typing_extensions packaging PyYAML tqdm"

if [[ "${1:-}" == "--install-there" ]]; then
  missing=()
  for pkg in zarr numcodecs webdataset fsspec yaml tqdm; do
    python3 -c "import $pkg" 2>/dev/null || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    python3 -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target /tmp/site $PACKAGES
  fi
  PYTHONPATH=/tmp/site python3 -c "import zarr, numcodecs, webdataset, torch, torchvision; print('gpu_carry: zarr', zarr.__version__, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available())"
  exit 0
fi

mkdir -p "$WHEELS"
pins=()
for pkg in $PACKAGES; do
  pin=$(grep -i "^${pkg//_/[-_]}==" constraints.txt || true)
  pins+=("${pin:-$pkg}")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" "${pins[@]}"
du -sh "$WHEELS"
