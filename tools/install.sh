#!/usr/bin/env bash
# Install fastxtend_optim in editable mode: `bash tools/install.sh` for the library, `bash tools/install.sh dev` for
# the test extra too. torch stays the build you have (a CPU build, torch==2.13.0, if none): fastai depends on
# torchvision, and an unpinned resolve would swap torch for a multi-GB CUDA build to match the newest torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import torch' 2>/dev/null || python3 -m pip install torch==2.13.0
torch_version=$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')
target=.
[ "${1:-}" = dev ] && target='.[dev]'
python3 -m pip install -e "$target" "torch==$torch_version"
