#!/usr/bin/env bash
# Download into .whl/ the wheels that tools/gpu-check.sh installs on a GPU machine with no network: the packages this
# library, its tests and its benchmarks import that a CUDA image with torch, torchvision, timm, pandas, scikit-learn,
# matplotlib, rich, anyio and pytest lacks. Versions are pinned to the ones installed here (so run it where the CPU
# suite passes), for CPython 3.12 on x86-64 Linux. Run it where pip reaches the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# fastai and what it imports at import time (fastprogress imports fasthtml.common, which imports starlette and
# friends; fasttransform needs plum-dispatch and beartype); bitsandbytes; the peers the tests compare with. Every one
# is installed by `bash tools/install.sh dev` (tests/test_tools.py checks it): sniffio no longer is, and anyio on the
# GPU image does not need it.
PACKAGES=(fastai fastcore fastprogress fastdownload fasttransform plum-dispatch beartype
          python-fasthtml starlette itsdangerous python-multipart
          bitsandbytes lion-pytorch torch-optimi pytorch_optimizer schedulefree sophia-opt)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
    { echo "gpu-wheels: $name is not installed here; install the dev extra first (bash tools/install.sh dev)"; exit 1; }
  pins+=("$name==$version")
done
if [ "${GPU_WHEELS_RESOLVE_ONLY:-0}" = 1 ]; then printf '%s\n' "${pins[@]}"; exit 0; fi  # the pins, no download
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
size_kib=$(du -sk .whl | cut -f1)
echo "gpu-wheels: ${#pins[@]} wheels, $((size_kib / 1024)) MiB in .whl/ (the device tool carries at most 64 MiB with the checkout)"
[ "$size_kib" -lt $((60 * 1024)) ] || { echo "gpu-wheels: too large to carry"; exit 1; }
