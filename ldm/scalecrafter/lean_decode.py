"""The full (untiled) VAE decode, layer by layer in row bands: the same maths as
`Decoder.forward`, with far less memory.

The plain decode holds, at its peak, an upsampled map, its conv output, a normalised copy and a
ResNet block's hidden map at full resolution (68 GB in fp32 at 4096²). Here:
- a 3x3 conv runs band by band: an output band needs its input band plus one row above and below,
  and the GroupNorm + SiLU before it is applied to that input band only (no normalised copy);
- GroupNorm statistics are whole-map: per-band moments merged exactly (Chan's formula), taken
  while each band is written, so they cost no extra pass;
- a ResNet block's output overwrites its hidden map in place (the rows the next band still needs
  are kept aside), so a block holds its input and one hidden map;
- where even that exceeds the memory budget, an upsample's output is never materialised (its
  bands are recomputed from the small input when needed), and a block with an identity shortcut
  recomputes its hidden bands instead of storing them, writing its output into its input.
Attention runs as in the plain decoder (it sits at the latent resolution).

Numbers equal the plain decode's to float tolerance: only the summation order of the GroupNorm
moments and the conv algorithm per band differ."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import ResnetBlock, decoder_ticks
from ldm.progress import progress_bar
from ldm.scalecrafter.memory import default_budget

BAND_BYTES = 128 * 2 ** 20  # one band of the widest map a conv reads (its temporaries are a few)


def group_moments(t, groups: int):
    """(count, mean, sum of squared deviations) per (sample, group) of a map or band, float32."""
    # a conv's output band is contiguous: a view, one reduction over the last dim (fast)
    g = t.reshape(t.shape[0], groups, -1).float()
    var, mean = torch.var_mean(g, dim=-1, correction=0)
    return g.shape[-1], mean, var * g.shape[-1]


class Moments:
    """Per (sample, group) moments of a map, merged exactly from its bands."""

    def __init__(self, groups: int):
        self.groups, self.parts = groups, []

    def add(self, band):
        self.parts.append(group_moments(band, self.groups))

    def merged(self):
        """group_moments of the whole map: its bands' merged exactly (Chan's formula)."""
        total = sum(n for n, _, _ in self.parts)
        mean = sum(n * m for n, m, _ in self.parts) / total
        return total, mean, sum(m2 + n * (m - mean) ** 2 for n, m, m2 in self.parts)

    def normalizer(self, norm: nn.GroupNorm, unbiased: bool = False):
        """x band -> silu(GroupNorm(x)) with the whole map's statistics, as a new tensor;
        unbiased: the variance with the n/(n-1) correction (one tile of the reference SyncGN)."""
        total, mean, m2 = self.merged()
        var = m2 / (total - 1 if unbiased else total)
        per_group = norm.num_channels // self.groups
        inv_std = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)
        mean_c = mean.repeat_interleave(per_group, dim=1)
        # x * scale + shift, one pass, as torch's own GroupNorm kernels compute it
        scale = inv_std * norm.weight
        shift = (norm.bias - mean_c * scale)[:, :, None, None]
        scale = scale[:, :, None, None]

        def apply(x):
            out = torch.addcmul(shift, x.float(), scale)  # a new tensor: x stays
            return F.silu(out, inplace=True).to(x.dtype)
        return apply


class Dense:
    """A materialised map; `rows` are views."""

    def __init__(self, t):
        self.t = t
        self.shape = t.shape

    def rows(self, r0, r1):
        return self.t[:, :, r0:r1]


class Upsampled:
    """conv(nearest-2x(src)), never materialised: each requested band is computed from the
    rows of src under it (the small map stays; the 4x larger one never exists whole)."""

    def __init__(self, upsample, src: Dense):
        self.upsample, self.src = upsample, src
        b, _, h, w = src.shape
        c = upsample.conv.out_channels if upsample.with_conv else src.shape[1]
        self.shape = torch.Size((b, c, 2 * h, 2 * w))

    def rows(self, r0, r1):
        height = self.shape[2]
        lo, hi = (max(r0 - 1, 0), min(r1 + 1, height)) if self.upsample.with_conv else (r0, r1)
        s0, s1 = lo // 2, (hi - 1) // 2 + 1
        up = F.interpolate(self.src.rows(s0, s1), scale_factor=2.0, mode="nearest")
        up = up[:, :, lo - 2 * s0:hi - 2 * s0]
        if not self.upsample.with_conv:
            return up
        return conv_band(up, self.upsample.conv, r0 == 0, r1 == height)


class Overwritten(Dense):
    """A map whose rows are overwritten, top band first, by a layer that reads it with a halo:
    the last `keep` original rows of every written band are kept for the next band."""

    def __init__(self, t, keep: int):
        super().__init__(t)
        self.keep, self.done, self.saved = keep, 0, None

    def rows(self, r0, r1):
        if r0 >= self.done:
            return self.t[:, :, r0:r1]
        first = self.done - self.saved.shape[2]
        assert r0 >= first, "a band reads rows overwritten before the previous band"
        return torch.cat([self.saved[:, :, r0 - first:], self.t[:, :, self.done:r1]], dim=2)

    def write(self, r0, r1, band):
        assert r0 == self.done
        self.saved = self.rows(max(r1 - self.keep, 0), r1).clone()
        self.t[:, :, r0:r1] = band
        self.done = r1


def conv_band(x, conv: nn.Conv2d, top: bool, bottom: bool):
    """A 3x3, stride-1, padding-1 conv of an input band that already holds its halo rows, except
    at the map's top / bottom border, where the zero padding goes (after any normalisation, as
    the plain conv pads its normalised input)."""
    if top and bottom:  # the whole map in one band: the plain conv
        return F.conv2d(x, conv.weight, conv.bias, padding=1)
    if top or bottom:
        x = F.pad(x, (0, 0, int(top), int(bottom)))
    return F.conv2d(x, conv.weight, conv.bias, padding=(0, 1))


def row_bands(height: int, rows: int):
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def band_rows(src, band_bytes: int = BAND_BYTES) -> int:
    """Rows per band: a band of src (4-byte elements) within band_bytes, at least two rows (the
    halo a recomputed band reads)."""
    b, c, _, w = src.shape
    return max(2, band_bytes // max(b * c * w * 4, 1))


def conv_rows(src, r0, r1, conv, prologue=None):
    """Output rows [r0, r1) of conv(prologue(src)), for a 3x3 padding-1 conv."""
    height = src.shape[2]
    x = src.rows(max(r0 - 1, 0), min(r1 + 1, height))
    if prologue is not None:
        x = prologue(x)
    return conv_band(x, conv, r0 == 0, r1 == height)


def banded_conv(src, conv, prologue=None, epilogue=None, band_bytes: int = BAND_BYTES):
    """conv(prologue(src)) written band by band into a new map: the prologue (a GroupNorm +
    SiLU) never exists at full size. epilogue(band, r0, r1) sees each output band first."""
    b, _, h, w = src.shape
    out = torch.empty(b, conv.out_channels, h, w, dtype=conv.weight.dtype,
                      device=conv.weight.device)
    for r0, r1 in row_bands(h, band_rows(src, band_bytes)):
        band = conv_rows(src, r0, r1, conv, prologue)
        if epilogue is not None:
            epilogue(band, r0, r1)
        out[:, :, r0:r1] = band
        del band
    return out


def map_moments(src, groups: int, band_bytes: int = BAND_BYTES) -> Moments:
    """The GroupNorm moments of a map: one reduction over a contiguous stored map (a view, no
    copy), else band by band (a lazy map is computed once more for them)."""
    m = Moments(groups)
    if isinstance(src, Dense) and src.t.is_contiguous():
        m.add(src.t)
        return m
    for r0, r1 in row_bands(src.shape[2], band_rows(src, band_bytes)):
        m.add(src.rows(r0, r1))
    return m


class Convolved:
    """conv(prologue(src)) for a 3x3 padding-1 conv, never materialised: each requested band is
    computed from the rows of src under it and their halo."""

    def __init__(self, src, conv: nn.Conv2d, prologue=None):
        self.src, self.conv, self.prologue = src, conv, prologue
        b, _, h, w = src.shape
        self.shape = torch.Size((b, conv.out_channels, h, w))

    def rows(self, r0, r1):
        return conv_rows(self.src, r0, r1, self.conv, self.prologue)


def residual_recomputed(x, block: ResnetBlock, norm1, norm2, rows: int, epilogue=None):
    """An identity-shortcut ResNet block, x + conv2(norm2(conv1(norm1(x)))), written over x band
    by band: each band recomputes the hidden rows it needs (one halo row more), so the hidden
    map never exists. norm1 / norm2: the GroupNorm + SiLU to apply to a band."""
    height = x.shape[2]
    out = Overwritten(x, keep=2)
    for r0, r1 in row_bands(height, rows):
        lo, hi = max(r0 - 1, 0), min(r1 + 1, height)
        hidden = norm2(conv_rows(out, lo, hi, block.conv1, norm1))
        band = conv_band(hidden, block.conv2, r0 == 0, r1 == height)
        del hidden
        band.add_(out.rows(r0, r1))  # identity shortcut
        if epilogue is not None:
            epilogue(band, r0, r1)
        out.write(r0, r1, band)
        del band
    return x


def banded_residual(h, conv, prologue, shortcut_rows, epilogue=None,
                    band_bytes: int = BAND_BYTES, rows: Optional[int] = None):
    """conv(prologue(h)) + shortcut_rows(r0, r1), written over h itself band by band (the next
    band's halo row is kept aside): a ResNet block's second half without a third map. rows:
    per band, when the shortcut's input is the wider map."""
    out = Overwritten(h, keep=1)
    for r0, r1 in row_bands(h.shape[2], rows or band_rows(out, band_bytes)):
        band = conv_rows(out, r0, r1, conv, prologue)
        band.add_(shortcut_rows(r0, r1))
        if epilogue is not None:
            epilogue(band, r0, r1)
        out.write(r0, r1, band)
        del band
    return h


def materialize(src, epilogue=None, band_bytes: int = BAND_BYTES):
    """A lazy map (Upsampled) written out band by band."""
    out = None
    for r0, r1 in row_bands(src.shape[2], band_rows(src, band_bytes)):
        band = src.rows(r0, r1)
        if out is None:
            out = torch.empty(src.shape, dtype=band.dtype, device=band.device)
        if epilogue is not None:
            epilogue(band, r0, r1)
        out[:, :, r0:r1] = band
        del band
    return out


class LeanDecoder:
    """Runs one decoder on one latent; `budget` (bytes) decides where memory is traded for
    recomputation (None: never); unbiased: the decoder's GroupNorms (not its attention's) with
    the n/(n-1) variance, as one SyncGN tile normalises."""

    def __init__(self, decoder, budget: Optional[float] = None, band_bytes: int = BAND_BYTES,
                 unbiased: bool = False):
        self.dec, self.budget, self.band_bytes = decoder, budget, band_bytes
        self.groups = decoder.norm_out.num_groups
        self.unbiased = unbiased

    def _fits(self, nbytes) -> bool:
        """Whether maps of nbytes, plus the band temporaries beside them (a few bands of the
        widest map), fit the budget."""
        return self.budget is None or nbytes + 4 * self.band_bytes <= self.budget

    def _band_rows(self, src) -> int:
        return band_rows(src, self.band_bytes)

    def moments(self, src) -> Moments:
        return map_moments(src, self.groups, self.band_bytes)

    def _tally(self, m: Moments):
        return lambda band, r0, r1: m.add(band)

    def materialize(self, src):
        """A lazy map written out band by band, with its moments."""
        m = Moments(self.groups)
        return Dense(materialize(src, self._tally(m), self.band_bytes)), m

    def conv_map(self, src, conv, prologue=None, moments=True):
        """conv(prologue(src)) materialised band by band, with its moments (if asked)."""
        m = Moments(self.groups)
        out = banded_conv(src, conv, prologue, self._tally(m) if moments else None,
                          self.band_bytes)
        return Dense(out), m

    def resnet(self, block: ResnetBlock, x, mx: Moments):
        """One ResNet block (no time embedding in a decoder): (output Dense, its moments)."""
        assert not hasattr(block, "temb_proj") and not block.dropout.p, "inference decoder only"
        norm1 = mx.normalizer(block.norm1, self.unbiased)
        cin, cout = block.norm1.num_channels, block.conv2.out_channels
        per_channel = x.shape[0] * x.shape[2] * x.shape[3] * 4  # bytes of one fp32 channel
        if (isinstance(x, Dense) and block.identity_shortcut
                and not self._fits(per_channel * (cin + cout))):
            return self._resnet_recompute(block, x, norm1)
        h, mh = self.conv_map(x, block.conv1, norm1)
        m = Moments(self.groups)
        out = banded_residual(h.t, block.conv2, mh.normalizer(block.norm2, self.unbiased),
                              lambda r0, r1: block.shortcut(x.rows(r0, r1)), self._tally(m),
                              rows=min(self._band_rows(x), self._band_rows(h)))
        return Dense(out), m

    def _resnet_recompute(self, block, x: Dense, norm1):
        """The block without its hidden map: one pass for the hidden map's moments, then each
        output band recomputes the hidden rows it needs (one halo row more) and overwrites x."""
        mh = self.moments(Convolved(x, block.conv1, norm1))
        m = Moments(self.groups)
        out = residual_recomputed(x.t, block, norm1, mh.normalizer(block.norm2, self.unbiased),
                                  self._band_rows(x), self._tally(m))
        return Dense(out), m

    def upsample(self, up, x: Dense, next_block):
        """The upsample's output: materialised (with its moments) where it and the next block's
        hidden map fit the budget, else lazily recomputed per band."""
        lazy = Upsampled(up, x)
        b, c, h, w = lazy.shape
        hidden = next_block.conv1.out_channels if next_block is not None else 0
        if self._fits(b * h * w * 4 * (c + hidden)):
            return self.materialize(lazy)
        return lazy, self.moments(lazy)

    def __call__(self, z, tick=None):
        """tick: called where the decoder's forward calls it (ldm's Decoder.forward)."""
        tick = tick or (lambda: None)
        dec = self.dec
        x = Dense(dec.conv_in(z))
        mx = self.moments(x)
        x, mx = self.resnet(dec.mid.block_1, x, mx)
        x = Dense(dec.mid.attn_1(x.t))
        mx = self.moments(x)
        x, mx = self.resnet(dec.mid.block_2, x, mx)
        tick()
        for level in reversed(range(len(dec.up))):
            up = dec.up[level]
            for i, block in enumerate(up.block):
                x, mx = self.resnet(block, x, mx)
                if len(up.attn) > 0:
                    x = Dense(up.attn[i](x.t))
                    mx = self.moments(x)
                tick()
            if hasattr(up, "upsample"):
                following = dec.up[level - 1].block[0] if level > 0 else None
                x, mx = self.upsample(up.upsample, x, following)
        if dec.give_pre_end:
            return x.t if isinstance(x, Dense) else x.rows(0, x.shape[2])
        out, _ = self.conv_map(x, dec.conv_out, mx.normalizer(dec.norm_out, self.unbiased),
                               moments=False)
        return torch.tanh_(out.t) if dec.tanh_out else out.t


@torch.no_grad()
def lean_decode(autoencoder, z, budget_bytes: Optional[float] = None,
                band_bytes: int = BAND_BYTES, tick=None, unbiased: bool = False):
    """autoencoder.decode(z), band by band (see the module's docstring). budget_bytes: memory
    above which layers recompute rather than store (None: store everything); unbiased: see
    LeanDecoder."""
    post = autoencoder.post_quant_conv(z)
    return LeanDecoder(autoencoder.decoder, budget_bytes, band_bytes, unbiased)(post, tick)


# The plain decode's peak above its weights, in units of its largest activation (an upsampled
# 256-channel map at full resolution): measured on an H200 in fp32, 4.3 at 1024², 4.3 at 2048²
# (17.24 GiB), 4.26 at 4096² (68.2 GiB): the upsampled map, its conv output, a normalised copy, a
# hidden map, and cuDNN's workspace.
PLAIN_PEAK_PER_LARGEST = 4.5


def largest_activation(decoder, th: int, tw: int) -> int:
    """Elements (per sample) of the largest activation a (th, tw) latent tile reaches: the
    widest level input or upsample output at its resolution."""
    levels, largest = len(decoder.up), 0
    for i, up in enumerate(decoder.up):
        up_scale = 2 ** (levels - 1 - i)
        widest = max(b.norm1.num_channels for b in up.block)
        largest = max(largest, widest * up_scale ** 2)
        if hasattr(up, "upsample"):  # its output: this level's channels, the next resolution
            largest = max(largest, up.block[-1].conv2.out_channels * (2 * up_scale) ** 2)
    return largest * th * tw


def plain_decode_bytes(decoder, height: int, width: int, batch: int = 1) -> int:
    """The plain decode's estimated peak for a (height, width) latent, weights excluded."""
    return int(PLAIN_PEAK_PER_LARGEST * largest_activation(decoder, height, width) * batch * 4)


def full_decode(autoencoder, z, budget_bytes: Optional[float] = None, lean: bool = True,
                progress: bool = False, unbiased: bool = False):
    """The untiled decode: the banded decoder within the budget (default: a share of the free
    memory), or the plain one with lean=False. Banded on every device, so that the free memory
    never picks the decoder (the two agree to float tolerance, not bit for bit); the budget
    only decides what it recomputes, which moves the last bits at most. It takes about the
    plain decoder's time (0.88x at 2048² on an H200, ~6% more CPU time on the CPU) at a
    fraction of its peak. progress: a bar over the decoder's blocks. unbiased (banded only):
    one SyncGN tile's n/(n-1) variance (LeanDecoder)."""
    budget = default_budget(z.device) if budget_bytes is None else budget_bytes
    with progress_bar(total=decoder_ticks(autoencoder.decoder), desc="Decoding",
                      disable=not progress) as bar:
        if not lean:
            return autoencoder.decode(z, bar.update)
        return lean_decode(autoencoder, z, budget, tick=bar.update, unbiased=unbiased)
