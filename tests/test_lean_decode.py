"""The banded (lean) full decode: the plain decoder's numbers on every path it can take, and the
reference image; recomputation where the budget asks for it."""
import pytest
import torch
from conftest import reference, rel_err

from ldm.scalecrafter import lean_decode as lean
from ldm.scalecrafter.lean_decode import full_decode, lean_decode


@pytest.fixture(scope="module")
def vae(tiny_pipe):
    return tiny_pipe.model.first_stage_model


def _latent(h, w, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_matches_the_reference_image(tiny_pipe):
    data = reference("tiny-sd21-sample-ddim-eta1-dilate2.npz")
    z = torch.from_numpy(data["latent"]) / tiny_pipe.model.scale_factor
    # small bands (a few rows) and a budget nothing fits: every lean path runs
    image = lean_decode(tiny_pipe.model.first_stage_model, z, budget_bytes=0, band_bytes=4096)
    assert rel_err(image, data["image_full"]) <= 1e-4


# band_bytes 1 -> two rows per band; 3000 -> a few rows; 2**30 -> one band
@pytest.mark.parametrize("budget", [None, 0, 3 * 10 ** 5])
@pytest.mark.parametrize("band_bytes", [1, 3000, 2 ** 30])
def test_equals_the_plain_decode(vae, budget, band_bytes):
    z = _latent(13, 10)  # odd height: a one-row last band, an odd upsampled band edge
    with torch.no_grad():
        plain = vae.decode(z)
    assert rel_err(lean_decode(vae, z, budget, band_bytes), plain) <= 1e-5


def test_batch_of_two_equals_the_plain_decode(vae):
    z = torch.cat([_latent(9, 12, seed=4), _latent(9, 12, seed=5)])
    with torch.no_grad():
        plain = vae.decode(z)
    assert rel_err(lean_decode(vae, z, 0, 3000), plain) <= 1e-5


def test_budget_switches_to_recomputation(vae, monkeypatch):
    """Nothing recomputed without a budget; with none left, the identity-shortcut blocks
    recompute their hidden maps and upsampled maps stay lazy."""
    calls = {"recompute": 0, "lazy": 0}
    recompute = lean.LeanDecoder._resnet_recompute
    moments = lean.LeanDecoder.moments

    def counting_recompute(self, *args):
        calls["recompute"] += 1
        return recompute(self, *args)

    def counting_moments(self, src):
        calls["lazy"] += isinstance(src, lean.Upsampled)
        return moments(self, src)
    monkeypatch.setattr(lean.LeanDecoder, "_resnet_recompute", counting_recompute)
    monkeypatch.setattr(lean.LeanDecoder, "moments", counting_moments)
    z = _latent(6, 7, seed=1)
    lean_decode(vae, z, None, 1)
    assert calls == {"recompute": 0, "lazy": 0}
    lean_decode(vae, z, 0, 1)
    dec = vae.decoder
    # a block right after an upsample reads the lazy upsampled map: it stores its hidden map
    after_upsample = {id(dec.up[i - 1].block[0]) for i in range(1, len(dec.up))}
    identity = sum(b.norm1.num_channels == b.conv2.out_channels and id(b) not in after_upsample
                   for blocks in [[dec.mid.block_1, dec.mid.block_2]] + [u.block for u in dec.up]
                   for b in blocks)
    assert calls == {"recompute": identity, "lazy": sum(hasattr(u, "upsample") for u in dec.up)}


def test_overwritten_rows_keep_what_the_next_band_reads():
    t = torch.arange(10.0).view(1, 1, 10, 1).clone()
    rows = lean.Overwritten(t, keep=2)
    rows.write(0, 4, -torch.ones(1, 1, 4, 1))
    assert rows.rows(2, 6).flatten().tolist() == [2, 3, 4, 5]  # originals of rows 2, 3
    with pytest.raises(AssertionError):
        rows.rows(1, 5)


def test_the_full_decode_is_banded_whatever_the_budget(vae, monkeypatch):
    """So that an image's numbers never depend on the memory free when it was decoded; the
    plain decoder only when asked for."""
    z = _latent(8, 8, seed=2)
    seen = []
    monkeypatch.setattr(lean, "lean_decode", lambda *a, **k: seen.append(("lean", a[2])) or 0)
    monkeypatch.setattr(vae, "decode", lambda z, tick=None: seen.append("plain") or 0)
    full_decode(vae, z, budget_bytes=10 ** 12)
    full_decode(vae, z, budget_bytes=1)
    full_decode(vae, z, lean=False)
    assert seen == [("lean", 10 ** 12), ("lean", 1), "plain"]


def test_the_pipelines_full_decode_is_banded_within_its_budget(tiny_pipe, monkeypatch):
    from ldm import pipeline
    from ldm.pipeline import GenerationOptions

    z = _latent(8, 8, seed=3)
    with torch.no_grad():
        plain = tiny_pipe.model.first_stage_model.decode(z / tiny_pipe.model.scale_factor)
    ran = []
    monkeypatch.setattr(lean, "lean_decode",
                        lambda *a, **k: ran.append(a[2]) or lean_decode(*a, **k))
    for budget_gb in (2 ** -30, 1000):  # one byte, and far more than the plain decoder needs
        opts = GenerationOptions(H=64, W=64, decode_budget_gb=budget_gb)
        assert rel_err(tiny_pipe.decode(z, opts, progress=False), plain) <= 1e-5
    assert ran == [1, 1000 * 2 ** 30]  # each budget reached the banded decoder
    assert pipeline.full_decode is full_decode


@pytest.mark.parametrize("lean", [False, True])
def test_the_full_decode_ticks_once_a_block_either_way(vae, lean):
    """The untiled decode's progress: the plain and the banded decoder tick at the same places,
    decoder_ticks times, without changing a number."""
    from ldm.modules.diffusionmodules.model import decoder_ticks

    z, ticks = _latent(9, 12), []
    with torch.no_grad():
        plain = vae.decode(z)
        out = (lean_decode(vae, z, budget_bytes=0, tick=lambda: ticks.append(1)) if lean
               else vae.decode(z, lambda: ticks.append(1)))
        assert torch.equal(full_decode(vae, z, lean=lean, progress=True), out)
    assert len(ticks) == decoder_ticks(vae.decoder) > 1
    assert rel_err(out, plain) <= 1e-5


def _latent_size_blocks(dec):
    """The identity-shortcut ResNet blocks that run at the latent's size (the mid blocks and
    those of the deepest level, before its upsample)."""
    blocks = [dec.mid.block_1, dec.mid.block_2, *dec.up[len(dec.up) - 1].block]
    return sum(b.norm1.num_channels == b.conv2.out_channels for b in blocks)


def test_the_budget_is_met_to_the_byte(vae, monkeypatch):
    """A map fits when its bytes plus four bands do: with exactly that budget the latent-size
    blocks keep their hidden maps and the first upsampled map is stored; one byte less and
    they recompute, or it stays lazy."""
    ran = {"recompute": 0, "lazy": 0}
    recompute, moments = lean.LeanDecoder._resnet_recompute, lean.LeanDecoder.moments
    monkeypatch.setattr(lean.LeanDecoder, "_resnet_recompute", lambda self, *a: (
        ran.__setitem__("recompute", ran["recompute"] + 1), recompute(self, *a))[1])
    monkeypatch.setattr(lean.LeanDecoder, "moments", lambda self, src: (
        ran.__setitem__("lazy", ran["lazy"] + isinstance(src, lean.Upsampled)),
        moments(self, src))[1])
    dec, z, band = vae.decoder, _latent(6, 7, seed=1), 1
    width = dec.mid.block_1.norm1.num_channels
    pixels = z.shape[2] * z.shape[3]
    first = dec.up[len(dec.up) - 1].upsample.conv.out_channels
    hidden = dec.up[len(dec.up) - 2].block[0].conv1.out_channels
    blocks_fit = 4 * pixels * 2 * width + 4 * band
    upsample_fits = 4 * 4 * pixels * (first + hidden) + 4 * band

    def counts(budget):
        ran.update(recompute=0, lazy=0)
        lean_decode(vae, z, budget, band)
        return dict(ran)
    plain_blocks = _latent_size_blocks(dec)
    assert plain_blocks >= 2
    assert (counts(blocks_fit - 1)["recompute"] - counts(blocks_fit)["recompute"]
            == plain_blocks)
    lazy_ups = sum(hasattr(u, "upsample") for u in dec.up)
    assert counts(upsample_fits - 1)["lazy"] == lazy_ups
    assert counts(upsample_fits)["lazy"] == lazy_ups - 1
