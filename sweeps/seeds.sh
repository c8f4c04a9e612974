#!/usr/bin/env bash
# Supervised-only against the full method (row VIII) over three seeds at split 1/8 (SEEDS=... for others).
#   bash sweeps/seeds.sh try
#   bash sweeps/seeds.sh bench          # the embedded benchmark, plus the ceiling: SupOnly with every label, seed 1
#   SEEDS=1,2,3,4,5 bash sweeps/seeds.sh paper hydra/launcher=slurm
# then: python -m dcc.report seeds   (bench: also python -m dcc.report seeds_ceiling)
#
# Row VIII comes first: its jobs are the long ones, started first by the two-job pool of `bench` so that the
# short ones fill the end. In `bench` the ceiling runs beside the grid from the start
# (three 1-thread jobs on two cores for its first part) instead of alone after it (timings in
# docs/embedded-benchmark.md).
set -euo pipefail
SEEDS="${SEEDS:-1,2,3}"
SWEEP=(loss=ablation_viii,suponly split=1_8)
source "$(dirname "$0")/_common.sh"
if [[ "${1:-}" == bench ]]; then  # the ceiling of the benchmark: every label, supervised only, seed 1
    (SEEDS=1
     SWEEP=(loss=suponly split=full 'hydra.sweep.dir=multirun/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}_ceiling')
     run_sweep seeds_ceiling "$@") &
    ceiling=$!
    run_sweep seeds "$@"
    wait "$ceiling"
else
    run_sweep seeds "$@"
fi
