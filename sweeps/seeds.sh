#!/usr/bin/env bash
# Supervised-only against the full method (row VIII) over three seeds at split 1/8 (SEEDS=... for others).
#   bash sweeps/seeds.sh try
#   bash sweeps/seeds.sh bench          # the embedded benchmark, plus the ceiling: SupOnly with every label, seed 1
#   SEEDS=1,2,3,4,5 bash sweeps/seeds.sh paper hydra/launcher=slurm
# then: python -m dcc.report seeds   (bench: also python -m dcc.report seeds_ceiling)
set -euo pipefail
SEEDS="${SEEDS:-1,2,3}"
SWEEP=(loss=suponly,ablation_viii split=1_8)
source "$(dirname "$0")/_common.sh"
run_sweep seeds "$@"
if [[ "${1:-}" == bench ]]; then  # the ceiling of the benchmark: every label, supervised only, seed 1
    SEEDS=1
    SWEEP=(loss=suponly split=full)
    run_sweep seeds_ceiling "$@"
fi
