"""The Stable Diffusion UNet (inference only): SD 1.x/2.x, and SDXL through its options (per-level
transformer depth, `label_emb` for a conditioning vector). Module names follow the original LDM /
sgm layout so that real checkpoints load key for key; ScaleCrafter never edits this file, it
re-dilates convs from outside."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.normalization import GroupNorm32


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def normalization(channels):
    return GroupNorm32(32, channels)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv=True, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=padding)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv=True, dims=2, out_channels=None, padding=1):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None,
                 use_scale_shift_norm=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _per_level(depth, levels):
    """transformer_depth may be one int for every level or a list per level (SDXL)."""
    if isinstance(depth, int):
        return [depth] * levels
    depth = list(depth)
    if len(depth) != levels:
        raise ValueError(f"transformer_depth has {len(depth)} entries for {levels} levels")
    return depth


def _label_embedding(num_classes, adm_in_channels, time_dim):
    """SDXL's `num_classes: sequential`: an MLP from the conditioning vector to the time
    embedding (nested Sequential: the checkpoint's keys are label_emb.0.0 / label_emb.0.2)."""
    if num_classes is None:
        return None
    if num_classes != "sequential" or not adm_in_channels:
        raise ValueError("only num_classes 'sequential' with adm_in_channels is supported")
    return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, time_dim), nn.SiLU(),
                                       nn.Linear(time_dim, time_dim)))


class UNetModel(nn.Module):
    """Noise-prediction UNet with cross-attention. Accepts every key of the standard configs;
    training-only ones (use_checkpoint, use_fp16, ...) are ignored."""

    def __init__(self, image_size=None, in_channels=4, model_channels=320, out_channels=4,
                 num_res_blocks=2, attention_resolutions=(4, 2, 1), dropout=0.0,
                 channel_mult=(1, 2, 4, 4), conv_resample=True, dims=2, num_heads=-1,
                 num_head_channels=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_spatial_transformer=True, transformer_depth=1, context_dim=None,
                 use_linear_in_transformer=False, legacy=True, disable_self_attentions=None,
                 transformer_depth_middle=None, num_classes=None, adm_in_channels=None,
                 **_training_only):
        super().__init__()
        if dims != 2 or resblock_updown or not use_spatial_transformer:
            raise ValueError("only the Stable Diffusion UNet layout (2-D, spatial transformers) "
                             "is supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        depths = _per_level(transformer_depth, len(channel_mult))
        if transformer_depth_middle is None:  # sgm's rule: the deepest level's depth
            transformer_depth_middle = depths[-1]
        self.model_channels = model_channels
        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim))
        self.label_emb = _label_embedding(num_classes, adm_in_channels, time_dim)

        def transformer(ch, level, depth=None):
            heads = ch // num_head_channels if num_head_channels != -1 else num_heads
            dim_head = num_head_channels if num_head_channels != -1 else ch // num_heads
            if legacy:
                dim_head = ch // heads
            no_self = disable_self_attentions[level] if disable_self_attentions else False
            return SpatialTransformer(ch, heads, dim_head,
                                      depth=depths[level] if depth is None else depth,
                                      context_dim=context_dim, disable_self_attn=no_self,
                                      use_linear=use_linear_in_transformer)

        def resblock(ch_in, ch_out):
            return ResBlock(ch_in, time_dim, dropout, ch_out, use_scale_shift_norm)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), transformer(ch, len(channel_mult) - 1, transformer_depth_middle),
            resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:  # SDXL: the pooled text + size vector joins the time
            if y is None:
                raise ValueError("this UNet needs a conditioning vector y (label_emb)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:  # odd latent sides: crop the upsampled map
                h = h[..., :skip.shape[-2], :skip.shape[-1]]
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)
