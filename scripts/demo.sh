#!/usr/bin/env bash
# Set up, then prune 25% of the bundled reference model's experts with REAP and report size
# and per-domain perplexity before/after, measured with the default evaluation protocol (the
# same one `moe-compress eval` and the recipes use: 128 windows of 256 tokens of each domain's
# test split). Offline, CPU only. Extra arguments are passed on (e.g. --quiet, --threads 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1
.venv/bin/moe-compress prune "${MODEL:-ref-mixtral}" --method reap --ratio 0.25 --budget global \
  --calib bundled --samples 64 --seq-len 256 --eval bundled \
  --out "runs/${MODEL:-ref-mixtral}-reap-0.25" --overwrite "$@"
