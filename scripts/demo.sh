#!/usr/bin/env bash
# Set up, then `moe-compress fit` the bundled reference model into half its bytes: one calibration
# pass scores every (experts kept, bit width) choice per MoE layer, a knapsack solver allocates them
# under the budget, and the optimum, its neighbours and the single methods that fit (REAP alone,
# 8-bit / 4-bit alone) are raced on held-out text (KL / top-1 against the original). Prints what
# fit chose, its KL and top-1 against the best single method measured, and writes it with its
# report. Offline, CPU only. Extra arguments are passed on (e.g. --quiet, --threads 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1
.venv/bin/moe-compress fit "${MODEL:-ref-mixtral}" --target-ratio 0.5 --calib bundled --samples 64 --seq-len 256 \
  --out "runs/${MODEL:-ref-mixtral}-fit-0.5" --overwrite "$@"
