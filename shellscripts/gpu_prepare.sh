#!/usr/bin/env bash
# Prepares what a lent GPU machine needs beside the repository (docs/benchmarks.md, "GPU
# runs"): the wheels its image lacks, in .whl/, and the tiny reference data, in shared_ref/.
# Both are ignored by git (.gitignore) and travel as the device call's `carry`.
# Run here, where pip reaches the package registry; the device machine reaches nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# the card's image: Python 3.12 with torch; these (pure Python) it lacks
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 omegaconf==2.4.0 wcwidth==0.9.4)
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl "${WHEELS[@]}"
rm -rf shared_ref && mkdir -p shared_ref
cp -r "${SCALECRAFTER_SHARED:-$ROOT/../shared}/reference/tiny" shared_ref/
du -sh .whl shared_ref | tr '\t' ' '
echo "carry: [\"shared_ref\", \".whl\"]; install there with:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
