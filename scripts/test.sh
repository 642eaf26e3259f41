#!/usr/bin/env bash
# Set up, then run the default test suite (offline, CPU only), one pytest worker per core.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1
# Each worker computes with one thread: the tests' tensors are tiny, and two workers of two
# threads each on a 2-core machine spend their time waiting on each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Imports point one way: the contracts in pyproject.toml ([tool.importlinter]).
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -n auto --dist loadgroup "$@"
