"""FreeU (Si et al. 2023), applied to the UNet from outside the model.

FreeU re-weights the two inputs of a decoder (output) block: the backbone features h coming up
from the block below, and the skip features popped from the encoder.  In the LDM layout every
output block receives `torch.cat([h, skip], dim=1)`; while `freeu_applied` is active a forward
pre-hook on each affected output block splits that input back into h and skip, changes them and
concatenates them again:

* backbone: the first half of h's channels is multiplied by b
  (the simple rule of diffusers' `apply_freeu`, not the mean-based "structure-related" factor
  of the original FreeU repository);
* skip: `fourier_filter(skip, threshold=1, scale=s)` damps its lowest frequencies by s.

Which blocks, with which (b, s): the ScaleCrafter authors' diffusers code for SD 2.1 tests the
backbone channel count, `hidden_states.shape[1] == 1280` -> (b1, s1) and `== 640` -> (b2, s2).
SD 2.1 has model_channels 320, so here the rule is stated as

    h channels == 4 * model_channels  -> stage 1: (b1, s1)
    h channels == 2 * model_channels  -> stage 2: (b2, s2)
    anything else                     -> unchanged

which is the same selection on SD 2.x (channel_mult 1,2,4,4: output blocks 0..6 have a 1280-channel
h, blocks 7..9 a 640-channel h, blocks 10..11 a 320-channel h) and carries over to smaller test
models.  The authors' SD 2.1 setting is (b1, b2, s1, s2) = (1.1, 1.2, 0.9, 0.2).

The split point of each block (h's channel count) is derived from the model's structure when the
hooks are installed: the skip channels are the output channels of the input blocks, taken in
reverse order, and h is whatever the block below produced (the middle block for output block 0).
The UNet file is never edited; the hooks are removed when the context exits, also on an exception.
"""
from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

__all__ = ["fourier_filter", "freeu_stage_params", "output_block_h_channels", "freeu_applied"]

FreeUParams = Tuple[float, float, float, float]


def fourier_filter(x: torch.Tensor, threshold: int = 1, scale: float = 1.0) -> torch.Tensor:
    """Scale the lowest spatial frequencies of x (B, C, H, W) by `scale`.

    The spectrum is centred with fftshift (DC at (H//2, W//2)) and the square of shifted rows
    [H//2 - threshold, H//2 + threshold) x columns [W//2 - threshold, W//2 + threshold) is
    multiplied by `scale`; for threshold 1 that is the DC term and the frequencies -1 along each
    axis.  Computed in float32 (float64 stays float64); the result has x's dtype.  scale 1 is
    the identity and returns x itself, without the FFT round trip's rounding.
    """
    if scale == 1.0:
        return x
    dtype = x.dtype
    xf = x.float() if x.dtype != torch.float64 else x
    H, W = xf.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(xf, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(xf.shape, dtype=xf.dtype, device=xf.device)
    crow, ccol = H // 2, W // 2
    # Clamped at 0: identical to the plain slice for every side >= 1 (side 1 selects index 0).
    mask[..., max(crow - threshold, 0):crow + threshold,
         max(ccol - threshold, 0):ccol + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(dtype)


def freeu_stage_params(h_channels: int, model_channels: int,
                       params: FreeUParams) -> Optional[Tuple[float, float]]:
    """(b, s) for an output block whose backbone input has `h_channels` channels, or None."""
    b1, b2, s1, s2 = params
    if h_channels == 4 * model_channels:
        return float(b1), float(s1)
    if h_channels == 2 * model_channels:
        return float(b2), float(s2)
    return None


def _block_out_channels(block: nn.Module, ch_in: int) -> int:
    """Channels leaving a TimestepEmbedSequential block that receives ch_in channels."""
    ch = ch_in
    for layer in block:
        if isinstance(layer, nn.Conv2d):
            ch = layer.out_channels
        elif isinstance(layer, ResBlock):
            ch = layer.out_layers[-1].out_channels
        elif isinstance(layer, (Upsample, Downsample)):
            conv = getattr(layer, "conv", None) or getattr(layer, "op", None)
            if isinstance(conv, nn.Conv2d):
                ch = conv.out_channels
        elif isinstance(layer, SpatialTransformer):
            pass  # transformers keep the channel count
        else:
            raise TypeError(f"FreeU: unexpected layer {type(layer).__name__} in a UNet block")
    return ch


def _first_resblock(block: nn.Module) -> ResBlock:
    for layer in block:
        if isinstance(layer, ResBlock):
            return layer
    raise TypeError("FreeU: output block without a ResBlock")


def output_block_h_channels(unet: nn.Module) -> List[int]:
    """Backbone (h) channel count of every output block's concatenated input, in order."""
    ch = unet.input_blocks[0][0].in_channels
    skips = []
    for block in unet.input_blocks:
        ch = _block_out_channels(block, ch)
        skips.append(ch)
    ch = _block_out_channels(unet.middle_block, ch)
    h_channels = []
    for i, block in enumerate(unet.output_blocks):
        skip = skips.pop()
        total = _first_resblock(block).in_layers[0].num_channels
        if ch + skip != total:
            raise ValueError(f"FreeU: output block {i} takes {total} channels, expected "
                             f"{ch} (backbone) + {skip} (skip)")
        h_channels.append(ch)
        ch = _block_out_channels(block, total)
    return h_channels


def _make_hook(h_channels: int, b: float, s: float):
    def hook(module, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        else:
            x, rest = kwargs.pop("x"), ()
        if x.shape[1] <= h_channels:
            raise ValueError(f"FreeU: block input has {x.shape[1]} channels, "
                             f"backbone alone should have {h_channels}")
        h, skip = x[:, :h_channels], x[:, h_channels:]
        half = h_channels // 2
        h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
        skip = fourier_filter(skip, threshold=1, scale=s)
        x = torch.cat([h, skip], dim=1)
        return (x, *rest), kwargs
    return hook


@contextmanager
def freeu_applied(unet: nn.Module, params: Optional[Sequence[float]]):
    """Apply FreeU with params (b1, b2, s1, s2) to `unet` inside the block; None: no change."""
    if params is None:
        yield
        return
    params = tuple(float(p) for p in params)
    if len(params) != 4:
        raise ValueError("FreeU takes four numbers: b1, b2, s1, s2")
    handles = []
    try:
        for block, h_ch in zip(unet.output_blocks, output_block_h_channels(unet)):
            stage = freeu_stage_params(h_ch, unet.model_channels, params)
            if stage is not None:
                handles.append(block.register_forward_pre_hook(
                    _make_hook(h_ch, *stage), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
