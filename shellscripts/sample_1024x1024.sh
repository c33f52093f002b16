#!/usr/bin/env bash
# The seed's 1024x1024 command: re-dilation 2 for the first 20 of 50 DDIM steps, skipping the
# outer 4 blocks. Pass extra flags through, e.g. --tiled_decoding --sync_gn.
source "$(dirname "$0")/env.sh"
bash shellscripts/fetch_checkpoint.sh
DEVICE="${DEVICE:-auto}"  # txt2img picks CUDA where available
outdir="${OUTDIR:-outputs/1024x1024}"
python scripts/txt2img.py \
  --prompt "A corgi sits on a beach chair on a beautiful beach, with palm trees behind, high details" \
  --ckpt checkpoints/v2-1_512-ema-pruned.ckpt \
  --config configs/stable-diffusion/v2-inference.yaml \
  --device "$DEVICE" \
  --ddim_eta 1 \
  --scale 9 --seed 51 --H 1024 --W 1024 \
  --dilate 2 --dilate_tau 20 --dilate_skip 4 \
  --n_iter 1 --n_samples 1 \
  --outdir "$outdir" "$@"
