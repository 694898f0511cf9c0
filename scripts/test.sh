#!/usr/bin/env bash
# The test suite: set up .venv/ if needed, then run pytest. Without a GPU the Triton kernels run
# through Triton's CPU interpreter (TRITON_INTERPRET=1); with one they run natively and the GPU-only
# tests run too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest "$@"
