#!/usr/bin/env bash
# Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which is not installable offline).
# With --check, fail instead when README.md differs from what the notebook gives.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
jupyter nbconvert --log-level=ERROR --to markdown nbs/index.ipynb --output-dir "$out" --output README
# drop nbdev's directive lines (#| ...) that nbconvert keeps in code blocks; the notebook links its siblings
# (`03_distributed.ipynb`), which from the repository's root are under nbs/ (the docs site makes them pages)
grep -v '^#| ' "$out/README.md" | sed -E 's#\]\(([0-9]+[a-z0-9]*_[A-Za-z0-9_]+\.ipynb)#](nbs/\1#g' | cat -s > "$out/README.clean.md"
if [ "${1:-}" = --check ]; then
  diff -u README.md "$out/README.clean.md" || { echo "README.md is out of date: run bash tools/readme.sh"; exit 1; }
else
  cp "$out/README.clean.md" README.md
fi
rm -r "$out"
