#!/usr/bin/env bash
# The offline demo study: MiniLM teacher fine-tuned on real SST-2 rows, a 2-layer student
# from its first fine-tuned layers, 24 trials with seed replicates (racing), embedded
# storage (./kdsearch.db) and artifacts (./kdsearch-artifacts).
# Re-running it attaches to the finished study and prints its table again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/kdsearch study create studies/demo-sst2.yaml
.venv/bin/kdsearch worker --study demo-sst2
.venv/bin/kdsearch status --study demo-sst2
