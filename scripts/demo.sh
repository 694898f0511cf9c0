#!/usr/bin/env bash
# The CPU demo of staged training: generated shapes (still images for stage 1, 16-frame
# moving-shape clips for stages 2 and 3) with captions, stage 1 (images) -> stage 2 (video, temporal attention
# zero-initialised) -> stage 3 (higher resolution), then a sampled video and its frames as one PNG.
# A small VAE is fitted on the same data first (the demo has no pretrained one). About 13 minutes on an
# otherwise idle 2-core CPU; everything goes under runs/demo/ (delete that folder to start over).
# Re-running resumes: finished data, VAE, caches and stages are reused, a stage resumes from its latest checkpoint.
# `bash scripts/demo.sh v12`: the Open-Sora 1.2 variant on the same data and VAE: STDiT3-demo with rectified
# flow, images then videos in resolution / aspect / frame-count buckets with random conditioning masks
# (configs/demo_v12/), then a rectified-flow sample; under runs/demo_v12/.
set -euo pipefail
VARIANT=${1:-v10}
case "$VARIANT" in v10|v12) ;; *) echo "usage: bash scripts/demo.sh [v10|v12]" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
D=runs/demo
PROMPT=${PROMPT:-"a red circle moving left to right on a dark blue background"}
start=$(date +%s)
if [ ! -f $D/videos/captions.csv ]; then
    .venv/bin/python -m stdit.train.synthetic $D/videos --num-videos 96 --num-images 0 --frames 16 --size 96 96 \
        --corrupt 2 --vocabulary simple
fi
if [ ! -f $D/images/captions.csv ]; then
    .venv/bin/python -m stdit.train.synthetic $D/images --num-videos 0 --num-images 256 --size 96 96 \
        --vocabulary simple --seed 1
fi
# A fitted VAE (no pretrained sd-vae-ft-ema here): a random one would decode any sample to noise.
# Skipped when $D/vae already holds a finished fit.
.venv/bin/stdit fit-vae --csv $D/videos/captions.csv $D/images/captions.csv --out $D/vae --steps 500
if [ "$VARIANT" = v12 ]; then
    V=runs/demo_v12
    .venv/bin/stdit train --config configs/demo_v12/stage1.toml --config configs/demo_v12/stage2.toml
    # rectified flow, 30 steps, at the largest bucket (8 x 64 x 64); guidance 2 as in the v1.0 demo
    .venv/bin/stdit sample --checkpoint $V/stage2 --prompt "$PROMPT" --out $V/sample.mp4 --sheet $V/sample.png \
        --cfg-scale 2.0
    secs=$(( $(date +%s) - start ))
    echo "demo (v12) done in $secs s: $V/sample.mp4 and its frames side by side in $V/sample.png"
    echo "training logs: $V/stage*/log.csv; fixed-batch evaluation (live and EMA weights): $V/stage*/eval.csv"
    exit 0
fi
.venv/bin/stdit train --config configs/demo/stage1.toml --config configs/demo/stage2.toml --config configs/demo/stage3.toml
# guidance 2: at 4-7 this small model's samples over-saturate into speckles
.venv/bin/stdit sample --checkpoint $D/stage3 --prompt "$PROMPT" --out $D/sample.mp4 --sheet $D/sample.png \
    --steps 50 --cfg-scale 2.0
secs=$(( $(date +%s) - start ))
.venv/bin/python scripts/demo_report.py $D $D/report --seconds $secs --prompt "$PROMPT" >/dev/null
echo "demo done in $secs s: $D/sample.mp4 and its frames side by side in $D/sample.png; summary in $D/report/README.md"
echo "training logs: $D/stage*/log.csv; fixed-batch evaluation (live and EMA weights): $D/stage*/eval.csv"
