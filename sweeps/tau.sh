#!/usr/bin/env bash
# The temperature tau of the contrastive loss (loss.temperature; the authors use 0.1), full method, split 1/8.
#   bash sweeps/tau.sh try
#   bash sweeps/tau.sh paper hydra/launcher=slurm
# then: python -m dcc.report tau
set -euo pipefail
SWEEP=(loss=ablation_viii split=1_8 loss.temperature=0.05,0.07,0.1,0.2,0.5,1.0)
source "$(dirname "$0")/_common.sh"
run_sweep tau "$@"
