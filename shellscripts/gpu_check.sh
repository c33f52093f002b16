#!/usr/bin/env bash
# One GPU session for issue 11: (1) `check`: correctness of the CUDA paths against the tiny
# reference arrays, fp32 with TF32 off (~1 min); (2) `bench`: issue 11's table,
# `scripts/benchmark.py --device cuda` (~6 min); (2b) `cli`: its CLI row alone (~70 s);
# (2c) `sdxl`: its SDXL UNet rows (at most 200 s); (2d) `card24`: a 4096² run within 24 GB,
# eager and with CUDA graphs (at most 420 s); (2e) `compiled`: the 1024² sample with
# `--compile`, the whole loop (at most 300 s);
# (3) `speed`, `stored`, `verify`, `graphs`, `layouts`, `host`, `eager`, `weights`,
# `autotune`:
# where the time goes, `scripts/gpu_speed.py` (at most 530 s each). The arguments pick the
# parts (default: check bench; one device command has 10 minutes, so `speed` runs alone, the
# others beside `check` or `cli`). Runs with the machine's python3 (no venv): the repository
# goes on PYTHONPATH. Logs and JSON go to $OUT (./gpu_out).
#
#   SCALECRAFTER_REF=shared_ref OUT=/tmp/out bash shellscripts/gpu_check.sh [check] [bench] [cli] \
#     [sdxl] [card24] [compiled] [speed] [stored] [verify] [graphs] [layouts] [host] [eager] [weights] [autotune]
#
# SCALECRAFTER_REF: a folder laid out as ../shared/reference (it needs tiny/; default
# ./shared_ref). Each part runs under its own timeout; one failing does not stop the next.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# a misspelt part would cost a machine's start and bring nothing back: refused before anything
KNOWN=" check bench cli sdxl card24 compiled speed stored verify graphs layouts host eager weights autotune "
for part in ${*:-check bench}; do
  if [[ "$KNOWN" != *" $part "* ]]; then
    echo "gpu_check: unknown part '$part'; the parts:$KNOWN" >&2
    exit 2
  fi
done
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SCALECRAFTER_REF="${SCALECRAFTER_REF:-$ROOT/shared_ref}"
export PYTHONUNBUFFERED=1
START=$SECONDS
say() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }

say "repo $ROOT, reference $SCALECRAFTER_REF, python $($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi -L 2>&1 | tee -a "$OUT/summary.txt"
# Imports the repository needs, in one process; a missing one is named here, and the parts that
# need it fail or skip with their own message (open_clip_torch only matters for the CLI runs).
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import importlib
for mod in ("torch", "numpy", "omegaconf", "einops", "safetensors", "tqdm", "PIL", "scipy",
            "lightning_fabric", "open_clip"):
    try:
        importlib.import_module(mod)
    except Exception as err:
        print(f"MISSING python module {mod!r}: {type(err).__name__}: {err} "
              "(install its wheel; see requirements.txt)")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
      torch.cuda.is_available())
EOF

PARTS=" ${*:-check bench} "
wants() { [[ "$PARTS" == *" $1 "* ]]; }

# (1) fp32 correctness on CUDA, TF32 off (budget: 60 s)
if wants check; then
say "part 1: scripts/gpu_check.py (log: $OUT/gpu_check.log)"
NVIDIA_TF32_OVERRIDE=0 timeout 60 "$PY" scripts/gpu_check.py >"$OUT/gpu_check.log" 2>"$OUT/gpu_check.err"
status=$?
grep -E '^(PASS|FAIL|SKIP|gpu_check)' "$OUT/gpu_check.log" | tee -a "$OUT/summary.txt"
[ $status -eq 124 ] && say "part 1 stopped at its 60 s timeout"
say "part 1 exit status $status (number of failed checks)"
fi

# (2) issue 11's table (budget: 400 s; each case at most 150 s, in its own process; the JSON is
# rewritten after every case, so a timeout keeps what was measured). The random full-size
# checkpoint of the CLI row goes to a temporary folder (TMPDIR), never to $OUT.
if wants bench; then
say "part 2: scripts/benchmark.py --device cuda (log: $OUT/bench_gpu.log)"
timeout 400 "$PY" scripts/benchmark.py --device cuda --case-timeout 150 \
  --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.md" 2>"$OUT/bench_gpu.log"
status=$?
[ $status -eq 124 ] && say "part 2 stopped at its 400 s timeout (bench_gpu.json has the cases done)"
if [ -s "$OUT/bench_gpu.md" ]; then
  tee -a "$OUT/summary.txt" <"$OUT/bench_gpu.md"
elif [ -s "$OUT/bench_gpu.json" ]; then
  "$PY" scripts/benchmark_gpu.py "$OUT/bench_gpu.json" | tee -a "$OUT/summary.txt"
fi
[ $status -ne 0 ] && tail -n 3 "$OUT/bench_gpu.log" | tee -a "$OUT/summary.txt"
say "part 2 exit status $status; done in $((SECONDS - START)) s"
fi

# (2b) `cli` and (2c) `sdxl`: one item of the table alone, `benchmark.py --only ITEM`
# (JSON and markdown named after it). `cli`: the seed's command twice with one random
# checkpoint (the second run is the figure; the first may read libraries from a cold disk),
# ~70 s. `sdxl`: the SDXL UNet CFG-call rows (1024², 2048²; a 10 GB model, each case in its
# own process), which run 2 had no time left for.
bench_item() {  # item, budget s, case timeout s
  say "part $1: scripts/benchmark.py --device cuda --only $1 (log: $OUT/$1.log)"
  timeout "$2" "$PY" scripts/benchmark.py --device cuda --only "$1" --case-timeout "$3" \
    --json "$OUT/$1.json" >"$OUT/$1.md" 2>"$OUT/$1.log"
  local status=$?
  if [ ! -s "$OUT/$1.md" ] && [ -s "$OUT/$1.json" ]; then  # stopped by its timeout: the cases done
    "$PY" scripts/benchmark_gpu.py "$OUT/$1.json" >"$OUT/$1.md" 2>>"$OUT/$1.log"
  fi
  tee -a "$OUT/summary.txt" <"$OUT/$1.md"
  [ $status -ne 0 ] && tail -n 3 "$OUT/$1.log" | tee -a "$OUT/summary.txt"
  say "part $1 exit status $status; done in $((SECONDS - START)) s"
}
wants cli && bench_item cli 150 140
wants sdxl && bench_item sdxl 200 95
# (2d) `card24`: the 4096² experimental preset (3 steps, 2 dilated) within a 24 GB
# per-process limit, decode on its default budget: eager, then compiled with CUDA graphs
# (whose private pool the decode budget must leave out); at most 420 s, the eager case first.
wants card24 && bench_item card24 420 250
# (2e) `compiled`: the plain 1024² 50-step sample, the whole loop, with `--compile`'s UNet
# (channels-last conv weights on CUDA since run 7); its compile (~80 s) is not timed; at most
# 300 s.
wants compiled && bench_item compiled 300 280

# (3) where the time goes: gpu_speed.py's part sets `speed` (the sampling and CLI targets,
# torch.compile, the decode as txt2img runs it), `stored` (the decode with torch's default
# pinned allocations, and storing every layer's tiles) and `verify` (after run 3: the decode
# with and without threaded pinning, torch.compile with freezing), `graphs` (after run 4:
# torch.compile with CUDA graphs), `layouts` (the plain compile, channels-last frozen, and
# that with CUDA graphs, in one process), `host` (after run 5: the plain compile, with static
# sizes, CUDA graphs on both, and Inductor's C++ wrapper, in one process), `eager` (after run 6: the eager call as it runs, NCHW throughout, and with
# channels-last conv weights; at most 90 s) and `weights` (after run 6: the plain compile,
# with channels-last conv weights, and that with CUDA graphs, in one process; at most 360 s)
# and `autotune` (after run 6: static sizes and CUDA graphs, with Inductor's coordinate-descent
# tuning, and with max-autotune, in one process; at most 500 s);
# budget 530 s each, each part has its own timeout inside
for set in speed stored verify graphs layouts host eager weights autotune; do
if wants $set; then
say "part 3 ($set): scripts/gpu_speed.py --parts $set (log: $OUT/$set.log)"
timeout 530 "$PY" scripts/gpu_speed.py --parts $set --json "$OUT/$set.json" \
  >"$OUT/$set.md" 2>"$OUT/$set.log"
status=$?
[ $status -eq 124 ] && say "part 3 ($set) stopped at its 530 s timeout ($set.json has the parts done: scripts/gpu_speed.py --summarize reports them)"
tee -a "$OUT/summary.txt" <"$OUT/$set.md"
say "part 3 ($set) exit status $status; done in $((SECONDS - START)) s"
fi
done
