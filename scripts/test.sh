#!/usr/bin/env bash
# Install everything, then lint and run the whole test suite (real PostgreSQL: a private
# throwaway server from the installed binaries, or $KDSEARCH_TEST_DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
