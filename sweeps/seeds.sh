#!/usr/bin/env bash
# Supervised-only against the full method (row VIII) over three seeds at split 1/8 (SEEDS=... for others).
#   bash sweeps/seeds.sh try
#   SEEDS=1,2,3,4,5 bash sweeps/seeds.sh paper hydra/launcher=slurm
# then: python -m dcc.report seeds
set -euo pipefail
SEEDS="${SEEDS:-1,2,3}"
SWEEP=(loss=suponly,ablation_viii split=1_8)
source "$(dirname "$0")/_common.sh"
run_sweep seeds "$@"
