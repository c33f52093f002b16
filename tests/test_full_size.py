"""Every preset at its real size on its family's real-size UNet, on the meta device: shapes
only, no arithmetic, so a 4096² SDXL step costs a fraction of a second. The tiny models check
the numbers; this checks that the authors' settings, fractional factors, dispersion and
noise-damped CFG fit the real layers at the real latent sizes (odd level sizes included),
through the polyphase re-dilation the GPU takes."""
import pytest
import torch

from conftest import REPO
from ldm.compat import meta_device
from ldm.modules.encoders.conditioning import Conditioning
from ldm.scalecrafter import redilation
from ldm.scalecrafter.freeu import freeu_applied
from ldm.scalecrafter.guidance import GuidedDenoiser
from ldm.scalecrafter.settings import build_settings
from ldm.util import instantiate_from_config, load_config

PRESETS = sorted(p.stem for p in (REPO / "configs" / "scalecrafter" / "presets").glob("*.yaml"))
CONFIGS = {"sd1": "v1-inference.yaml", "sd2": "v2-inference-v.yaml", "sdxl": "sd_xl_base.yaml"}
# text context width, pooled vector width (SDXL's 1280 pooled + 6 x 256 size embeddings)
CONDITIONING = {"sd1": (768, None), "sd2": (1024, None), "sdxl": (2048, 2816)}
_models = {}


def test_every_preset_is_here():
    """Named, so that a glob gone empty (a moved folder) fails instead of testing nothing."""
    assert len(PRESETS) == 16 and {p.split("_")[0] for p in PRESETS} == {"sd1.5", "sd2.1", "sdxl"}


def full_size_model(family):
    if family not in _models:
        config = load_config(REPO / "configs" / "stable-diffusion" / CONFIGS[family])
        with meta_device():
            _models[family] = instantiate_from_config(config.model)
    return _models[family]


def meta_conditioning(family):
    width, pooled = CONDITIONING[family]
    context = torch.empty(1, 77, width, device="meta")
    return Conditioning(context, None if pooled is None else torch.empty(1, pooled, device="meta"))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_presets_first_step_fits_the_real_model_at_its_real_size(txt2img, monkeypatch, preset):
    """Step 0 has every feature of the preset on (re-dilation, dispersion, the damped pass)."""
    args = txt2img.parse_args(["--preset", preset, "--ckpt", "x"])
    opts = txt2img.options_from_args(args)
    model = full_size_model(args.preset_family)
    assert model.family == args.preset_family
    monkeypatch.setitem(redilation.POLYPHASE, "meta", True)
    polyphase_calls = []
    real_polyphase = redilation.polyphase_conv
    monkeypatch.setattr(redilation, "polyphase_conv",
                        lambda *a, **k: polyphase_calls.append(a[3]) or real_polyphase(*a, **k))
    settings = build_settings(model.unet, opts)
    cond = meta_conditioning(args.preset_family)
    denoiser = GuidedDenoiser(model, cond, meta_conditioning(args.preset_family), opts.scale,
                              settings)
    x = torch.empty(1, 4, opts.H // 8, opts.W // 8, device="meta")
    with torch.no_grad(), freeu_applied(model.unet, opts.freeu):
        out = denoiser.guided_output(x, torch.zeros(1, dtype=torch.long, device="meta"), 0)
    assert out.shape == x.shape
    assert denoiser.unet_batches == [3 if opts.ndcfg_tau > 0 else 2]
    assert polyphase_calls and min(polyphase_calls) >= 2
