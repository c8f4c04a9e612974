#!/usr/bin/env bash
# Table 3: every ablation row at one split. Extra arguments are passed to run.py, e.g. a CPU budget:
#   bash sweeps/ablation.sh trainer.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
exec python run.py -m loss=suponly,st,ablation_i,ablation_ii,ablation_iii,ablation_iv,ablation_v,ablation_vi,ablation_vii,ablation_viii "$@"
