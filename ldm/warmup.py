"""Warming up a device's libraries while the model loads.

A fresh CUDA process initialises cuBLAS, cuDNN and the fused attention kernels on their first
calls (and loads each kernel's module on its first use), which a single CLI run pays inside its
first text encode and first sampling step: 1.07 s and 0.98 s on an H200 (run 3's load probe,
docs/benchmarks.md). Loading spends seconds in Python with the device idle (importing the
text encoder's packages), so a background thread makes those first calls meanwhile, on small
tensors of the dtypes sampling and decoding use. It touches no model and no numbers. Off by
default on every device (`WARM_UPS`, below: run 5 measured no gain)."""
from typing import Iterable

import torch
import torch.nn.functional as F

from ldm.background import InBackground
from ldm.precision import AUTOCAST_DTYPES, attention_preferred

# Device types whose loads warm the libraries up, as scripts/gpu_speed.py's `warmup` part
# decides (a fresh process's load, first text encode and first steps, with and without). None
# yet: on an H200 (run 5, best of 2 each) load and first 2 steps took 11.83 s warmed up, 11.33 s
# not: the first two steps cost as much either way (2.46 s / 2.30 s), so what they pay is not
# the libraries' start-up that this warm-up touches (per-shape cuDNN autotuning, likely).
WARM_UPS = {}


def touch_libraries(device, dtypes: Iterable[torch.dtype], cudnn_attention: bool = False):
    """One small call of every kind a UNet step and a decode make, per dtype: convolution,
    GroupNorm, SiLU, LayerNorm, a linear layer, GELU, scaled-dot-product attention (cuDNN's
    first where sampling prefers it: SDPA's order is process-wide, and nothing else runs
    attention while a model loads). Waits for the device."""
    device = torch.device(device)

    def rand(dtype, *shape):
        return torch.randn(*shape, device=device).to(dtype)
    for dtype in dtypes:
        x = F.conv2d(rand(dtype, 2, 64, 16, 16), rand(dtype, 64, 64, 3, 3), padding=1)
        x = F.silu(F.group_norm(x, 32))
        tokens = F.layer_norm(x.flatten(2).transpose(1, 2), (64,))
        tokens = F.gelu(F.linear(tokens, rand(dtype, 64, 64)))
        heads = tokens.unflatten(-1, (1, 64)).transpose(1, 2)  # (batch, 1 head, 256, 64)
        with attention_preferred(cudnn_attention):
            F.scaled_dot_product_attention(heads, heads, heads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_warm_up(device, precision: str, cudnn_attention: bool, enabled=None):
    """touch_libraries for a model about to be loaded for `device` and `precision` (the dtype
    sampling computes in, and float32 for the VAE), started in a daemon thread: its
    InBackground, whose `result()` waits for it; None where `enabled` is False (None: WARM_UPS'
    choice for the device type)."""
    kind = torch.device(device).type
    if not (WARM_UPS.get(kind, False) if enabled is None else enabled):
        return None
    compute = AUTOCAST_DTYPES.get(kind, torch.float32) if precision == "autocast" \
        else torch.float32
    return InBackground(touch_libraries, device, tuple(dict.fromkeys((compute, torch.float32))),
                        cudnn_attention, name="warm-up-libraries")
