#!/usr/bin/env bash
# Create .venv in the repository root and install medsam3 into it (idempotent; fast when up to date).
# TORCH_SPEC overrides the PyTorch pair installed first (any torch>=2.4 with its torchvision works).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
stamp=.venv/.medsam3-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing PyTorch ($TORCH_SPEC) ..."
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC
fi
echo "installing medsam3 and its dependencies ..."
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
