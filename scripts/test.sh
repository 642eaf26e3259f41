#!/usr/bin/env bash
# Set up, then run the default test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
