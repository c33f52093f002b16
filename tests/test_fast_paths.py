"""The GPU fast paths, checked on the CPU against the direct forms they replace: polyphase
re-dilation, query-chunked VAE attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.scalecrafter import memory, redilation
from ldm.scalecrafter.redilation import ConvOverride, dilated_conv, polyphase_conv, redilated_conv


@pytest.fixture
def polyphase_on_cpu(monkeypatch):
    monkeypatch.setitem(redilation.POLYPHASE, "cpu", True)


def _close(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("d", range(2, 9))
def test_polyphase_equals_dilated_conv(d):
    gen = torch.Generator().manual_seed(d)
    weight, bias = torch.randn(5, 3, 3, 3, generator=gen), torch.randn(5, generator=gen)
    for h, w in ((16, 16), (13, 10), (7, 9), (3, 5)):  # multiples of d or not, below d too
        x = torch.randn(2, 3, h, w, generator=gen)
        _close(polyphase_conv(x, weight, bias, d), F.conv2d(x, weight, bias, 1, d, d))


@pytest.mark.parametrize("d", [2, 3, 4])
def test_polyphase_dispersed_5x5_and_groups(d):
    gen = torch.Generator().manual_seed(10 + d)
    x = torch.randn(1, 4, 11, 14, generator=gen)
    weight = torch.randn(6, 2, 5, 5, generator=gen)
    _close(polyphase_conv(x, weight, None, d, groups=2),
           F.conv2d(x, weight, None, 1, 2 * d, d, groups=2))


@pytest.mark.parametrize("d", range(2, 9))
@pytest.mark.parametrize("stride", [1, 2])
def test_dilated_conv_policy_path_equals_conv2d(polyphase_on_cpu, d, stride):
    gen = torch.Generator().manual_seed(20 + d)
    weight, bias = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, generator=gen)
    for h, w in ((16, 12), (15, 9)):
        x = torch.randn(1, 3, h, w, generator=gen)
        _close(dilated_conv(x, weight, bias, (stride, stride), d),
               F.conv2d(x, weight, bias, stride, d, d))


def test_fractional_factor_keeps_its_resize_on_the_polyphase_path(polyphase_on_cpu):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(1, 3, 20, 17, generator=torch.Generator().manual_seed(3))
    fast = redilated_conv(conv, x, 2.5)
    redilation.POLYPHASE["cpu"] = False
    _close(fast, redilated_conv(conv, x, 2.5))


def test_polyphase_policy_unet_call_matches_reference(polyphase_on_cpu, tiny_pipe):
    from conftest import cases, reference, rel_err
    from ldm.scalecrafter.redilation import overridden_convs, uniform_dilation_map

    case = cases()["unet"][1]
    data = reference(f"tiny-sd21-unet-{case['name']}.npz")
    plan = uniform_dilation_map(tiny_pipe.model.unet, case["dilate"], case["skip"])
    args = [torch.from_numpy(data[k]) for k in ("x", "t", "context")]
    with torch.no_grad(), overridden_convs(tiny_pipe.model.unet,
                                           {k: ConvOverride(v) for k, v in plan.items()}):
        out = tiny_pipe.model.apply_model(*args)
    assert rel_err(out, data["out"]) <= 1e-4


def _einsum_attention(q, k, v):
    """The LDM VAE's original attention: the whole N x N matrix of scores."""
    scores = torch.einsum("bhic,bhjc->bhij", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhij,bhjc->bhic", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("chunk_bytes", [None, 1, 7 * 4 * 37, 10 ** 9])
def test_vae_attention_equals_einsum_attention(chunk_bytes):
    from ldm.modules.diffusionmodules.model import attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 37, 16, generator=gen) for _ in range(3))
    # 1 byte: one query per chunk; 7*4*37: 7 rows, a last short chunk
    _close(attention(q, k, v, chunk_bytes), _einsum_attention(q, k, v))


@pytest.mark.parametrize("batch, chunks", [(1, [4] * 7 + [2]), (2, [2] * 15)])
def test_attn_block_chunks_queries(monkeypatch, tiny_pipe, batch, chunks):
    """Each chunk's scores fit ATTENTION_CHUNK_BYTES for the whole batch (n_samples images)."""
    from ldm.modules.diffusionmodules import model

    block = tiny_pipe.model.first_stage_model.decoder.mid.attn_1
    h = torch.randn(batch, block.q.in_channels, 6, 5, generator=torch.Generator().manual_seed(6))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(model.F, "scaled_dot_product_attention",
                        lambda q, k, v: calls.append(q.shape[-2]) or sdpa(q, k, v))
    monkeypatch.setattr(model, "ATTENTION_CHUNK_BYTES", 4 * 4 * 30)  # 4 queries of 30 keys
    with torch.no_grad():
        out = block.attend(h)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (block.q, block.k, block.v))
        ref = block.proj_out(_einsum_attention(q, k, v)[:, 0].transpose(1, 2).reshape(h.shape))
    assert calls == chunks
    _close(out, ref)


def test_auto_tiles_are_the_fewest_that_fit_the_budget(tiny_pipe):
    from ldm.scalecrafter.tiled_decode import auto_tile_size, plan_axis, tile_working_bytes

    dec = tiny_pipe.model.first_stage_model.decoder
    assert auto_tile_size(dec, 64, 48, 8, 10 ** 12) == (64, 48)  # everything fits: one tile
    half = tile_working_bytes(dec, 64, 36)  # two tiles of 64 x 36 cover 64 x 64 (overlap 8)
    th, tw = auto_tile_size(dec, 64, 64, 8, 2 * half)  # a tile gets half the budget
    rows, cols = plan_axis(64, th, 8), plan_axis(64, tw, 8)
    assert len(rows) * len(cols) == 2 and {th, tw} == {64, 36}
    assert len(plan_axis(64, 64, 8)) * len(plan_axis(64, 35, 8)) == 3  # a pixel less: 3 tiles
    th, tw = auto_tile_size(dec, 64, 64, 8, 2 * tile_working_bytes(dec, 27, 27))
    rows, cols = plan_axis(64, th, 8), plan_axis(64, tw, 8)
    assert (len(rows), len(cols), th, tw) == (3, 3, 27, 27)
    assert rows[-1].stop - rows[-1].start >= th - 2  # no sliver: the last tile is near full
    # a budget nothing fits: the smallest tiles allowed (stride >= 8), still covering the axis
    th, tw = auto_tile_size(dec, 40, 40, 8, 1)
    assert th - 8 >= 8 and plan_axis(40, th, 8)[-1].stop == 40


def test_auto_tiles_of_a_strip_narrower_than_the_overlap_cost_what_they_decode(tiny_pipe,
                                                                               capsys):
    """An 8-pixel strip under overlap 24: its one tile is held at 26 (wider than the overlap)
    but decodes 8 rows, and is costed so: one tile fits, without a warning."""
    from ldm.pipeline import GenerationOptions
    from ldm.scalecrafter.tiled_decode import auto_tile_size, plan_axis, tile_working_bytes

    dec = tiny_pipe.model.first_stage_model.decoder
    budget = 2 * tile_working_bytes(dec, 8, 40) + 1000
    th, tw = auto_tile_size(dec, 8, 40, 24, budget)
    assert len(plan_axis(8, th, 24)) * len(plan_axis(40, tw, 24)) == 1
    opts = GenerationOptions(H=64, W=320, tiled_decoding=True, tile_size="auto", overlap=24,
                             decode_budget_gb=budget / 2**30)
    capsys.readouterr()
    assert tiny_pipe.decode_tiles(torch.zeros(1, 4, 8, 40), opts) == (th, tw)
    assert capsys.readouterr().err == ""


def test_tiles_waiting_in_host_memory_or_on_device_and_auto_tiling(tiny_pipe):
    from conftest import rel_err
    from ldm.scalecrafter.tiled_decode import tiled_decode

    vae = tiny_pipe.model.first_stage_model
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    seed = tiled_decode(vae, z, 4, True)
    # no budget at all: every tile waits in host memory (on the CPU: stays) and the layers
    # recompute rather than store (upsampled tiles lazy, identity blocks without hidden tiles)
    assert rel_err(tiled_decode(vae, z, 4, True, budget_bytes=0), seed) <= 1e-5  # (banded convs)
    # the default tiling is the seed's: half of each side
    assert torch.equal(seed, tiled_decode(vae, z, 4, True, tile_size=(8, 12)))
    assert not torch.equal(seed, tiled_decode(vae, z, 4, True, tile_size=(10, 12)))
    auto = tiled_decode(vae, z, 4, True, tile_size="auto", budget_bytes=10 ** 12)
    assert torch.equal(auto, tiled_decode(vae, z, 4, True, tile_size=(16, 24)))  # one tile
    assert rel_err(auto, seed) > 1e-6


def test_auto_tile_option_is_checked_and_reaches_the_decoder(tiny_pipe, monkeypatch):
    from ldm import pipeline
    from ldm.pipeline import GenerationOptions

    opts = GenerationOptions(H=128, W=128, tiled_decoding=True, overlap=8, sync_gn=True,
                             tile_size="auto", decode_budget_gb=0.5)
    opts.validate()  # auto tiles need no overlap-vs-tile check
    for bad in ("big", 0, True, (8, 0), (8, 8, 8), (8.0, 8), "8x0", "8x"):
        with pytest.raises(ValueError, match="--tile_size"):
            GenerationOptions(tile_size=bad, tiled_decoding=True, overlap=2).validate()
    for text in ("12x16", "12X16"):  # the metadata's HxW, as the API is given it
        sidecar_tiles = GenerationOptions(tile_size=text, tiled_decoding=True, overlap=2)
        sidecar_tiles.validate()
        assert sidecar_tiles.tile_size == (12, 16)
    seen = {}
    monkeypatch.setattr(pipeline, "tiled_decode",
                        lambda *a, **k: seen.update(args=a, **k) or torch.zeros(1, 3, 128, 128))
    tiny_pipe.decode(torch.zeros(1, 4, 16, 16), opts, progress=False)
    # auto is resolved before the decode (one tile: the whole latent fits 0.5 GiB)
    assert seen["args"][2:] == (8, True, (16, 16)) and seen["budget_bytes"] == 2 ** 29


def test_half_weights_keep_the_vae_fp32_and_stay_close(monkeypatch):
    """prepare_for_inference is a no-op on the CPU; with a half dtype for the CPU (as CUDA gets
    fp16) every module but the VAE is halved. (CPU autocast runs GroupNorm in the weights' dtype,
    so the numbers of half weights are checked on CUDA: shellscripts/gpu_check.sh.)"""
    from conftest import TINY_CKPT, TINY_CONFIG
    from ldm import precision
    from ldm.pipeline import Pipeline

    pipe = Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", precision="autocast")
    assert {p.dtype for p in pipe.model.parameters()} == {torch.float32}
    monkeypatch.setitem(precision.HALF_WEIGHTS, "cpu", torch.bfloat16)
    pipe = Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", precision="autocast")
    assert {p.dtype for p in pipe.model.first_stage_model.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.model.cond_stage_model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="half-precision weights"):
        from ldm.pipeline import GenerationOptions
        pipe.sample(["x"], GenerationOptions(precision="full", steps=1), None)


def test_recompute_off_still_sends_tiles_beyond_the_budget_to_the_host(tiny_pipe, monkeypatch):
    from ldm.scalecrafter import tiled_decode as td

    seen = []
    real = td._Placement.__init__

    def spy(self, device, keep_bytes, progress=None, room=math.inf):
        seen.append((keep_bytes, room))
        real(self, device, keep_bytes, progress, room)
    monkeypatch.setattr(td._Placement, "__init__", spy)
    vae = tiny_pipe.model.first_stage_model
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    td.tiled_decode(vae, z, 4, True, budget_bytes=0)
    td.tiled_decode(vae, z, 4, True, budget_bytes=0, recompute=False)
    td.tiled_decode(vae, z, 4, True, budget_bytes=0, offload=False)
    assert seen == [(0, 0), (0, math.inf), (math.inf, 0)]


def test_tiles_wait_on_the_host_only_within_its_share():
    from ldm.scalecrafter.tiled_decode import waits_on_host

    gb = 2 ** 30
    assert not waits_on_host(gb, 0, 2 * gb, 0, 8 * gb)  # the device's share has room
    assert waits_on_host(gb, 2 * gb, 2 * gb, 0, 8 * gb)  # it is full: the host takes it
    assert waits_on_host(gb, 2 * gb, 2 * gb, 7 * gb, 8 * gb)  # up to the host's share
    # both full: it stays on the device, past the budget, rather than pin what is not there
    assert not waits_on_host(gb, 2 * gb, 2 * gb, 7 * gb + 1, 8 * gb)
    assert not waits_on_host(gb, 0, 0, 0, 0)  # the CPU: no pinned memory at all


def test_an_output_written_over_its_input_tile_is_counted_once():
    """A layer that overwrites its input tile (a ResNet block's second half) never holds two
    copies: what waits on the device is counted as the tiles' bytes, not twice that."""
    from ldm.scalecrafter.tiled_decode import _Placement, _Tiles

    place = _Placement(torch.device("cpu"), math.inf)
    tiles = [torch.ones(256) for _ in range(3)]  # 1 KiB each
    for t in tiles:
        place.store(t)
    seen = []
    store = place.store
    place.store = lambda t, keep=False: (store(t, keep), seen.append(place.resident))[0]
    out = _Tiles(tiles, place).map(lambda t: t.mul_(2), consume=True)
    assert seen == [3 * 1024] * 3 and place.resident == 3 * 1024
    out.map(lambda t: t * 2, consume=True)  # a new tensor: both exist until the input goes
    assert seen[3:] == [4 * 1024] * 3 and place.resident == 3 * 1024


def _segment(total, active, pool=(0, 0), device=0, stream=0):
    return {"device": device, "total_size": total, "active_size": active,
            "segment_pool_id": pool, "stream": stream}


def test_decode_budget_counts_only_the_default_pools_cache():
    """A CUDA graph's private pool (a compiled UNet's intermediates) is no memory for a decode."""
    from ldm.scalecrafter.memory import reusable_cached_bytes

    mib = 2 ** 20
    segments = [_segment(64 * mib, 16 * mib), _segment(20 * mib, 20 * mib),
                _segment(512 * mib, 2 * mib, pool=(1, 0)),  # a graph pool, mostly unused
                _segment(8 * mib, 0, device=1)]  # another card's cache
    assert reusable_cached_bytes(segments, 0) == 48 * mib
    assert reusable_cached_bytes(segments, 1) == 8 * mib
    assert reusable_cached_bytes([], 0) == 0


def test_decode_budget_counts_other_streams_cache_only_where_it_can_be_freed():
    """The allocator hands a stream's free blocks to that stream only; another stream's wholly
    unused segment is freed for whoever runs short, a partly used one is not."""
    from ldm.scalecrafter.memory import reusable_cached_bytes

    mib = 2 ** 20
    segments = [_segment(64 * mib, 16 * mib, stream=7),  # the decode's stream: 48 MiB reusable
                _segment(32 * mib, 0, stream=9),  # a side stream's segment, wholly unused
                _segment(40 * mib, 8 * mib, stream=9)]  # partly used: its 32 MiB stay there
    assert reusable_cached_bytes(segments, 0, stream=7) == (48 + 32) * mib
    assert reusable_cached_bytes(segments, 0, stream=9) == (32 + 32) * mib
    assert reusable_cached_bytes(segments, 0) == (48 + 32 + 32) * mib


@pytest.mark.parametrize("fraction, expected_gib", [(1.0, 10 + 1), (0.5, 8 - 6 + 1),
                                                     (0.2, 0 + 1)])
def test_cuda_budget_keeps_within_the_per_process_limit(monkeypatch, fraction, expected_gib):
    """16 GiB card, 10 GiB free, 6 GiB reserved by this process (1 GiB of it reusable):
    `set_per_process_memory_fraction` caps what the allocator may still reserve."""
    from ldm.scalecrafter import memory

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 6 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: fraction,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda i: type("Stream", (), {"cuda_stream": 5}))
    monkeypatch.setattr(torch.cuda, "memory_snapshot",
                        lambda: [_segment(6 * gib, 5 * gib, device=3, stream=5),
                                 _segment(gib, gib // 2, device=3, stream=6)])
    got = memory.available_bytes(torch.device("cuda", 3))
    assert got == expected_gib * gib


def fake_cgroups(tmp_path, membership, files):
    """A /sys/fs/cgroup tree: {relative folder: {file: text}}; /proc/self/cgroup's lines."""
    for folder, contents in files.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (tmp_path / folder / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    return str(tmp_path), str(tmp_path / "self-cgroup")


GiB = 2**30


def test_a_cgroup_v2_limit_counts_its_parents_and_reclaimable_cache(tmp_path):
    root, membership = fake_cgroups(tmp_path, "0::/job/step\n", {
        "job": {"memory.max": str(6 * GiB), "memory.current": str(2 * GiB)},  # 4 GiB room
        "job/step": {"memory.max": str(8 * GiB), "memory.current": str(3 * GiB),
                     "memory.stat": f"anon 1\ninactive_file {GiB}\n"},  # 6 GiB room
        ".": {"memory.max": "max", "memory.current": "123"}})
    assert memory.cgroup_available_bytes(root, membership) == 4 * GiB


def test_a_childs_tighter_cgroup_limit_wins_over_its_parents(tmp_path):
    """Kubernetes containers and Slurm steps: the child's limit is often the tight one."""
    root, membership = fake_cgroups(tmp_path, "0::/job/step\n", {
        "job": {"memory.max": str(16 * GiB), "memory.current": str(2 * GiB)},  # 14 GiB room
        "job/step": {"memory.max": str(4 * GiB), "memory.current": str(GiB)}})  # 3 GiB room
    assert memory.cgroup_available_bytes(root, membership) == 3 * GiB


def test_a_cgroup_over_its_limit_leaves_no_room(tmp_path):
    root, membership = fake_cgroups(tmp_path, "0::/\n", {
        ".": {"memory.max": str(2 * GiB), "memory.current": str(3 * GiB)}})
    assert memory.cgroup_available_bytes(root, membership) == 0


def test_a_cgroup_v1_limit_inside_a_container(tmp_path):
    """In a container /proc/self/cgroup says '/': the limit is at the controller's root."""
    root, membership = fake_cgroups(tmp_path, "9:cpu,cpuacct:/\nnot a cgroup line\n4:memory:/\n", {
        "memory": {"memory.limit_in_bytes": str(3 * GiB), "memory.usage_in_bytes": str(GiB),
                   "memory.stat": f"total_inactive_file {GiB // 2}\n"}})
    assert memory.cgroup_available_bytes(root, membership) == 2 * GiB + GiB // 2


@pytest.mark.parametrize("limit", ["max", "9223372036854771712"])
def test_no_cgroup_limit_leaves_the_host_figure(tmp_path, monkeypatch, limit):
    version = "0::/" if limit == "max" else "4:memory:/"
    folder = "." if limit == "max" else "memory"
    name = "memory.max" if limit == "max" else "memory.limit_in_bytes"
    usage = "memory.current" if limit == "max" else "memory.usage_in_bytes"
    root, membership = fake_cgroups(tmp_path, version + "\n", {folder: {name: limit,
                                                                        usage: str(GiB)}})
    assert memory.cgroup_available_bytes(root, membership) is None
    assert memory.cgroup_available_bytes(root, str(tmp_path / "missing")) is None


def test_the_cpu_budget_stays_within_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_available_bytes", lambda: GiB)
    assert memory.available_bytes(torch.device("cpu")) == GiB
    monkeypatch.setattr(memory, "cgroup_available_bytes", lambda: None)
    assert memory.available_bytes(torch.device("cpu")) > GiB  # the host's (this machine: 24 GB)


def test_tiles_wait_on_the_device_to_the_byte_of_the_budget(tiny_pipe, monkeypatch):
    """What the budget leaves beside one tile's working set holds the waiting tiles: with
    exactly the bytes of the latent-size blocks' input and hidden tiles they are stored, and
    with exactly those of the first upsample's tiles and the next hidden ones, so are these;
    one byte less and the blocks recompute, or the upsample stays lazy."""
    from ldm.scalecrafter import tiled_decode as td

    ran = {"recomputed": 0, "lazy": 0}
    recomputed, upsampled = td._resnet_recomputed, td._upsampled_tiles
    monkeypatch.setattr(td, "_resnet_recomputed", lambda *a: (
        ran.__setitem__("recomputed", ran["recomputed"] + 1), recomputed(*a))[1])
    monkeypatch.setattr(td, "_upsampled_tiles", lambda x, up, groups, lazy: (
        ran.__setitem__("lazy", ran["lazy"] + lazy), upsampled(x, up, groups, lazy))[1])
    vae = tiny_pipe.model.first_stage_model
    dec, tile, overlap = vae.decoder, (6, 8), 2
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(5))
    rows, cols = td.plan_axis(10, tile[0], overlap), td.plan_axis(14, tile[1], overlap)
    pixels = sum((r.stop - r.start) * (c.stop - c.start) for r in rows for c in cols)
    working = td.tile_working_bytes(dec, rows[0].stop, cols[0].stop)
    deepest = dec.up[len(dec.up) - 1]
    width = dec.mid.block_1.norm1.num_channels
    blocks_fit = working + 4 * pixels * 2 * width
    upsample_fits = working + 4 * 4 * pixels * (
        deepest.upsample.conv.out_channels + dec.up[len(dec.up) - 2].block[0].conv1.out_channels)

    def counts(budget):
        ran.update(recomputed=0, lazy=0)
        td.tiled_decode(vae, z, overlap, True, tile_size=tile, budget_bytes=budget)
        return dict(ran)
    latent_size_blocks = sum(b.norm1.num_channels == b.conv2.out_channels for b in
                             [dec.mid.block_1, dec.mid.block_2, *deepest.block])
    assert len(rows) * len(cols) == 4 and latent_size_blocks >= 2
    assert (counts(blocks_fit - 1)["recomputed"] - counts(blocks_fit)["recomputed"]
            == latent_size_blocks)
    upsamples = sum(hasattr(u, "upsample") for u in dec.up)
    assert counts(upsample_fits - 1)["lazy"] == upsamples
    assert counts(upsample_fits)["lazy"] == upsamples - 1


def test_auto_tiles_beyond_the_budget_are_said_once(tiny_pipe, monkeypatch, capsys):
    """Where no tile fits, `auto` decodes in the smallest allowed tiles over the budget: one
    warning line says so (once in a multi-batch run); tiles that fit go without a word."""
    from ldm import pipeline
    from ldm.pipeline import GenerationOptions
    from ldm.scalecrafter.tiled_decode import tile_fits, tile_working_bytes

    monkeypatch.setattr(tiny_pipe, "_warned", set())
    opts = GenerationOptions(H=512, W=768, tiled_decoding=True, tile_size="auto", overlap=4)
    z = torch.zeros(1, 4, 64, 96)
    capsys.readouterr()
    smallest = tiny_pipe.decode_tiles(z, opts, budget=1)
    assert tiny_pipe.decode_tiles(z, opts, budget=1) == smallest
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: no tile of a batch of 1 fits half the decode budget of 0.0 MiB: "
                     f"decoding in the smallest tiles, {smallest[0]}x{smallest[1]}, beyond it "
                     f"(fewer --n_samples, or more free memory, would fit)"]
    decoder = tiny_pipe.model.first_stage_model.decoder
    just_enough = 2 * tile_working_bytes(decoder, *smallest)
    assert tile_fits(decoder, *smallest, just_enough)
    assert not tile_fits(decoder, *smallest, just_enough - 1)
    monkeypatch.setattr(tiny_pipe, "_warned", set())
    assert tiny_pipe.decode_tiles(z, opts, budget=just_enough) == smallest
    assert tiny_pipe.decode_tiles(z, opts, budget=10 ** 12) == (64, 96)
    assert capsys.readouterr().err == ""
    # a batch of two needs twice the bytes: the budget that fitted one tile fits no longer,
    # and a decode resolving its own tiles says so too
    monkeypatch.setattr(pipeline, "tiled_decode", lambda *a, **k: torch.zeros(2, 3, 1, 1))
    small = GenerationOptions(H=512, W=768, tiled_decoding=True, tile_size="auto", overlap=4,
                              decode_budget_gb=just_enough / 2 ** 30)
    tiny_pipe.decode(torch.zeros(2, 4, 64, 96), small, progress=False)
    assert "no tile of a batch of 2 fits" in capsys.readouterr().err
