#!/usr/bin/env bash
# Supervised-only against the full method (row VIII) over three seeds at split 1/8 (the core issue's comparison).
#   bash sweeps/seeds.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python run.py -m loss=suponly,ablation_viii split=1_8 trainer.seed=1,2,3 "$@"
