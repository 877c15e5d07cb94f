#!/usr/bin/env bash
# Every test: the notebooks' own tests (nbdev-test) and the cross-notebook pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
nbdev-test --n-workers 2
python3 -m pytest tests -q -p no:cacheprovider
