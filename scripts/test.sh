#!/usr/bin/env bash
# Set up (if needed), lint with ruff, and run the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the full-size conversion proof).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Tests marked needs_data read ../shared/data (or $MEDSAM3_DATA): without it they skip, or fail the run when
# MEDSAM3_REQUIRE_DATA=1 (CI). `-m "not needs_data"` runs only the tests that work without it.
if [ ! -d "${MEDSAM3_DATA:-../shared/data}" ]; then
  echo "note: sample data not found at ${MEDSAM3_DATA:-../shared/data} (set MEDSAM3_DATA): the tests" \
    "marked needs_data will skip (and fail with MEDSAM3_REQUIRE_DATA=1)" >&2
fi
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
