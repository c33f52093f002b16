"""Overlapping tiled VAE decoding, with GroupNorm statistics synchronised across tiles (SyncGN):
the GroupNorms of the ResNet blocks and the output norm; attention blocks stay per tile.

Tiles advance through the decoder in lockstep, layer by layer: a GroupNorm needs the statistics of
every tile before any tile can pass it. Between layers the tiles wait on the device while they fit
a memory budget, else in pinned host memory (copied on a side stream, fetched one tile ahead);
each tile's GroupNorm moments are taken while it is on the device, so SyncGN costs no extra trip.
None of this changes a number."""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.model import AttnBlock, ResnetBlock
from ldm.progress import progress_bar
from ldm.scalecrafter.lean_decode import (Convolved, Dense, Upsampled, band_rows, banded_conv,
                                          banded_residual, full_decode, group_moments,
                                          largest_activation, map_moments, materialize,
                                          residual_recomputed)
from ldm.scalecrafter.memory import available_bytes, default_budget

SCALE = 8  # image pixels per latent pixel
# A tile's transient peak, in units of its largest activation L (the upsampled 256-channel map):
# the convs run by row bands, so the block 256 -> 128 channels holds its input (L),
# its hidden map (L/2) and a few bands; the next tile's inputs are being fetched meanwhile
# (1.5 L) and the last output may still be on its way to host memory (L/2). Counted by tracking
# live tensors (4096², 16 tiles: 3.3 L without the copy in flight); an H200 measured the old
# unbanded decode at 1.8 GB above its estimate of 3 L, which is why waiting tiles went over.
PEAK_PER_LARGEST = 4
MIN_STRIDE = 8  # latent pixels: auto tiling never makes tiles thinner than overlap + this


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
    if tile >= length:  # one tile: nothing overlaps (the overlap may even exceed the axis)
        return [AxisTile(0, length, (0, SCALE * length))]
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


def tile_working_bytes(decoder, th: int, tw: int, batch: int = 1, element_size: int = 4) -> int:
    """Estimated transient peak of decoding one (th, tw) tile, waiting tiles excluded."""
    return PEAK_PER_LARGEST * largest_activation(decoder, th, tw) * batch * element_size


def even_tile(length: int, count: int, overlap: int) -> int:
    """The tile side that covers `length` with `count` equal tiles overlapping by `overlap` (the
    last one cut by at most count - 1 pixels, never a sliver)."""
    return max(-(-(length + (count - 1) * overlap) // count), overlap + 2)


def _max_tiles(length: int, overlap: int) -> int:
    n = 1
    while n < length and even_tile(length, n + 1, overlap) - overlap >= MIN_STRIDE:
        n += 1
    return n


def tile_fits(decoder, th: int, tw: int, budget: int, batch: int = 1) -> bool:
    """Whether a (th, tw) tile's working set fits half the budget (the other half keeps
    waiting tiles on the device)."""
    return tile_working_bytes(decoder, th, tw, batch) <= budget / 2


def auto_tile_size(decoder, height: int, width: int, overlap: int, budget: int,
                   batch: int = 1) -> Tuple[int, int]:
    """Fewest equal tiles that fit the budget (tile_fits); the smallest allowed tiles when
    none does."""
    best = None
    for nh in range(1, _max_tiles(height, overlap) + 1):
        for nw in range(1, _max_tiles(width, overlap) + 1):
            th, tw = even_tile(height, nh, overlap), even_tile(width, nw, overlap)
            if best is not None and nh * nw >= best[0]:
                break
            # (a tile longer than its side, held over the overlap, decodes just the side)
            if tile_fits(decoder, min(th, height), min(tw, width), budget, batch):
                best = (nh * nw, th, tw)
    if best is None:
        return (even_tile(height, _max_tiles(height, overlap), overlap),
                even_tile(width, _max_tiles(width, overlap), overlap))
    return best[1], best[2]


# The most of the host's available memory (when a decode starts) that waiting tiles may pin:
# the pinned allocator rounds blocks up to a power of two, so up to twice this may be locked.
HOST_FRACTION = 0.4


def waits_on_host(size: int, resident: int, keep_bytes: float, pinned: int,
                  host_room: float) -> bool:
    """Whether a finished tile of `size` bytes waits in pinned host memory: when the device's
    share is full and the host's is not. Beyond both it stays on the device, past the budget,
    rather than lock memory the host does not have (a CUDA out-of-memory error then says so)."""
    return resident + size > keep_bytes and pinned + size <= host_room


class PinnedCopies:
    """Moves waiting tiles to pinned host memory and back on a side stream, so that the
    copies overlap the decoder's kernels (CUDA); up to HOST_FRACTION of the host's memory."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.room = HOST_FRACTION * available_bytes(torch.device("cpu"))

    def on_host(self, t) -> bool:
        return t.device != self.device

    def to_host(self, t):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy ends
        return host

    def to_device(self, tiles):
        """Start bringing tiles to the device: (tensors, event to wait for)."""
        with torch.cuda.stream(self.stream):
            moved = [t.to(self.device, non_blocking=True) for t in tiles]
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def ready(self, moved, event):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in moved:
            t.record_stream(compute)  # allocated on the side stream, used on this one
        return moved


def host_copies_for(device: torch.device) -> Optional[PinnedCopies]:
    """How tiles wait off the device: in pinned host memory on CUDA; on the CPU they stay."""
    return PinnedCopies(device) if device.type == "cuda" else None


class _Placement:
    """Where finished tiles wait between layers: on the device while their bytes fit
    `keep_bytes`, else off it (`host_copies_for`) while the host has room."""

    def __init__(self, device: torch.device, keep_bytes: float, progress: Optional[tqdm] = None,
                 room: float = math.inf):
        self.device, self.keep_bytes, self.resident = device, keep_bytes, 0
        # bytes of waiting tiles the memory budget allows: beyond it, layers recompute rather
        # than store (whatever `offload` says of where stored tiles wait)
        self.room = room
        self.copies = host_copies_for(device)
        self.pinned = 0
        self.progress = progress

    def store(self, t, keep=False):
        size = t.numel() * t.element_size()
        if self.copies is None or keep or not waits_on_host(
                size, self.resident, self.keep_bytes, self.pinned, self.copies.room):
            self.resident += size
            return t
        self.pinned += size
        return self.copies.to_host(t)

    def release(self, t):
        if t is None:
            return
        if self.copies is not None and self.copies.on_host(t):
            self.pinned -= t.numel() * t.element_size()
        else:
            self.resident -= t.numel() * t.element_size()

    def fetch(self, tiles):
        """Start bringing waiting tiles to the device; (tensors, event to wait for or None)."""
        if self.copies is None or not any(self.copies.on_host(t) for t in tiles):
            return tiles, None
        return self.copies.to_device(tiles)

    def ready(self, moved, event):
        return moved if event is None else self.copies.ready(moved, event)


class _Tiles:
    """A list of tiles and where they wait; `map` runs a function tile by tile."""

    def __init__(self, tiles, place: _Placement, moments=None, view=None):
        self.tiles, self.place, self.moments = tiles, place, moments
        self.view = view  # tile -> the map the next layer reads, if not the tile itself

    def source(self, t):
        """What the next layer reads of tile t: the tile, or a lazy map made from it (an
        upsampled tile, computed band by band whenever read, never stored)."""
        return Dense(t) if self.view is None else self.view(t)

    def map(self, fn, *others: "_Tiles", consume=False, groups=None, keep=False) -> "_Tiles":
        """fn over the tiles (and the matching tiles of `others`), the next tile's copy in flight
        while one computes. With consume, each input tile is released as soon as its output
        exists, so a layer never holds two full copies. With groups, each output's GroupNorm
        moments are taken while it is still on the device."""
        sets, place = (self, *others), self.place
        out, moments = [], [] if groups else None
        pending = place.fetch([s.tiles[0] for s in sets])
        for i in range(len(self.tiles)):
            args = place.ready(*pending)
            pending = (place.fetch([s.tiles[i + 1] for s in sets])
                       if i + 1 < len(self.tiles) else None)
            result = fn(*args)
            # an output written over its input tile (a ResNet block's second half) holds no
            # bytes of its own: the input is released first, so they are counted once
            in_place = consume and result.data_ptr() == args[0].data_ptr()
            del args
            if groups:
                moments.append(group_moments(result, groups))
            if in_place:
                place.release(self.tiles[i])
                self.tiles[i] = None
            out.append(place.store(result, keep))
            del result
            if consume:
                for owner in sets:
                    place.release(owner.tiles[i])
                    owner.tiles[i] = None
        if place.progress is not None:
            place.progress.update(1)
        return _Tiles(out, place, (groups, moments) if groups else None)

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
            centred = x.float() - mean_c  # a new tensor: x itself may still be a skip input
            return torch.addcmul(norm.bias.view(1, c, 1, 1), centred, scale,
                                 out=centred).to(x.dtype)
        return apply

    def _tile_moments(self, groups):
        if self.moments is not None and self.moments[0] == groups:
            return self.moments[1]
        # not taken when the tiles were made: one pass over them (a lazy tile's band by band)
        return [map_moments(self.source(self.place.ready(*self.place.fetch([t]))[0]),
                            groups).merged() for t in self.tiles]

    def _sync_stats(self, norm):
        """Per (sample, group): mean over all tiles' elements, and the variance with each tile's
        n/(n-1) correction, as the reference SyncGN defines it. Per-tile moments are merged
        exactly (Chan's formula), on the device: no host round trip."""
        counts, means, m2s = zip(*self._tile_moments(norm.num_groups))
        total = sum(counts)
        mean = sum(n * m for n, m in zip(counts, means)) / total
        var = sum(n / (n - 1) * (m2 + n * (m - mean) ** 2)
                  for n, m, m2 in zip(counts, means, m2s)) / total
        return mean, torch.rsqrt(var + norm.eps)


def _activation(norm):
    return lambda t: F.silu(norm(t), inplace=True)


def _prologue(tiles: "_Tiles", norm: nn.GroupNorm, sync: bool):
    """tile -> the GroupNorm + SiLU to apply to its bands: with SyncGN the sample's statistics,
    else the tile's own (its moments, one reduction over the tile)."""
    if sync:
        act = _activation(tiles.normalizer(norm, True))
        return lambda t: act

    def own(t):
        return map_moments(tiles.source(t), norm.num_groups).normalizer(norm)
    return own


def _waiting_bytes(x: _Tiles, channels: int, scale: int = 1) -> int:
    """fp32 bytes of maps of `channels` channels over all of x's tiles (each `scale` x larger
    per side)."""
    return 4 * channels * scale ** 2 * sum(t.shape[0] * t.shape[2] * t.shape[3] for t in x.tiles)


def _recomputes(block: ResnetBlock, x: _Tiles) -> bool:
    """Whether an identity-shortcut block should run without its hidden tiles: when they and
    the block's input would not all fit where tiles wait on the device."""
    cin, cout = block.norm1.num_channels, block.conv2.out_channels
    return (block.identity_shortcut and x.view is None
            and _waiting_bytes(x, cin + cout) > x.place.room)


def _resnet(block: ResnetBlock, x: _Tiles, sync: bool, groups) -> _Tiles:
    """The block with each conv by row bands (lean_decode): a band normalises on its own, so no
    normalised tile exists whole; the output overwrites the hidden tile. A tile's peak: its
    input, its hidden map and a few bands."""
    if _recomputes(block, x):
        return _resnet_recomputed(block, x, sync, groups)
    act1 = _prologue(x, block.norm1, sync)
    h = x.map(lambda t: banded_conv(x.source(t), block.conv1, act1(t)),  # x stays: the skip
              groups=block.norm2.num_groups if sync else None)
    act2 = _prologue(h, block.norm2, sync)

    def second(t, skip):  # dropout is the identity at inference
        src = x.source(skip)
        # a lazy (wider) skip is read in bands no larger than the conv's
        rows = None if x.view is None else min(band_rows(src), band_rows(Dense(t)))
        return banded_residual(t, block.conv2, act2(t),
                               lambda r0, r1: block.shortcut(src.rows(r0, r1)), rows=rows)
    return h.map(second, x, consume=True, groups=groups)


def _resnet_recomputed(block: ResnetBlock, x: _Tiles, sync: bool, groups) -> _Tiles:
    """An identity-shortcut block whose hidden tiles never wait: one pass over the tiles for
    the hidden map's GroupNorm moments (its conv by bands, not stored), then each tile's output
    recomputes the hidden rows it needs and overwrites the tile (lean_decode's recomputation).
    The tiles waiting between layers are the block's input only: half the bytes."""
    act1 = _prologue(x, block.norm1, sync)
    hidden = _Tiles(x.tiles, x.place, view=lambda t: Convolved(Dense(t), block.conv1, act1(t)))
    act2 = _prologue(hidden, block.norm2, sync)

    def over(t):
        return residual_recomputed(t, block, act1(t), act2(t), band_rows(Dense(t)))
    out = x.map(over, consume=True, groups=groups)
    if x.place.progress is not None:
        x.place.progress.update(1)  # the hidden map's layer, never stored
    return out


def _upsample(upsample, t):
    """nearest-2x + conv by row bands: the 4x larger interpolated tile never exists whole."""
    return materialize(Upsampled(upsample, Dense(t)))


def _upsampled_tiles(x: _Tiles, upsample, groups, lazy: bool) -> _Tiles:
    """The upsample layer: its output tiles stored, or (lazy) never stored: the small tiles stay
    and the next block reads each upsampled tile band by band, recomputing its rows (the
    upsample conv runs about three times instead of once; the tiles waiting between layers
    hold a quarter of the bytes)."""
    if not lazy:
        return x.map(lambda t: _upsample(upsample, t), consume=True, groups=groups)
    out = _Tiles(x.tiles, x.place, view=lambda t: Upsampled(upsample, Dense(t)))
    if groups:
        out.moments = (groups, out._tile_moments(groups))
    if x.place.progress is not None:
        x.place.progress.update(1)
    return out


def _upsample_is_lazy(x: _Tiles, upsample, next_block) -> bool:
    """Whether storing the upsampled tiles and the next block's hidden tiles would exceed what
    may wait on the device (then they would go through host memory, 4x the bytes)."""
    channels = (upsample.conv.out_channels if upsample.with_conv else 0) + \
        (next_block.conv1.out_channels if next_block is not None else 0)
    return _waiting_bytes(x, channels, scale=2) > x.place.room


def _attn(block: AttnBlock, x: _Tiles, groups) -> _Tiles:
    # The published SyncGN leaves the attention block's own GroupNorm per tile (its reference
    # decodes agree with ours to 1e-6 only this way), and attention itself is per tile anyway.
    assert x.view is None, "lazy tiles only feed a ResNet block"
    return x.map(block, consume=True, groups=groups)


def _layer_count(dec) -> int:
    """Maps one decode runs (for the progress bar)."""
    resnets = 2 + sum(len(up.block) for up in dec.up)
    attns = 1 + sum(len(up.attn) for up in dec.up)
    return 2 + 2 * resnets + attns + dec.upsamplings + bool(dec.tanh_out)


def _decode_tiles(autoencoder, tiles: _Tiles, sync: bool) -> _Tiles:
    dec = autoencoder.decoder
    # all the decoder's GroupNorms have this many groups; a tile's moments are taken for it
    groups = dec.norm_out.num_groups if sync else None
    h = tiles.map(lambda z: dec.conv_in(autoencoder.post_quant_conv(z)), consume=True,
                  groups=groups)
    h = _resnet(dec.mid.block_1, h, sync, groups)
    h = _attn(dec.mid.attn_1, h, groups)
    h = _resnet(dec.mid.block_2, h, sync, groups)
    for level in reversed(range(len(dec.up))):
        up = dec.up[level]
        for i, block in enumerate(up.block):
            h = _resnet(block, h, sync, groups)
            if len(up.attn) > 0:
                h = _attn(up.attn[i], h, groups)
        if hasattr(up, "upsample"):
            following = dec.up[level - 1].block[0] if level > 0 else None
            h = _upsampled_tiles(h, up.upsample, groups,
                                 _upsample_is_lazy(h, up.upsample, following))
    act_out = _prologue(h, dec.norm_out, sync)
    h = h.map(lambda t: banded_conv(Dense(t), dec.conv_out, act_out(t)), consume=True,
              keep=True)  # three channels: the image stays on the device
    if dec.tanh_out:
        h = h.map(torch.tanh, consume=True, keep=True)
    return h


def resolve_tile_size(autoencoder, z, tile_size, overlap: int, budget: int):
    """(h, w) latent tile sides: default half of each side (the seed's tiling), 'auto' the
    fewest that fit the budget, or the given int / pair."""
    _, _, height, width = z.shape
    if tile_size is None:
        return max(height // 2, 1), max(width // 2, 1)
    if tile_size == "auto":
        return auto_tile_size(autoencoder.decoder, height, width, overlap, budget, z.shape[0])
    if isinstance(tile_size, int):
        return tile_size, tile_size
    return tuple(tile_size)


@torch.no_grad()
def tiled_decode(autoencoder, z, overlap: int = 8, sync_gn: bool = True, tile_size=None,
                 offload=None, budget_bytes=None, progress=False, recompute=True):
    """Decode latents z (already divided by the scale factor) tile by tile.

    tile_size: latent pixels per tile side, (h, w), int, or 'auto'; default half of each side.
    budget_bytes: device memory the decode may use (default: a share of what is free now);
    'auto' tiles fit it; where a layer's waiting tiles would exceed it, the layer recomputes
    rather than stores (recompute=False: never) and the tiles beyond it go to host memory.
    offload: True sends every waiting tile to host memory, False keeps all on the device
    (default: the budget)."""
    budget = default_budget(z.device) if budget_bytes is None else budget_bytes
    th, tw = resolve_tile_size(autoencoder, z, tile_size, overlap, budget)
    rows, cols = plan_axis(z.shape[2], th, overlap), plan_axis(z.shape[3], tw, overlap)
    if len(rows) == len(cols) == 1:
        # One tile is the whole latent, its statistics the map's (SyncGN's with the n/(n-1)
        # variance): the banded decoder computes them within a fraction of the memory.
        return full_decode(autoencoder, z, budget, lean=True, progress=progress,
                           unbiased=sync_gn)
    working = tile_working_bytes(autoencoder.decoder, rows[0].stop, cols[0].stop, z.shape[0])
    room = max(budget - working, 0)
    keep = {True: 0, False: math.inf}.get(offload, room)
    bar = progress_bar(total=_layer_count(autoencoder.decoder), unit="layer",
                       desc=f"Decoding {len(rows)}x{len(cols)} tiles", disable=not progress)
    place = _Placement(z.device, keep, bar, room if recompute else math.inf)
    pieces = [z[:, :, r.start:r.stop, c.start:c.stop] for r in rows for c in cols]
    with bar:
        decoded = _decode_tiles(autoencoder, _Tiles(pieces, place), sync_gn).tiles
    out_rows = []
    for i, r in enumerate(rows):
        row = [decoded[i * len(cols) + j][..., r.keep[0]:r.keep[1], c.keep[0]:c.keep[1]]
               for j, c in enumerate(cols)]
        out_rows.append(torch.cat(row, dim=-1))
    return torch.cat(out_rows, dim=-2)
