#!/usr/bin/env bash
# The main job: set up .venv/ if needed, then `stdit bench`: the quick benchmark suite on the best
# local device (CUDA if there is a GPU, else the CPU), written to reports/<device>/ (results.jsonl,
# README.md with tables, PNG plots). Arguments go to `stdit bench` (e.g. `--size full`); to run
# another command, name it first: `scripts/main.sh info`, `scripts/main.sh inspect`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
case "${1:-}" in
    bench|report|info|inspect|train|prepare|sample) exec .venv/bin/stdit "$@" ;;
    *)
        # the sample suite samples the CPU demo's trained models when they exist (bash scripts/demo.sh [v12]),
        # else seeded random weights (its quality cells say which); a --checkpoint(3) given here wins
        extra=()
        [[ -d runs/demo/stage3 && " $* " != *" --checkpoint "* ]] && extra+=(--checkpoint runs/demo)
        [[ -d runs/demo_v12/stage2 && " $* " != *" --checkpoint3 "* ]] && extra+=(--checkpoint3 runs/demo_v12)
        exec .venv/bin/stdit bench "${extra[@]}" "$@" ;;
esac
