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
[ "${1:-}" = dev ] || exit 0

# The test environment drops a torchvision that cannot import beside this torch (PyPI's CUDA build beside the CPU
# torch: `operator torchvision::nms does not exist`). While it is installed, transformers' model classes and Lightning
# (through torchmetrics) fail to import; without it they, fastai.basics/tabular/text and this library all work.
# fastai needs torchvision only for fastai.vision, which cannot import with this one either. See CONTRIBUTING.md.
why=$(python3 - <<'PY'
import importlib.util
if importlib.util.find_spec('torchvision') is not None:
    try: import torchvision
    except Exception as e: print(f'{type(e).__name__}: {e}'.strip().splitlines()[-1])
PY
)
if [ -n "$why" ]; then
    echo "install.sh: uninstalling torchvision, which cannot import beside torch $torch_version ($why);" \
         "fastai needs it only for fastai.vision, and transformers and Lightning cannot import while it is installed"
    python3 -m pip uninstall -y torchvision
fi
