#!/usr/bin/env bash
# The seed's inference script: re-dilation 2 for the first 20 of 50 DDIM steps (eta 1, scale
# 9), skipping the outer 4 blocks; 3 batches of 3 images of its prompt, in results/. Extra
# flags pass through, e.g. --tiled_decoding --sync_gn, or --n_iter 1 --n_samples 1.
source "$(dirname "$0")/env.sh"
bash shellscripts/fetch_checkpoint.sh
DEVICE="${DEVICE:-auto}"  # txt2img picks CUDA where available
outdir="${OUTDIR:-results}"
python scripts/txt2img.py \
  --prompt "A panda is surfing in the universe." \
  --ckpt checkpoints/v2-1_512-ema-pruned.ckpt \
  --config configs/stable-diffusion/v2-inference.yaml \
  --device "$DEVICE" \
  --ddim_eta 1 \
  --scale 9 --seed 51 --H 1024 --W 1024 \
  --dilate 2 --dilate_tau 20 --dilate_skip 4 \
  --outdir "$outdir" "$@"
