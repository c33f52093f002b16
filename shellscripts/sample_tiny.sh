#!/usr/bin/env bash
# Offline smoke run: the tiny random-weight reference model, CPU, a few seconds.
source "$(dirname "$0")/env.sh"
python scripts/txt2img.py --prompt "A panda is surfing in the universe." \
  --config configs/tiny/tiny-sd21.yaml --ckpt ../shared/reference/tiny/tiny-sd21.ckpt \
  --H 256 --W 256 --steps 6 --ddim_eta 1 --scale 9 --seed 51 \
  --dilate 2 --dilate_tau 3 --dilate_skip 1 --tiled_decoding --overlap 8 --sync_gn \
  --n_iter 1 --n_samples 1 --precision full --device cpu --outdir outputs/tiny "$@"
