#!/usr/bin/env bash
# Table 5 of the paper: the full method ("Semi", row VIII) against the weakly-supervised variant (+ image-level
# labels and C_w, Eq. 10-11), over three seeds (SEEDS=... for others).
#   bash sweeps/weakly.sh try                                   # embedded digits, split 1/8, 40 steps per job
#   bash sweeps/weakly.sh                                       # embedded digits, split 1/8, the demo budget
#   bash sweeps/weakly.sh paper hydra/launcher=slurm            # VOC classic protocol (1,464 + 9,118), ResNet-50
#   EXPERIMENT=voc_table5_vgg16_semi bash sweeps/weakly.sh paper hydra/launcher=slurm     # the VGG-16 rows
# then: python -m dcc.report weakly
set -euo pipefail
SEEDS="${SEEDS:-1,2,3}"
if [[ "${1:-}" == paper ]]; then
    EXPERIMENT="${EXPERIMENT:-voc_table5_r50_semi}"
    SWEEP=(loss=ablation_viii,weakly split=full)
else
    SWEEP=(loss=ablation_viii,weakly split=1_8)
fi
source "$(dirname "$0")/_common.sh"
run_sweep weakly "$@"
