#!/usr/bin/env bash
# The GPU benchmark: full-size SAM3 architecture with random weights on one GPU (no download), one
# results file benchmarks/results/gpu_<GPU name>.md. Sections and options: benchmarks/gpu.sh --help.
#   benchmarks/gpu.sh              # needs CUDA; under 8 minutes on an H100
#   benchmarks/gpu.sh --dry-run    # every section on the tiny model on the CPU, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/bench_gpu.py "$@"
