#!/usr/bin/env bash
# The weight lambda of the consistency loss (loss.weight; the authors' code uses 0.1), full method, split 1/8.
#   bash sweeps/lambda.sh try
#   bash sweeps/lambda.sh paper hydra/launcher=slurm
# then: python -m dcc.report lambda
set -euo pipefail
SWEEP=(loss=ablation_viii split=1_8 loss.weight=0.01,0.03,0.1,0.3,1.0,3.0)
source "$(dirname "$0")/_common.sh"
run_sweep lambda "$@"
