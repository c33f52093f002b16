"""Encoder / decoder of the KL autoencoder (LDM layout and key names)."""
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def nonlinearity(x):
    return F.silu(x)


class Upsample(nn.Module):
    def __init__(self, channels, with_conv=True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, with_conv=True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:  # asymmetric padding, as the trained weights expect
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0, temb_channels=0,
                 conv_shortcut=False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb=None):
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return self.shortcut(x) + h

    @property
    def identity_shortcut(self) -> bool:
        """Whether the block adds its input as it is (as many channels out as in)."""
        return not (hasattr(self, "conv_shortcut") or hasattr(self, "nin_shortcut"))

    def shortcut(self, x):
        if hasattr(self, "conv_shortcut"):
            return self.conv_shortcut(x)
        if hasattr(self, "nin_shortcut"):
            return self.nin_shortcut(x)
        return x


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, through SDPA (no HW x HW matrix: `attention`)."""

    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x):
        return x + self.attend(self.norm(x))

    def attend(self, h):
        """Attention output (before the residual) for the already normalised input h."""
        _, _, height, width = h.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return self.proj_out(out)


# Scores one query chunk may hold when no fused kernel takes the VAE's single 512-wide head
# (flash attention does not; the math kernel would build the whole N x N matrix: 256 GiB at 4096²).
ATTENTION_CHUNK_BYTES = 256 * 2 ** 20
_FUSED_OK = {}  # (device type, dtype, head dim) -> whether a fused kernel took it


def _fused_attention(q, k, v):
    """SDPA restricted to the kernels that never build the N x N matrix; None where none
    applies (tried once per device type, dtype and head size)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = (q.device.type, q.dtype, q.shape[-1])
    if not q.is_cuda or _FUSED_OK.get(key) is False:
        return None
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION]
    try:
        with warnings.catch_warnings(), sdpa_kernel(backends):
            warnings.simplefilter("ignore")
            out = attention(q, k, v)
    except RuntimeError:
        _FUSED_OK[key] = False
        return None
    _FUSED_OK[key] = True
    return out


def attention(q, k, v, chunk_bytes=None):
    """softmax(q k^T / sqrt(c)) v for q, k, v of shape (b, heads, n, c), with no N x N matrix:
    a fused kernel where one takes the shape, else SDPA on chunks of queries whose scores fit
    `chunk_bytes` (rows of a softmax are independent, so chunking changes no number)."""
    out = _fused_attention(q, k, v)
    if out is not None:
        return out
    budget = ATTENTION_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows_per_query = q.shape[0] * q.shape[1] * k.shape[-2] * q.element_size()
    chunk = max(1, budget // rows_per_query)
    if chunk >= q.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + chunk, :], k, v)
                      for i in range(0, q.shape[-2], chunk)], dim=-2)


def _level(blocks, attns, sampler=None, name=None):
    module = nn.Module()
    module.block, module.attn = blocks, attns
    if sampler is not None:
        setattr(module, name, sampler)
    return module


class Encoder(nn.Module):
    def __init__(self, *, ch, out_ch=3, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
                 dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
                 double_z=True, attn_type="vanilla", **_unused):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = level == len(ch_mult) - 1
            self.down.append(_level(blocks, attns, None if last else
                                    Downsample(block_in, resamp_with_conv), "downsample"))
            if not last:
                res //= 2
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3,
                                  padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


def decoder_ticks(decoder) -> int:
    """How often a decode calls its tick: after the middle and after each level's ResNet block."""
    return 1 + sum(len(up.block) for up in decoder.up)


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
                 dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
                 give_pre_end=False, tanh_out=False, attn_type="vanilla", **_unused):
        super().__init__()
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels.insert(0, _level(blocks, attns, Upsample(block_in, resamp_with_conv)
                                    if level else None, "upsample"))
            if level:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    @property
    def upsamplings(self) -> int:
        """How many times the decoder doubles its input's size."""
        return sum(hasattr(up, "upsample") for up in self.up)

    def forward(self, z, tick=None):
        """tick: called after the middle and after each ResNet block (`decoder_ticks` calls),
        e.g. a progress bar's update."""
        tick = tick or (lambda: None)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        tick()
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
                tick()
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
