#!/usr/bin/env bash
# Tables 1-2 of the paper: supervised-only and the full method (row VIII) at splits 1/16, 1/8, 1/4 and full.
#   bash sweeps/splits.sh try
#   bash sweeps/splits.sh paper hydra/launcher=slurm           # Table 1, DeepLabv3+ ResNet-50
#   EXPERIMENT=voc_pspnet_r50 bash sweeps/splits.sh paper hydra/launcher=slurm
# then: python -m dcc.report splits
set -euo pipefail
SWEEP=(loss=suponly,ablation_viii split=1_16,1_8,1_4,full)
source "$(dirname "$0")/_common.sh"
run_sweep splits "$@"
