#!/usr/bin/env bash
# The positive-filtering threshold gamma (loss.pos_threshold, Eq. 7; the paper uses 0.75), full method, split 1/8.
#   bash sweeps/gamma.sh try
#   bash sweeps/gamma.sh paper hydra/launcher=slurm
# then: python -m dcc.report gamma
set -euo pipefail
SWEEP=(loss=ablation_viii split=1_8 loss.pos_threshold=0.0,0.5,0.6,0.7,0.75,0.8,0.9,0.95)
source "$(dirname "$0")/_common.sh"
run_sweep gamma "$@"
