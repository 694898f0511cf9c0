#!/usr/bin/env bash
# The main job: set up .venv/ if needed, then run `stdit info` (devices, versions, backends).
# Extra arguments go to `stdit` instead (e.g. `scripts/main.sh inspect`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- info; fi
exec .venv/bin/stdit "$@"
