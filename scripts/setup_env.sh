#!/usr/bin/env bash
# Create .venv (once) and install moe-compress with pinned dependencies. Sourced by demo.sh/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU build, not a CUDA download.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
