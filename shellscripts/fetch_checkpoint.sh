#!/usr/bin/env bash
# Downloads a checkpoint into checkpoints/ if missing. Usage: fetch_checkpoint.sh [FILE URL SIZE];
# without arguments, the SD 2.1 base checkpoint (the one the seed uses).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CKPT="$ROOT/checkpoints/${1:-v2-1_512-ema-pruned.ckpt}"
URL="${2:-https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.ckpt}"
SIZE="${3:-5.2 GB}"
[ -s "$CKPT" ] && exit 0
mkdir -p "$ROOT/checkpoints"
echo "[ckpt] downloading $(basename "$CKPT") ($SIZE) ..." >&2
if command -v curl >/dev/null && curl -fL --connect-timeout 20 --retry 2 -o "$CKPT.partial" "$URL"; then
  mv "$CKPT.partial" "$CKPT"
elif command -v wget >/dev/null && wget --timeout=20 --tries=2 -O "$CKPT.partial" "$URL"; then
  mv "$CKPT.partial" "$CKPT"
else
  rm -f "$CKPT.partial"
  cat >&2 <<MSG
[ckpt] could not download the checkpoint (no network?). Fetch it by hand on a machine with
       network access and copy it here:
         $URL
         -> $CKPT
MSG
  exit 1
fi
