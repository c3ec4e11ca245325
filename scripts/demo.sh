#!/usr/bin/env bash
# The offline demo study: MiniLM teacher fine-tuned on real SST-2 rows, a 2-layer student
# from its first fine-tuned layers, racing seeds then held-out seeds for the answer,
# embedded storage (./kdsearch.db) and artifacts (./kdsearch-artifacts).
# Re-running it attaches to the finished study and prints its tables again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
start=$(date +%s)
.venv/bin/kdsearch study create studies/demo-sst2.yaml
.venv/bin/kdsearch worker --study demo-sst2
.venv/bin/kdsearch status --study demo-sst2 --configurations
echo "study: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
cat <<'NEXT'

Next, from this folder (no activation needed):
  .venv/bin/kdsearch status --study demo-sst2                 # every trial, then the answer
  .venv/bin/kdsearch report --study demo-sst2 --out report/   # the paper's table and a Pareto plot
  .venv/bin/kdsearch export --study demo-sst2 --out students/demo   # the answer as a Hugging Face model
  .venv/bin/kdsearch dashboard                                # optuna-dashboard on http://127.0.0.1:8080
NEXT
