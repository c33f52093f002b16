#!/usr/bin/env bash
# SDXL base 1.0 at 4096x4096 with the sdxl_4096x4096 preset (the authors' settings: progressive
# re-dilation and noise-damped CFG for 35 of 50 steps, DDIM eta 1, scale 5, FreeU, SyncGN tiled
# decoding).
# Needs a large GPU (see README: SDXL). Pass extra flags through, e.g. --preset
# sdxl_4096x4096_disperse or --steps 30.
source "$(dirname "$0")/env.sh"
bash shellscripts/fetch_checkpoint.sh sd_xl_base_1.0.safetensors \
  https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors \
  "6.9 GB"
DEVICE="${DEVICE:-auto}"  # txt2img picks CUDA where available
outdir="${OUTDIR:-outputs/sdxl_4096x4096}"
python scripts/txt2img.py \
  --preset sdxl_4096x4096 \
  --prompt "A corgi sits on a beach chair on a beautiful beach, with palm trees behind, high details" \
  --ckpt checkpoints/sd_xl_base_1.0.safetensors \
  --config configs/stable-diffusion/sd_xl_base.yaml \
  --device "$DEVICE" \
  --seed 51 \
  --n_iter 1 --n_samples 1 \
  --outdir "$outdir" "$@"
