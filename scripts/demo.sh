#!/usr/bin/env bash
# The CPU demo of staged training (issue: training): generated moving-shapes videos with captions,
# stage 1 (images) -> stage 2 (video, temporal attention zero-initialised) -> stage 3 (higher
# resolution), then a sampled video. A small VAE is fitted on the same data first (the demo has no
# pretrained one). About 6-12 minutes on an otherwise idle 2-core CPU; everything under runs/demo/.
# Re-running resumes each stage from its latest checkpoint (finished stages return at once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f runs/demo/data/captions.csv ]; then
    .venv/bin/python -m stdit.train.synthetic runs/demo/data --num-videos 48 --num-images 16 --frames 24 --size 96 96 --corrupt 2
fi
# A fitted VAE (the demo has no pretrained sd-vae-ft-ema): a random one would decode any sample to noise.
# Skipped when runs/demo/vae already holds a finished fit.
.venv/bin/stdit fit-vae --csv runs/demo/data/captions.csv --out runs/demo/vae --steps 500
.venv/bin/stdit train --config configs/demo/stage1.toml --config configs/demo/stage2.toml --config configs/demo/stage3.toml
.venv/bin/stdit sample --checkpoint runs/demo/stage3 --prompt "a red circle moving left to right on a dark blue background" \
    --out runs/demo/sample.mp4 --steps 50 --cfg-scale 4.0
echo "wrote runs/demo/sample.mp4 (training logs: runs/demo/stage*/log.csv; fixed-batch evaluation: runs/demo/stage*/eval.csv)"
