"""Overlapping tiled VAE decoding, with GroupNorm statistics synchronised across tiles (SyncGN):
the GroupNorms of the ResNet blocks and the output norm; attention blocks stay per tile.

Tiles advance through the decoder in lockstep, layer by layer: a GroupNorm needs the statistics of
every tile before any tile can pass it. Between layers the tiles wait in host memory, so only one
tile's activations are on the accelerator at a time (`offload`); the numbers do not change."""
import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import AttnBlock, ResnetBlock

SCALE = 8  # image pixels per latent pixel


@dataclass(frozen=True)
class AxisTile:
    start: int  # latent pixels
    stop: int
    keep: Tuple[int, int]  # image pixels kept from the decoded tile, relative to its origin


def plan_axis(length: int, tile: int, overlap: int) -> List[AxisTile]:
    """Tiles along one latent axis: stride tile - overlap, the last cut at the border; each
    decoded tile drops overlap/2 latent pixels on every side that touches another tile."""
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if overlap < 0 or overlap % 2 or overlap >= tile:
        raise ValueError(f"overlap must be even, non-negative and smaller than the tile "
                         f"({tile}), got {overlap}")
    tile = min(tile, length)
    stride = tile - overlap
    count = max(math.ceil((length - tile) / stride), 0) + 1
    half = SCALE * overlap // 2
    tiles = []
    for k in range(count):
        start = k * stride
        stop = min(start + tile, length)
        first, last = k == 0, k == count - 1
        keep = (0 if first else half, SCALE * (stop - start) - (0 if last else half))
        tiles.append(AxisTile(start, stop, keep))
    return tiles


def _to(x, device):
    return x.to(device, non_blocking=True)


class _Tiles:
    """A list of tiles and where they compute; `map` runs a function tile by tile."""

    def __init__(self, tiles, device, offload):
        self.device, self.offload = device, offload
        self.home = torch.device("cpu") if offload else device
        self.tiles = [_to(t, self.home) for t in tiles]

    def map(self, fn, *others: "_Tiles", consume=False) -> "_Tiles":
        """fn over the tiles (and the matching tiles of `others`). With consume, each input tile
        is released as soon as its output exists, so a layer never holds two full copies."""
        out = []
        for i, tile in enumerate(self.tiles):
            args = [_to(tile, self.device)] + [_to(o.tiles[i], self.device) for o in others]
            out.append(_to(fn(*args), self.home))
            del args, tile
            if consume:
                for owner in (self, *others):
                    owner.tiles[i] = None
        return _Tiles(out, self.device, self.offload)

    def normalizer(self, norm: nn.GroupNorm, sync: bool):
        """The GroupNorm to apply to each tile: the module itself, or (SyncGN) the same affine
        normalisation with statistics over all tiles. Applied inside the next layer's map, so
        no normalised copy of every tile is ever held."""
        if not sync:
            return norm
        mean, inv_std = self._sync_stats(norm)
        groups = norm.num_groups

        def apply(x):
            b, c = x.shape[:2]
            per_group = c // groups
            mean_c = mean.repeat_interleave(per_group, dim=1).view(b, c, 1, 1)
            scale = (inv_std.repeat_interleave(per_group, dim=1) * norm.weight).view(b, c, 1, 1)
            return torch.addcmul(norm.bias.view(1, c, 1, 1), x.float() - mean_c,
                                 scale).to(x.dtype)
        return apply

    def _sync_stats(self, norm):
        """Per (sample, group): mean over all tiles' elements, and the variance with each tile's
        n/(n-1) correction, as the reference SyncGN defines it. Per-tile moments are merged
        exactly (Chan's formula), so one pass over the tiles suffices."""
        counts, means, m2s = [], [], []
        for tile in self.tiles:
            g = _to(tile, self.device).reshape(tile.shape[0], norm.num_groups, -1).float()
            var, mean = torch.var_mean(g, dim=-1, correction=0)
            counts.append(g.shape[-1])
            means.append(mean)
            m2s.append(var * g.shape[-1])
        total = sum(counts)
        mean = sum(n * m for n, m in zip(counts, means)) / total
        var = sum(n / (n - 1) * (m2 + n * (m - mean) ** 2)
                  for n, m, m2 in zip(counts, means, m2s)) / total
        return mean, torch.rsqrt(var + norm.eps)


def _resnet(block: ResnetBlock, x: _Tiles, sync: bool) -> _Tiles:
    norm1 = x.normalizer(block.norm1, sync)
    h = x.map(lambda t: block.conv1(F.silu(norm1(t))))  # x stays: it is the skip
    norm2 = h.normalizer(block.norm2, sync)
    return h.map(lambda t, skip: block.shortcut(skip) + block.conv2(block.dropout(F.silu(norm2(t)))),
                 x, consume=True)


def _attn(block: AttnBlock, x: _Tiles) -> _Tiles:
    # The published SyncGN leaves the attention block's own GroupNorm per tile (its reference
    # decodes agree with ours to 1e-6 only this way), and attention itself is per tile anyway.
    return x.map(block, consume=True)


def _decode_tiles(autoencoder, tiles: _Tiles, sync: bool) -> _Tiles:
    dec = autoencoder.decoder
    h = tiles.map(lambda z: dec.conv_in(autoencoder.post_quant_conv(z)), consume=True)
    h = _resnet(dec.mid.block_1, h, sync)
    h = _attn(dec.mid.attn_1, h)
    h = _resnet(dec.mid.block_2, h, sync)
    for up in reversed(dec.up):
        for i, block in enumerate(up.block):
            h = _resnet(block, h, sync)
            if len(up.attn) > 0:
                h = _attn(up.attn[i], h)
        if hasattr(up, "upsample"):
            h = h.map(up.upsample, consume=True)
    norm_out = h.normalizer(dec.norm_out, sync)
    h = h.map(lambda t: dec.conv_out(F.silu(norm_out(t))), consume=True)
    if dec.tanh_out:
        h = h.map(torch.tanh, consume=True)
    return h


@torch.no_grad()
def tiled_decode(autoencoder, z, overlap: int = 8, sync_gn: bool = True, tile_size=None,
                 offload=None):
    """Decode latents z (already divided by the scale factor) tile by tile.

    tile_size: latent pixels per tile side, (h, w) or int; default half of each latent side.
    offload: keep waiting tiles in host memory; default on for accelerators."""
    _, _, height, width = z.shape
    if tile_size is None:
        tile_size = (max(height // 2, 1), max(width // 2, 1))
    elif isinstance(tile_size, int):
        tile_size = (tile_size, tile_size)
    rows = plan_axis(height, tile_size[0], overlap)
    cols = plan_axis(width, tile_size[1], overlap)
    if offload is None:
        offload = z.device.type != "cpu"
    pieces = [z[:, :, r.start:r.stop, c.start:c.stop] for r in rows for c in cols]
    decoded = _decode_tiles(autoencoder, _Tiles(pieces, z.device, offload), sync_gn).tiles
    out_rows = []
    for i, r in enumerate(rows):
        row = [decoded[i * len(cols) + j][..., r.keep[0]:r.keep[1], c.keep[0]:c.keep[1]]
               for j, c in enumerate(cols)]
        out_rows.append(torch.cat(row, dim=-1))
    return torch.cat(out_rows, dim=-2).to(z.device)
