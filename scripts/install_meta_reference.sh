#!/usr/bin/env bash
# Install Meta's reference SAM3 implementation (PyPI `sam3`) into .venv for the slow equivalence tests
# (`bash scripts/test.sh -m slow`). `--no-deps`: its pinned requirements would downgrade numpy and
# huggingface_hub; the packages it needs to import are listed explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q --no-deps "sam3>=0.1.4"
.venv/bin/python -m pip install -q "einops>=0.8" "iopath>=0.1.10" "portalocker>=2" "pycocotools>=2.0" \
  "psutil>=5.9" "timm>=1.0" "ftfy>=6" "regex" "scikit-image>=0.22"
