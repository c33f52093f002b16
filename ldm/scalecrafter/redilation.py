"""Re-dilation of the UNet's 3x3 convolutions, applied from outside the model.

A conv is overridden for the duration of a `with overridden_convs(...)` block by shadowing its
`forward` with an instance attribute; leaving the block (normally or by an exception) deletes
the attribute, so the model is exactly as before. A compiled UNet's convs are routed instead
(`route_when_overridden`: each conv when a plan first overrides it): the block then only sets
and clears their plans."""
import itertools
import math
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.compat import PLANNED_CONV_OPTIONS
from ldm.precision import AUTOCAST_DTYPES


@dataclass(frozen=True)
class ConvOverride:
    """Run a conv with dilation factor `factor` (may be fractional) and optionally another
    (e.g. dispersed 5x5) kernel."""
    factor: float
    weight: Optional[torch.Tensor] = None


# The largest dilation factor taken: a 3x3 conv dilated 64 spans 129 latent pixels (1032 image
# pixels), beyond any published setting; far larger factors overflow the conv's padding.
MAX_FACTOR = 64.0


# Which form of an integer-dilated conv runs faster, per device type (measured; see
# docs/benchmarks.md): a plain conv on the polyphase components uses the fast plain-conv
# kernels (cuDNN has few for dilated convs), oneDNN runs dilated convs at full speed already.
POLYPHASE = {"cuda": True, "cpu": False}


def use_polyphase(device: torch.device) -> bool:
    return POLYPHASE.get(device.type, False)


def polyphase_conv(x, weight, bias, dilation: int, groups: int = 1):
    """F.conv2d(x, weight, bias, 1, dilation * (k - 1) // 2, dilation, groups), computed as a plain
    conv (padding (k - 1) // 2) on the dilation x dilation polyphase components of x, which are
    stacked into the batch: output pixel (d*i + r, d*j + s) only reads input pixels of phase (r, s)."""
    d, pad = dilation, (weight.shape[-1] - 1) // 2
    b, c, h, w = x.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    if (hp, wp) != (h, w):  # zeros past the border are what the dilated conv's padding reads
        x = F.pad(x, (0, wp - w, 0, hp - h))
    phases = x.reshape(b, c, hp // d, d, wp // d, d).permute(0, 3, 5, 1, 2, 4)
    phases = phases.reshape(b * d * d, c, hp // d, wp // d)
    out = F.conv2d(phases, weight, bias, 1, pad, 1, groups)
    o = out.shape[1]
    out = out.reshape(b, d, d, o, hp // d, wp // d).permute(0, 3, 4, 1, 5, 2)
    return out.reshape(b, o, hp, wp)[:, :, :h, :w]


def dilated_conv(x, weight, bias, stride, dilation: int, groups: int = 1):
    """A conv with dilation = padding-per-tap `dilation`, by the faster path for x's device. A
    stride s that divides the dilation reads only the phase-0 pixels: a stride-1 conv with
    dilation / s on x[::s, ::s]; other strides keep F.conv2d's dilated conv."""
    padding = dilation * (weight.shape[-1] - 1) // 2
    if not use_polyphase(x.device) or dilation == 1 or stride[0] != stride[1]:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    s = stride[0]
    if dilation % s:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if s > 1:
        x, dilation = x[:, :, ::s, ::s], dilation // s
        if dilation == 1:
            return F.conv2d(x, weight, bias, 1, padding // s, 1, groups)
    return polyphase_conv(x, weight, bias, dilation, groups)


def redilated_conv(conv: nn.Conv2d, x, factor: float, weight=None):
    """conv(x) with dilation ceil(factor) (and another kernel where given); a fractional factor
    resizes the input by ceil(factor)/factor before and the output back to the plain conv's
    size after."""
    return _run(conv, x, ConvOverride(factor, weight), conv.weight, conv.bias)


def _redilated(conv, x, factor, weight, bias):
    dilation = math.ceil(factor)
    stride = conv.stride
    if dilation == factor:
        return dilated_conv(x, weight, bias, stride, dilation, conv.groups)
    h, w = x.shape[-2:]
    scaled = (round(h * dilation / factor), round(w * dilation / factor))
    x = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
    out = dilated_conv(x, weight, bias, stride, dilation, conv.groups)
    target = ((h - 1) // stride[0] + 1, (w - 1) // stride[1] + 1)
    return F.interpolate(out, size=target, mode="bilinear", align_corners=False)


def conv3x3_names(unet: nn.Module):
    """Names of the UNet's 3x3 convolutions, in module order (the ones re-dilation may touch)."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def _block_of(name: str):
    match = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", name)
    return (match.group(1), int(match.group(2))) if match else (None, None)


def uniform_dilation_map(unet: nn.Module, factor: float, skip: int) -> Dict[str, float]:
    """The seed's `--dilate D --dilate_skip K`: every 3x3 conv of the UNet gets D, except those
    in the first K input blocks and the last K output blocks (the middle block is included)."""
    n_out = len(unet.output_blocks)
    chosen = {}
    for name in conv3x3_names(unet):
        kind, index = _block_of(name)
        if kind == "input_blocks" and index < skip:
            continue
        if kind == "output_blocks" and index >= n_out - skip:
            continue
        if kind is None and not name.startswith("middle_block."):
            continue  # the final output conv (in no block) is never dilated, as in the seed
        chosen[name] = factor
    return chosen


def _is_plain(override: Optional[ConvOverride]) -> bool:
    return override is None or (override.factor == 1 and override.weight is None)


def _same(a: Optional[ConvOverride], b: Optional[ConvOverride]) -> bool:
    if _is_plain(a) or _is_plain(b):
        return _is_plain(a) and _is_plain(b)
    return a.factor == b.factor and a.weight is b.weight


def _run(conv, x, override, weight, bias):
    """conv(x) under `override`, with the conv's weight and bias as given (the planned-conv op
    gets them cast by autocast); another kernel is cast to x's dtype."""
    if _is_plain(override):
        return conv._conv_forward(x, weight, bias)
    if override.weight is not None:
        weight = override.weight.to(x.dtype)
    return _redilated(conv, x, override.factor, weight, bias)


def _run_segments(conv, x, segments, weight, bias):
    """Rows of the batch that run with different overrides: each slice runs its own conv."""
    if len(segments) == 1:
        return _run(conv, x, segments[0][1], weight, bias)
    outs, start = [], 0
    for size, override in segments:
        outs.append(_run(conv, x[start:start + size], override, weight, bias))
        start += size
    return torch.cat(outs)


def _segments_forward(conv, segments):
    def forward(x):
        return _run_segments(conv, x, segments, conv.weight, conv.bias)
    return forward


# A compiled UNet (--compile) runs every 3x3 conv through one opaque op that reads the conv's
# plan when it runs. torch.compile would otherwise trace each plan's factors into the graph and
# compile the whole UNet again for every new plan (2-6 plans in a preset's 50 steps, 12 in the
# 4096² one; past 8, Dynamo runs the rest eagerly). Routed, one graph serves every plan.
# Only the convs a run overrides are routed: the op is opaque to the compiler (no fused bias,
# no layout choice), so a plain run compiles the plain UNet.
_PLAIN = [(None, None)]
_PLANS = weakref.WeakKeyDictionary()  # routed conv -> its segments while overridden
_KEYS = weakref.WeakKeyDictionary()  # routed conv -> its op key
_ROUTED = weakref.WeakValueDictionary()  # op key -> the routed conv
_NEXT_KEY = itertools.count()
_ROUTE_ON_DEMAND = weakref.WeakSet()  # UNets whose convs are routed when first overridden


# cudagraph_unsafe (torch 2.8+): a CUDA graph would replay the kernels of the plan it was
# captured with
@torch.library.custom_op("scalecrafter::planned_conv", mutates_args=(), **PLANNED_CONV_OPTIONS)
def planned_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 key: int) -> torch.Tensor:
    conv = _ROUTED[key]
    return _in_layout_of(_run_segments(conv, x, _PLANS.get(conv, _PLAIN), weight, bias), x)


@planned_conv.register_fake
def _planned_conv_shape(x, weight, bias, key):
    conv = _ROUTED[key]  # every plan keeps the plain conv's output size
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _in_layout_of(out, x)


def _in_layout_of(out, x):
    """out, dense in x's memory format. The compiled kernels after the op read its output
    with the strides the shape function gave, so the real output must have exactly those; a
    polyphase conv's output is a slice where the size needed padding."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)


for _device_type, _dtype in AUTOCAST_DTYPES.items():  # the inputs cast as autocast casts a conv's
    torch.library.register_autocast("scalecrafter::planned_conv", _device_type, _dtype)


def _route(conv: nn.Conv2d):
    """Send `conv` through the planned-conv op, for good; `overridden_convs` then sets its
    plans without touching the module."""
    if conv in _KEYS:
        return
    key = _KEYS[conv] = next(_NEXT_KEY)
    _ROUTED[key] = conv

    def forward(x):
        return torch.ops.scalecrafter.planned_conv(x, conv.weight, conv.bias, key)
    conv.forward = forward


def route_when_overridden(unet: nn.Module):
    """Route each conv of `unet` when a plan first overrides it (`overridden_convs`), before
    the call it is overridden for. A run's plans override all their convs from its first step,
    so a compiled UNet compiles once per run: with the convs the run re-dilates routed, or
    none for a plain run."""
    _ROUTE_ON_DEMAND.add(unet)


@contextmanager
def overridden_convs(unet: nn.Module, overrides):
    """Apply per-conv overrides inside the block; always restore the plain convs after.

    `overrides` is {conv name: ConvOverride} for the whole batch, or a list of
    (rows, {conv name: ConvOverride}) for consecutive slices of the batch that need different
    plans (noise-damped CFG runs its damped rows in the same UNet call)."""
    modules = dict(unet.named_modules())
    segments = overrides if isinstance(overrides, list) else [(None, overrides)]
    names = {name for _, plan in segments for name in plan}
    patched, routed = [], []
    try:
        # sorted: convs get their op keys in the same order in every process (the keys are
        # constants of a compiled graph, which torch's on-disk cache can then find again)
        for name in sorted(names):
            per_segment = [(rows, plan.get(name)) for rows, plan in segments]
            first = per_segment[0][1]
            if all(_same(first, o) for _, o in per_segment):
                if _is_plain(first):
                    continue  # plain conv: nothing to change
                per_segment = [(None, first)]
            conv = modules[name]
            if unet in _ROUTE_ON_DEMAND:
                _route(conv)
            if conv in _KEYS:
                _PLANS[conv] = per_segment
                routed.append(conv)
            else:
                conv.forward = _segments_forward(conv, per_segment)
                patched.append(conv)
        yield
    finally:
        for conv in patched:
            del conv.forward
        for conv in routed:
            del _PLANS[conv]
