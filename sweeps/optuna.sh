#!/usr/bin/env bash
# Optuna (TPE, fixed seed) over lambda, gamma and tau of the full method at split 1/8, maximising the
# validation mIoU; the study persists in optuna.db: the same command continues it.
#   bash sweeps/optuna.sh try hydra.sweeper.n_trials=8      # on a CPU
#   bash sweeps/optuna.sh bench hydra.sweeper.n_trials=12   # on the embedded benchmark, two trials at a time
#   bash sweeps/optuna.sh paper hydra/launcher=slurm hydra.sweeper.n_jobs=8
# the best parameters: printed at the end, in multirun/<date>/<time>/optimization_results.yaml and in
# the sweep's MLflow run; the trials: python -m dcc.report lambda_gamma_tau
set -euo pipefail
conf="$(dirname "$0")/../conf/config.yaml"
# hparams_search is selected with "+" while the entry config does not list the group
if grep -q "hparams_search:" "$conf"; then search=hparams_search=lambda_gamma_tau; else search=+hparams_search=lambda_gamma_tau; fi
SWEEP=("$search" loss=ablation_viii split=1_8)
source "$(dirname "$0")/_common.sh"
BENCH_JOBS=(hydra.sweeper.n_jobs=2)  # bench: two trials at a time (Optuna's sweeper has no max_batch_size)
run_sweep lambda_gamma_tau "$@"
