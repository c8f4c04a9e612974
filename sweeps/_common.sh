# Sourced by the sweep scripts of this directory: runs `python run.py -m` in the current directory (the
# launch directory: mlflow.db, runs/ and multirun/ are written there; usually the repository root) with
# the script's sweep (the array SWEEP), named after it (hydra.job.name: the MLflow parent run, the
# SLURM job name and `python -m dcc.report <name>`), plus a budget profile and the user's overrides:
#
#   bash sweeps/<name>.sh [try|bench|paper] [overrides...]
#
#   (no profile)  the config's own budget: the default preset digits_cpu (600 steps per job)
#   try           profile=try (conf/profile/try.yaml): a few minutes on a CPU, 40 steps per job
#   bench         profile=bench (conf/profile/bench.yaml), the embedded benchmark (docs/embedded-benchmark.md):
#                 1,500 steps per job, consistency loss from step 300, 1-thread jobs, run here as a pool of two
#                 (the local launcher: the next job starts as soon as one ends)
#   paper         the paper's setting: the preset conf/experiment/$EXPERIMENT.yaml (default
#                 voc_deeplabv3plus_r50: Pascal VOC, DeepLabv3+ ResNet-50, the authors' schedule); add the
#                 data and weights (dataset.root=... backbone.weights=...) and a launcher (hydra/launcher=slurm)
#   SEEDS=1,2,3   environment variable: every job of the sweep for each of these seeds (replicates: trainer.seed,
#                 which split.seed follows, so each replicate has its own labeled subset, shared by every arm)
#   PYTHON=...    the interpreter (default: python)
#
# Any override can follow, e.g. hydra/launcher=slurm, hydra/launcher=local hydra.sweeper.max_batch_size=2,
# logger.tracking_uri=http://host:5000, trainer.max_steps=200.

# the budget profiles are the config group conf/profile/ (python run.py profile=bench ... is one bench job by hand)
TRY=(profile=try)
BENCH=(profile=bench)
# how `bench` runs two jobs at a time: the whole sweep as one batch, run as a pool of two by the local launcher
# (a script whose sweeper is Optuna's sets BENCH_JOBS=(hydra.sweeper.n_jobs=2) after sourcing this file)
BENCH_JOBS=(hydra.sweeper.max_batch_size=null hydra.launcher.max_parallel=2)
PAPER=("experiment=${EXPERIMENT:-voc_deeplabv3plus_r50}")

run_sweep() {
    local name="$1"; shift
    local extra=()
    case "${1:-}" in
        try) extra=("${TRY[@]}"); shift ;;
        bench) extra=("${BENCH[@]}" "${BENCH_JOBS[@]}"); shift ;;
        paper) extra=("${PAPER[@]}"); shift ;;
    esac
    if [[ -n "${SEEDS:-}" ]]; then
        extra+=("trainer.seed=${SEEDS}")
    fi
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    (set -x; "${PYTHON:-python}" "$root/run.py" -m hydra.job.name="$name" \
        "${SWEEP[@]}" "${extra[@]}" "$@")
}
