#!/usr/bin/env bash
# Install everything, then lint and run the whole test suite (real PostgreSQL: a private
# throwaway server from the installed binaries, or $KDSEARCH_TEST_DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools some tests use: Debian's docker-compose (validates the compose file
# without a Docker engine) and headless Chromium (renders optuna-dashboard).
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} not installed; the tests that need them are skipped" >&2
  fi
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
