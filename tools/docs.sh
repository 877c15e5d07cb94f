#!/usr/bin/env bash
# Build the docs site into _site/ from the notebooks (see tools/docs.py), offline: open _site/index.html.
# With --check, then run the browser test (tests/test_docs.py) in headless Chromium, installing Debian's chromium
# with apt-get where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 tools/docs.py sync --check
python3 tools/docs.py build
if [ "${1:-}" = --check ]; then
  if ! command -v chromium >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "could not install chromium: the browser test will skip"
  fi
  python3 -m pytest -q -p no:cacheprovider tests/test_docs.py
fi
