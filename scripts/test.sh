#!/usr/bin/env bash
# Set up (if needed), lint with ruff, and run the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the full-size conversion proof).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
