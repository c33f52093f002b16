"""Tests for FreeU applied from outside the UNet (ldm/scalecrafter/freeu.py)."""

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel, timestep_embedding
from ldm.scalecrafter.freeu import (
    fourier_filter,
    freeu_applied,
    freeu_stage_params,
    output_block_h_channels,
)

MC = 32
SD21_PARAMS = (1.1, 1.2, 0.9, 0.2)


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(in_channels=4, model_channels=MC, out_channels=4, num_res_blocks=1,
                     attention_resolutions=(2,), channel_mult=(1, 2, 4), num_head_channels=16,
                     context_dim=16, use_linear_in_transformer=True, legacy=False)
    # The final conv (and each ResBlock's last conv) may be zero-initialised in some layouts;
    # perturb every parameter so that all paths carry signal.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def _inputs(side=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, side, side, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 5, 16, generator=g)
    return x, t, context


def _no_hooks(unet):
    return all(not m._forward_pre_hooks for m in unet.modules())


# ---------------------------------------------------------------- independent reference

def _ref_lowfreq_filter(x, scale):
    """FreeU's skip filter, written without fftshift: in unshifted FFT coordinates the shifted
    window [c-1, c+1) on each axis is frequency indices {0, -1} (mod the side)."""
    H, W = x.shape[-2:]
    X = torch.fft.fft2(x.double())
    rows = sorted({0, (-1) % H})
    cols = sorted({0, (-1) % W})
    m = torch.ones(H, W, dtype=torch.float64)
    for r in rows:
        for c in cols:
            m[r, c] = scale
    return torch.fft.ifft2(X * m).real.to(x.dtype)


def _ref_forward(unet, x, timesteps, context, params):
    """UNet forward written out by hand, with FreeU applied to h and skip before each cat,
    choosing the stage from h's run-time channel count (as diffusers does with 1280/640)."""
    b1, b2, s1, s2 = params
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    h, skips = x, []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        skip = skips.pop()
        h = h[..., :skip.shape[-2], :skip.shape[-1]]
        c = h.shape[1]
        if c == 4 * unet.model_channels:
            b, s = b1, s1
        elif c == 2 * unet.model_channels:
            b, s = b2, s2
        else:
            b = s = None
        if b is not None:
            h = h.clone()
            h[:, : c // 2] = h[:, : c // 2] * b
            skip = _ref_lowfreq_filter(skip, s)
        h = block(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h)


# ---------------------------------------------------------------- tests

def test_h_channels_of_tiny_model():
    unet = _tiny_unet()
    # Output blocks: level 2 (128 ch) x2, level 1 (64 ch) x2, level 0 (32 ch) x2; the first
    # block of each level sees the (upsampled) h of the level below.
    assert output_block_h_channels(unet) == [128, 128, 128, 64, 64, 32]
    stages = [freeu_stage_params(c, MC, SD21_PARAMS) for c in output_block_h_channels(unet)]
    assert stages == [(1.1, 0.9)] * 3 + [(1.2, 0.2)] * 2 + [None]


def test_h_channels_of_sd21_layout():
    with torch.device("meta"):
        unet = UNetModel(model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                         attention_resolutions=(4, 2, 1), num_head_channels=64, context_dim=1024,
                         use_linear_in_transformer=True, legacy=False)
    assert output_block_h_channels(unet) == [1280] * 7 + [640] * 3 + [320] * 2


def test_none_is_noop_and_bad_params_rejected():
    unet = _tiny_unet()
    x, t, c = _inputs()
    with torch.no_grad():
        plain = unet(x, t, c)
        with freeu_applied(unet, None):
            assert _no_hooks(unet)
            out = unet(x, t, c)
    assert torch.equal(out, plain)
    with pytest.raises(ValueError):
        with freeu_applied(unet, (1.0, 1.0, 1.0)):
            pass
    assert _no_hooks(unet)


def test_identity_params_match_plain_forward():
    unet = _tiny_unet()
    x, t, c = _inputs()
    with torch.no_grad():
        plain = unet(x, t, c)
        with freeu_applied(unet, (1.0, 1.0, 1.0, 1.0)):
            out = unet(x, t, c)
    # b = 1 and s = 1 are exact identities (scale 1 skips the FFT round trip).
    assert torch.equal(out, plain)


def test_hooks_removed_after_context_and_after_exception():
    unet = _tiny_unet()
    x, t, c = _inputs()
    with torch.no_grad():
        plain = unet(x, t, c)
        with freeu_applied(unet, SD21_PARAMS):
            assert not _no_hooks(unet)
            inside = unet(x, t, c)
        assert _no_hooks(unet)
        assert not torch.allclose(inside, plain, atol=1e-4)
        assert torch.equal(unet(x, t, c), plain)

        with pytest.raises(RuntimeError, match="boom"):
            with freeu_applied(unet, SD21_PARAMS):
                unet(x, t, c)
                raise RuntimeError("boom")
        assert _no_hooks(unet)
        assert torch.equal(unet(x, t, c), plain)


@pytest.mark.parametrize("side", [16, 13])  # 13: odd latent sides exercise the crop path
def test_matches_independent_reference(side):
    unet = _tiny_unet()
    x, t, c = _inputs(side)
    with torch.no_grad():
        ref = _ref_forward(unet, x, t, c, SD21_PARAMS)
        with freeu_applied(unet, SD21_PARAMS):
            out = unet(x, t, c)
        plain = unet(x, t, c)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5, rel
    # and FreeU actually changed something
    assert (out - plain).abs().max() / plain.abs().max() > 1e-3


def test_reference_loop_without_freeu_equals_unet():
    """Guards the reference itself: with identity params it must reproduce UNetModel.forward."""
    unet = _tiny_unet()
    x, t, c = _inputs(13)
    with torch.no_grad():
        ref = _ref_forward(unet, x, t, c, (1.0, 1.0, 1.0, 1.0))  # still runs its FFTs
        plain = unet(x, t, c)
    assert (ref - plain).abs().max() / plain.abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [0.9, 0.2, 1.5])
@pytest.mark.parametrize("side", [8, 7])
def test_fourier_filter_dc_and_checkerboard(scale, side):
    const = torch.full((2, 3, side, side), 2.5)
    assert torch.allclose(fourier_filter(const, threshold=1, scale=scale), const * scale,
                          atol=1e-5)
    if side % 2 == 0:  # the Nyquist checkerboard lies outside the low-frequency window
        i = torch.arange(side)
        checker = ((-1.0) ** (i[:, None] + i[None, :])).expand(2, 3, side, side)
        assert torch.allclose(fourier_filter(checker, threshold=1, scale=scale), checker,
                              atol=1e-5)


def test_fourier_filter_matches_reference_and_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    assert fourier_filter(x, scale=1.0) is x
    # an FFT round trip in float32: ~eps * log2(n) * max|x| apart (5.5e-7 seen over 200 seeds)
    assert torch.allclose(fourier_filter(x, scale=1.0 - 1e-9), x, atol=1e-5)
    for H, W in [(8, 8), (7, 10), (1, 4)]:
        x = torch.randn(2, 3, H, W, generator=g)
        assert torch.allclose(fourier_filter(x, scale=0.3), _ref_lowfreq_filter(x, 0.3),
                              atol=1e-5)
    xh = torch.randn(1, 2, 8, 8, generator=g).half()
    out = fourier_filter(xh, scale=0.5)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), _ref_lowfreq_filter(xh.float(), 0.5), atol=2e-3)
