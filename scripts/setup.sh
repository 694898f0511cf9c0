#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repository root with everything stdit needs on this machine.
# Idempotent: a second run only checks the pins. torch is pinned to the CPU build from the local
# wheel store *before* the project is installed, so pip never resolves a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_PIN=${STDIT_TORCH:-torch==2.13.0}
TRITON_PIN=${STDIT_TRITON:-triton==3.7.1}   # matches torch 2.13's CUDA build; used here by the interpreter

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.stdit-setup
want="$TORCH_PIN $TRITON_PIN $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import stdit.kernels" 2>/dev/null; then
    exit 0
fi
echo "[setup] installing $TORCH_PIN, $TRITON_PIN and stdit (editable, with the train and test extras)"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "$TORCH_PIN" "$TRITON_PIN"
"$VPY" -m pip install --quiet -e ".[train,test]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
