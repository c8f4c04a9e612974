#!/usr/bin/env bash
# Optuna (TPE, fixed seed) over lambda, gamma and tau of the full method at split 1/8, maximising the
# validation mIoU; the study persists in optuna.db: the same command continues it.
#   bash sweeps/optuna.sh try hydra.sweeper.n_trials=8      # on a CPU
#   bash sweeps/optuna.sh bench     # the embedded benchmark's study (docs/embedded-benchmark.md): 7 trials, two at a time
#   bash sweeps/optuna.sh paper hydra/launcher=slurm hydra.sweeper.n_jobs=8
# the best parameters: printed at the end, in multirun/<date>/<time>/optimization_results.yaml and in
# the sweep's MLflow run; the trials: python -m dcc.report lambda_gamma_tau
set -euo pipefail
conf="$(dirname "$0")/../conf/config.yaml"
# hparams_search is selected with "+" while the entry config does not list the group
if grep -q "hparams_search:" "$conf"; then search=hparams_search=lambda_gamma_tau; else search=+hparams_search=lambda_gamma_tau; fi
SWEEP=("$search" loss=ablation_viii split=1_8)
source "$(dirname "$0")/_common.sh"
# bench: two trials at a time (the next starts as soon as one ends), 7 trials (trial 0: the preset's values;
# about 60 min), TPE after 4 of them; lambda up to 1 and tau up to 0.5 (lambda 1.0 collapsed on this benchmark,
# 0.3 was already 2.4 points worse than 0.1; docs/embedded-benchmark.md). Later overrides win.
BENCH_JOBS=(hydra.sweeper.n_jobs=2 hydra.sweeper.n_trials=7 hydra.sweeper.sampler.n_startup_trials=4
            'hydra.sweeper.params={loss.weight:"tag(log, interval(0.02, 1.0))",loss.temperature:"tag(log, interval(0.05, 0.5))"}')
run_sweep lambda_gamma_tau "$@"
