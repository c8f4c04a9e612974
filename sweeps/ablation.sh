#!/usr/bin/env bash
# Table 3 of the paper: SupOnly, ST and ablation rows I-VIII at split 1/8, one job per row.
#   bash sweeps/ablation.sh try                       # the embedded dataset, a few minutes per row on a CPU
#   bash sweeps/ablation.sh                           # the embedded dataset, its preset's budget
#   bash sweeps/ablation.sh paper dataset.root=/data hydra/launcher=slurm   # VOC, DeepLabv3+ R50, SLURM
#   SEEDS=1,2,3 bash sweeps/ablation.sh try           # mean and std over three seeds
# then: python -m dcc.report ablation
set -euo pipefail
# the long jobs first (ST trains twice, rows I-VIII see two views), SupOnly last: a pool (`bench`) then ends evenly;
# the report orders the rows as Table 3 does
SWEEP=(loss=st,ablation_i,ablation_ii,ablation_iii,ablation_iv,ablation_v,ablation_vi,ablation_vii,ablation_viii,suponly split=1_8)
source "$(dirname "$0")/_common.sh"
run_sweep ablation "$@"
