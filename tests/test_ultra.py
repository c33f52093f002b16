"""The full method for ultra-high resolution: per-layer and fractional dilation, dispersion,
noise-damped CFG and presets, against the published implementation's runs."""
import re

import numpy as np
import pytest
import torch

from conftest import (REF, REPO, SETTINGS, TINY_CKPT, TINY_CONFIG,
                      check_preset_against_authors, reference, rel_err, ultra_cases)
from ldm.pipeline import GenerationOptions
from ldm.scalecrafter.redilation import conv3x3_names, redilated_conv
from ldm.scalecrafter.settings import (SettingsError, diffusers_conv_names, read_conv_list,
                                       read_dilation_settings)
from ldm.util import instantiate_from_config, load_config

TRANSFORM = REF / "dispersion" / "R20to1_new.mat"


def case_argv(case, outdir):
    argv = ["--prompt", case["prompt"], "--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT),
            "--H", str(case["H"]), "--W", str(case["W"]), "--steps", str(case["steps"]),
            "--ddim_eta", str(case["eta"]), "--scale", str(case["scale"]),
            "--seed", str(case["seed"]), "--n_iter", "1", "--n_samples", "1",
            "--precision", "full", "--device", "cpu", "--outdir", str(outdir), "--save_latent",
            "--dilate_settings", str(SETTINGS / case["dilate_settings"]),
            "--dilate_tau", str(case["dilate_tau"])]
    if case.get("progressive"):
        argv.append("--progressive_dilate")
    if "ndcfg_dilate_settings" in case:
        argv += ["--ndcfg_dilate_settings", str(SETTINGS / case["ndcfg_dilate_settings"]),
                 "--ndcfg_tau", str(case["ndcfg_tau"])]
    if "disperse_settings" in case:
        argv += ["--disperse_settings", str(SETTINGS / case["disperse_settings"]),
                 "--disperse_transform", str(TRANSFORM), "--inflate_tau", str(case["inflate_tau"])]
    return argv


@pytest.mark.parametrize("case", ultra_cases(), ids=lambda c: c["name"])
def test_ultra_case_through_the_cli(txt2img, tiny_pipe, tmp_path, case):
    from ldm.models.diffusion.ddim import ddim_timesteps

    ref = reference(f"ultra-{case['name']}.npz")
    assert txt2img.main(case_argv(case, tmp_path)) == 0
    latent = np.load(tmp_path / "samples" / "00000.npy")
    assert rel_err(latent[None], ref["latent"]) <= 1e-4
    image = tiny_pipe.decode(torch.from_numpy(latent[None]), GenerationOptions(precision="full"))
    assert rel_err(image, ref["image_full"]) <= 1e-4
    assert len(ddim_timesteps(case["steps"])) == ref["steps_run"]


@pytest.fixture(scope="module")
def sd21_unet():
    config = load_config(REPO / "configs" / "stable-diffusion" / "v2-inference.yaml")
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config)


def test_every_published_sd21_name_translates(sd21_unet):
    convs = set(conv3x3_names(sd21_unet))
    translation = diffusers_conv_names(sd21_unet)
    assert set(translation.values()) == convs  # one-to-one onto the 3x3 convs
    assert len(translation) == len(convs) == 52
    assert translation["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert translation["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert translation["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert translation["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    files = sorted(SETTINGS.glob("*dilate/*.txt"))
    assert len(files) == 6
    for path in files:
        theirs = read_dilation_settings(path, sd21_unet)
        ours = read_dilation_settings(REPO / "configs" / "scalecrafter" / path.parent.name /
                                      path.name, sd21_unet)
        assert theirs == ours and len(theirs) == len(path.read_text().split())
    disperse = SETTINGS / "disperse" / "sd2.1_2048x2048.txt"
    theirs = read_conv_list(disperse, sd21_unet)
    assert len(theirs) == 23 and theirs == read_conv_list(
        REPO / "configs" / "scalecrafter" / "disperse" / disperse.name, sd21_unet)


def published_sd_conv_names():
    """diffusers' names of SD 1.x/2.x's 3x3 convs and LDM's for the same convs, from the two
    published layouts: four levels of two ResNets (ResNet j of level i is input block 3i+j+1,
    of output level i, output block 3i+j, three per level), a downsampler closing every input
    level but the last (input block 3i+3), an upsampler in the last output block of every level
    but the last (behind its attention where the level has one: all but level 0), conv1/conv2
    are in_layers.2/out_layers.3, and the middle's ResNets sit around its attention."""
    names = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}

    def resnet(diffusers, ldm):
        names[f"{diffusers}.conv1"], names[f"{diffusers}.conv2"] = \
            f"{ldm}.in_layers.2", f"{ldm}.out_layers.3"

    for i in range(4):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{3 * i + j + 1}.0")
        if i < 3:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{3 * i + 3}.0.op"
        for j in range(3):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{3 * i + j}.0")
        if i < 3:
            names[f"up_blocks.{i}.upsamplers.0.conv"] = \
                f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.conv"
    for k in range(2):
        resnet(f"mid_block.resnets.{k}", f"middle_block.{2 * k}")
    return names


@pytest.mark.parametrize("config", ["v1-inference.yaml", "v2-inference.yaml"])
def test_the_diffusers_translation_is_the_published_layouts(config):
    """All 52 names, against the layouts themselves (the settings tests compare files read
    through the same translation, where a swapped pair would cancel out)."""
    config = load_config(REPO / "configs" / "stable-diffusion" / config)
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    expected = published_sd_conv_names()
    assert len(expected) == 52
    assert diffusers_conv_names(unet) == expected


@pytest.mark.parametrize("name", [
    "down_blocks.9.resnets.0.conv1", "down_blocks.4.resnets.0.conv1",
    "up_blocks.4.resnets.7.conv2", "down_blocks.3.downsamplers.0.conv",
    "up_blocks.3.upsamplers.0.conv", "up_blocks.1.resnets.3.conv1"])
def test_unknown_setting_name_is_an_error(sd21_unet, tmp_path, name):
    """On SD 2.1 every name of the authors' layout exists, so an unknown one is a typo (an
    off-by-one level would quietly drop a layer from the dilation if it were skipped)."""
    path = tmp_path / "bad.txt"
    path.write_text(f"down_blocks.1.resnets.0.conv1:2\n{name}:2\n")
    with pytest.raises(SettingsError, match=f"bad.txt:2: '{re.escape(name)}' is not a 3x3"):
        read_dilation_settings(path, sd21_unet)


def test_the_names_skipped_where_absent_are_the_sd_layouts(sd21_unet):
    """SD_LAYOUT_SLOTS, the names a smaller UNet (SDXL) may lack, are exactly the real SD 2.1
    UNet's conv names."""
    from ldm.scalecrafter.settings import SD_LAYOUT_SLOTS

    assert set(diffusers_conv_names(sd21_unet)) == SD_LAYOUT_SLOTS


@pytest.mark.parametrize("value, message", [
    ("nan", "must be a number from 1 \\(the trained conv\\) to 64, got nan"),
    ("inf", "to 64, got inf"), ("0", "from 1 .* got 0"), ("-2", "got -2"),
    ("0.5", "got 0.5"), ("1e300", "to 64, got 1e300"), ("two", "'two' is not a number")])
def test_a_factor_that_is_no_dilation_is_an_error(sd21_unet, tmp_path, value, message):
    """Refused with its line when the file is read (before the checkpoint is), not mid-run."""
    path = tmp_path / "bad.txt"
    path.write_text(f"down_blocks.1.resnets.0.conv1:2\ndown_blocks.1.resnets.0.conv2:{value}\n")
    with pytest.raises(SettingsError, match=f"bad.txt:2: .*{message}"):
        read_dilation_settings(path, sd21_unet)


def test_a_dispersion_list_switched_off_is_still_checked(sd21_unet, tmp_path):
    """inflate_tau 0 switches dispersion off (as the published presets do), but a misspelt
    conv in its list is still refused before any run."""
    from ldm.scalecrafter.settings import build_settings

    path = tmp_path / "disperse.txt"
    path.write_text("down_blocks.9.resnets.0.conv1\n")
    opts = GenerationOptions(dilate=2, disperse_settings=str(path), inflate_tau=0)
    with pytest.raises(SettingsError, match="disperse.txt:1"):
        build_settings(sd21_unet, opts)


def test_a_transform_for_other_kernels_than_3x3_is_refused_naming_it(sd21_unet, tmp_path):
    from ldm.scalecrafter.settings import build_settings

    listed = tmp_path / "disperse.txt"
    listed.write_text("down_blocks.1.resnets.0.conv1\n")
    transform = tmp_path / "R5to7.npy"
    np.save(transform, np.zeros((49, 25)))
    opts = GenerationOptions(dilate=2, disperse_settings=str(listed), inflate_tau=1,
                             disperse_transform=str(transform))
    with pytest.raises(SettingsError, match=r"R5to7.npy: the transform maps kernels of 25 "
                                            r"entries; the UNet's are 3x3 \(9 columns\)"):
        build_settings(sd21_unet, opts)


def ndcfg_opts(**kw):
    base = dict(H=64, W=64, steps=4, scale=7.5, seed=4, precision="full", ddim_eta=0.0,
                dilate_settings=str(SETTINGS / "dilate/sd2.1_2048x2048.txt"), dilate_tau=3,
                ndcfg_dilate_settings=str(SETTINGS / "ndcfg_dilate/sd2.1_2048x2048.txt"))
    base.update(kw)
    return GenerationOptions(**base)


def test_ndcfg_with_tau_zero_is_plain_cfg(tiny_pipe):
    damped = tiny_pipe.generate(["a fox"], ndcfg_opts(ndcfg_tau=0), progress=False)
    plain = tiny_pipe.generate(["a fox"], ndcfg_opts(ndcfg_tau=0, ndcfg_dilate_settings=None),
                               progress=False)
    assert torch.equal(damped.latents, plain.latents)
    assert damped.unet_batches == [2] * 4


def test_ndcfg_at_scale_one_is_the_conditional_model_alone(tiny_pipe):
    """Scale 1 is no guidance (the published pipelines skip CFG there), so noise-damped CFG has
    no unconditional branch to damp: the conditional prediction alone, one row a step."""
    damped = tiny_pipe.generate(["a fox"], ndcfg_opts(scale=1.0, ndcfg_tau=2), progress=False)
    plain = tiny_pipe.generate(["a fox"], ndcfg_opts(scale=1.0, ndcfg_tau=0,
                                                     ndcfg_dilate_settings=None), progress=False)
    assert torch.equal(damped.latents, plain.latents)
    assert damped.unet_batches == [1] * 4


def test_noise_damped_pass_evaluates_only_the_unconditional_half(tiny_pipe, monkeypatch):
    from ldm.scalecrafter import guidance
    segments = []
    original = guidance.overridden_convs

    def spy(unet, overrides):
        if isinstance(overrides, list):
            segments.append([rows for rows, _ in overrides])
        return original(unet, overrides)

    monkeypatch.setattr(guidance, "overridden_convs", spy)
    result = tiny_pipe.generate(["a fox"], ndcfg_opts(ndcfg_tau=2), progress=False)
    # 1.5 batches during the ndcfg_tau steps: 2 CFG rows + 1 damped unconditional row
    assert result.unet_batches == [3, 3, 2, 2]
    assert segments == [[2, 1], [2, 1]]
    plain = tiny_pipe.generate(["a fox"], ndcfg_opts(ndcfg_tau=0), progress=False)
    assert not torch.allclose(result.latents, plain.latents)


def centre_tap_transform():
    R = np.zeros((25, 9))
    for i in range(3):
        for j in range(3):
            R[(i + 1) * 5 + (j + 1), i * 3 + j] = 1.0
    return R


def test_centre_tap_dispersion_is_the_plain_conv():
    from ldm.scalecrafter.dispersion import disperse_kernel
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 11, 9)
    kernel = disperse_kernel(conv.weight.detach(), centre_tap_transform())
    assert kernel.shape == (5, 3, 5, 5)
    # a zero-padded 5x5 against a 3x3: other conv algorithms, so float32 rounding apart
    # (up to ~eps * 75 taps * max|y|); a wrong tap is O(0.1) apart
    assert torch.allclose(redilated_conv(conv, x, 1, kernel), conv(x), atol=1e-5)
    assert torch.allclose(redilated_conv(conv, x, 2, kernel), redilated_conv(conv, x, 2),
                          atol=1e-5)


def test_presets_set_values_and_flags_override(txt2img):
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048_disperse", "--steps", "7",
                               "--ckpt", "x"])
    assert (args.H, args.W, args.steps, args.dilate_tau, args.ndcfg_tau) == (2048, 2048, 7, 37, 37)
    assert args.inflate_tau > 0 and args.progressive_dilate and args.tiled_decoding
    for name in ("dilate_settings", "ndcfg_dilate_settings", "disperse_settings",
                 "disperse_transform"):
        assert (REPO / getattr(args, name)).is_file()
    presets = txt2img.list_presets()
    assert {"sd2.1_1024x1024", "sd2.1_1280x1280", "sd2.1_2048x1024", "sd2.1_2048x2048",
            "sd2.1_2048x2048_disperse", "sd2.1_4096x4096_experimental"} <= set(presets)


# The authors' scripts (text2image.py, text2image_xl.py): DDIM with eta 1, their guidance
# scale and, by default since 2023-10-16, FreeU with their values per family.
AUTHORS_SAMPLING = {"sd1": (7.5, [1.2, 1.4, 0.9, 0.2]), "sd2": (7.5, [1.1, 1.2, 0.9, 0.2]),
                    "sdxl": (5, [1.1, 1.2, 0.6, 0.4])}


def test_every_preset_samples_as_the_authors_scripts(txt2img):
    presets = txt2img.list_presets()
    assert len(presets) >= 16
    for name in presets:
        args = txt2img.parse_args(["--preset", name])
        scale, freeu = AUTHORS_SAMPLING[args.preset_family]
        assert (args.scale, args.freeu, args.ddim_eta) == (scale, freeu, 1.0), name
        assert args.timestep_spacing == "leading", name  # diffusers' DDIM, as theirs load it
        plms = txt2img.parse_args(["--preset", name, "--plms"])
        assert (plms.ddim_eta, plms.timestep_spacing) == (0.0, "leading")
        dpm = txt2img.parse_args(["--preset", name, "--dpm"])  # takes neither
        assert (dpm.ddim_eta, dpm.timestep_spacing) == (0.0, "uniform")
        txt2img.options_from_args(dpm).validate()


def test_no_tiled_decoding_takes_the_presets_tiling_with_it(txt2img):
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--no-tiled_decoding"])
    assert (args.tiled_decoding, args.sync_gn, args.tile_size) == (False, False, None)
    txt2img.options_from_args(args).validate()


def test_a_flag_sets_aside_the_preset_values_it_excludes(txt2img, tmp_path):
    """`--dilate` replaces a preset's per-layer file (and the reverse), a sampler without eta
    replaces its eta; every other preset value stays."""
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--dilate", "3", "--ckpt", "x"])
    assert args.dilate == 3 and args.dilate_settings is None
    assert args.ndcfg_dilate_settings and (args.dilate_tau, args.ndcfg_tau) == (37, 37)
    txt2img.options_from_args(args).validate()
    preset = tmp_path / "uniform.yaml"
    preset.write_text("dilate: 2\nddim_eta: 1.0\nscale: 7.5\n")
    args = txt2img.parse_args(["--preset", str(preset), "--dilate_settings", "f.txt", "--plms"])
    assert (args.dilate, args.dilate_settings, args.ddim_eta, args.scale) == (
        None, "f.txt", 0.0, 7.5)
    txt2img.options_from_args(args).validate()
    args = txt2img.parse_args(["--preset", str(preset), "--dpm"])
    assert (args.dilate, args.ddim_eta) == (2, 0.0)
    # a preset's SyncGN qualifies its tiled decoding: it goes with it, unless asked for
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--no-tiled_decoding"])
    assert not args.sync_gn and args.progressive_dilate
    txt2img.options_from_args(args).validate()
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--no-tiled_decoding", "--sync_gn"])
    with pytest.raises(ValueError, match="--sync_gn needs --tiled_decoding"):
        txt2img.options_from_args(args).validate()
    preset.write_text("sync_gn: true\n")  # a preset's own mistake is refused, not hidden
    with pytest.raises(ValueError, match="--sync_gn needs --tiled_decoding"):
        txt2img.options_from_args(txt2img.parse_args(["--preset", str(preset)])).validate()


def test_option_defaults_are_the_flags_defaults(txt2img):
    """GenerationOptions' defaults are txt2img's, so the API and the CLI make the same image."""
    import dataclasses

    args = txt2img.parse_args([])
    differ = {f.name: (f.default, getattr(args, f.name)) for f in dataclasses.fields(
        GenerationOptions) if hasattr(args, f.name) and f.default != getattr(args, f.name)}
    assert differ == {}
    assert GenerationOptions().dilate_tau == 20 and GenerationOptions().dilate_skip == 4


def test_dilate_tau_zero_is_the_plain_model(tiny_pipe):
    """tau 0 re-dilates no step (an ablation's end point), as ndcfg_tau and inflate_tau 0 do."""
    opts = dict(H=64, W=64, steps=3, seed=3, precision="full")
    none = tiny_pipe.generate(["a fox"], GenerationOptions(**opts, dilate=2, dilate_tau=0),
                              progress=False)
    plain = tiny_pipe.generate(["a fox"], GenerationOptions(**opts), progress=False)
    assert torch.equal(none.latents, plain.latents)


@pytest.mark.parametrize("preset, extra", [
    ("sd2.1_1280x1280", []),
    ("sd2.1_2048x2048_disperse", ["--ndcfg_tau", "2", "--inflate_tau", "1", "--overlap", "8"])])
def test_presets_run_end_to_end_on_the_tiny_model(txt2img, tmp_path, preset, extra):
    argv = ["--preset", preset, "--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT),
            "--H", "256", "--W", "384", "--steps", "2", "--dilate_tau", "2", *extra,
            "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--outdir", str(tmp_path), "--save_latent"]
    assert txt2img.main(argv) == 0
    assert np.isfinite(np.load(tmp_path / "samples" / "00000.npy")).all()


def test_tiled_decode_of_an_image_far_above_the_training_size(txt2img, tmp_path):
    """The experimental 4096 preset's machinery on the tiny model (trained at 256 x 256) for an
    image of 4.5x its pixels, 768 x 384: one step, decoded in 2 x 2 SyncGN tiles (the preset's
    `auto` fits the whole latent in one tile on the CPU, so the tile is given)."""
    from PIL import Image
    argv = ["--preset", "sd2.1_4096x4096_experimental", "--config", str(TINY_CONFIG),
            "--ckpt", str(TINY_CKPT), "--H", "384", "--W", "768", "--steps", "1",
            "--dilate_tau", "1", "--ndcfg_tau", "1", "--inflate_tau", "1", "--n_iter", "1",
            "--n_samples", "1", "--precision", "full", "--outdir", str(tmp_path),
            "--tile_size", "26x50", "--overlap", "4"]
    assert txt2img.main(argv) == 0
    with Image.open(tmp_path / "samples" / "00000.png") as image:
        assert image.size == (768, 384)
        assert "Tiles: 26x50" in image.text["parameters"]


def freeu_run(pipe, freeu):
    opts = GenerationOptions(H=64, W=64, steps=3, scale=5.0, seed=9, precision="full",
                             freeu=freeu)
    return pipe.generate(["a boat"], opts, progress=False).latents


def test_freeu_identity_is_plain_and_sd21_values_change_the_result(tiny_pipe):
    plain = freeu_run(tiny_pipe, None)
    assert torch.equal(freeu_run(tiny_pipe, (1.0, 1.0, 1.0, 1.0)), plain)
    changed = freeu_run(tiny_pipe, (1.1, 1.2, 0.9, 0.2))
    assert torch.isfinite(changed).all() and not torch.allclose(changed, plain)
    assert torch.equal(freeu_run(tiny_pipe, None), plain)  # hooks removed after the run


def test_autocast_runs_the_unet_in_bf16_on_cpu_and_decodes_in_fp32(tiny_pipe):
    dtypes = []
    hook = tiny_pipe.model.unet.out.register_forward_hook(
        lambda m, args, out: dtypes.append(out.dtype))
    try:
        opts = GenerationOptions(H=64, W=64, steps=2, scale=5.0, seed=9, precision="autocast")
        result = tiny_pipe.generate(["a boat"], opts, progress=False)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert result.decoded.dtype == torch.float32 and torch.isfinite(result.decoded).all()


# named, not globbed: an empty glob would skip the test rather than fail it
SD21_PRESETS = ["sd2.1_1024x1024", "sd2.1_1280x1280", "sd2.1_2048x1024", "sd2.1_2048x2048",
                "sd2.1_2048x2048_disperse"]


@pytest.mark.parametrize("name", SD21_PRESETS)
def test_sd21_presets_carry_the_authors_settings(txt2img, name):
    """Size, steps, taus, progressive and settings files as the authors' presets have them."""
    args = check_preset_against_authors(
        txt2img, name, REF / "scalecrafter-settings" / "presets" / f"{name}.yaml")
    assert args.preset_family == "sd2"


def test_the_shipped_dispersion_transform_is_the_authors():
    from ldm.scalecrafter.dispersion import load_dispersion_transform

    shipped = load_dispersion_transform(REPO / "configs" / "scalecrafter" / "transforms" /
                                        "R20to1.npy")
    assert np.abs(shipped - load_dispersion_transform(TRANSFORM)).max() <= 1e-12


def test_a_freeu_run_calls_the_unet_with_freeu_as_written_out(tiny_pipe):
    """The pipeline installs FreeU with the options' (b1, b2, s1, s2) in their order: a run's
    first UNet call equals the hand-written FreeU forward (test_freeu) on the same inputs."""
    from test_freeu import _ref_forward

    params = (1.1, 1.2, 0.9, 0.2)
    calls = []
    hook = tiny_pipe.model.unet.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, kwargs, out.detach().clone())),
        with_kwargs=True)
    try:
        freeu_run(tiny_pipe, params)
    finally:
        hook.remove()
    args, kwargs, out = calls[0]
    x, t = args[:2]
    context = args[2] if len(args) > 2 else kwargs.get("context")
    with torch.no_grad():
        ref = _ref_forward(tiny_pipe.model.unet, x, t, context, params)
    assert rel_err(out, ref) <= 1e-5


def test_a_preset_run_with_other_steps_says_what_its_taus_cover(txt2img):
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--steps", "5"])
    assert txt2img.preset_steps_warning(args, txt2img.options_from_args(args)) == (
        "warning: preset sd2.1_2048x2048 is made for 50 steps and its taus count steps "
        "(dilate_tau 37, ndcfg_tau 37): with --steps 5 they cover 5 of 5; set them for this "
        "length")
    for argv in (["--preset", "sd2.1_2048x2048"], ["--steps", "5", "--dilate", "2"],
                 ["--preset", "sd2.1_1024x1024", "--steps", "5", "--dilate_tau", "3"]):
        args = txt2img.parse_args(argv)
        assert txt2img.preset_steps_warning(args, txt2img.options_from_args(args)) == ""


def test_the_preset_steps_warning_leaves_out_features_turned_off(txt2img):
    args = txt2img.parse_args(["--preset", "sd2.1_1024x1024", "--dilate_settings", "",
                               "--steps", "2"])
    assert txt2img.preset_steps_warning(args, txt2img.options_from_args(args)) == ""


@pytest.mark.parametrize("data, message", [
    ("\ufeffdown_blocks.1.resnets.0.conv1:2\n".encode("utf-8"), None),  # Notepad's UTF-8
    (b"\x89PNG\r\n\x1a\n", "bad.txt is not UTF-8 text (byte 0): a binary file?")])
def test_a_settings_file_in_notepads_utf8_is_read_and_a_binary_one_named(sd21_unet, tmp_path,
                                                                          data, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    if message is None:
        assert read_dilation_settings(path, sd21_unet) == {"input_blocks.4.0.in_layers.2": 2.0}
    else:
        with pytest.raises(SettingsError, match=re.escape(message)):
            read_dilation_settings(path, sd21_unet)


def test_a_conv_given_two_factors_is_refused_and_a_repeat_is_not(sd21_unet, tmp_path):
    """Under its name or its diffusers name: the file cannot say which factor it means."""
    path = tmp_path / "twice.txt"
    path.write_text("down_blocks.1.resnets.0.conv1:2\nmiddle_block.0.in_layers.2:3\n"
                    "input_blocks.4.0.in_layers.2:2\n")  # the first line's conv, same factor
    assert read_dilation_settings(path, sd21_unet)["input_blocks.4.0.in_layers.2"] == 2.0
    path.write_text("down_blocks.1.resnets.0.conv1:2\nmiddle_block.0.in_layers.2:3\n"
                    "input_blocks.4.0.in_layers.2:4\n")
    with pytest.raises(SettingsError, match=re.escape(
            f"{path}:3: input_blocks.4.0.in_layers.2 has factor 2 at line 1: one factor a "
            f"conv")):
        read_dilation_settings(path, sd21_unet)


@pytest.mark.parametrize("line, message", [
    ('n_iter: "3"', None),  # a number in quotes: as the flag takes it
    ("n_iter: null", "n_iter must be set (the flag has no 'off'), got None"),
    ("n_iter: 2.5", "n_iter must be an integer, got 2.5"),
    ("freeu: 3", "freeu must be a list of 4, got 3"),
    ("freeu: [1, 2, x, 4]", "freeu must be a list of 4, each a number, got [1, 2, 'x', 4]"),
    ("tiled_decoding: yes please", "tiled_decoding must be true or false"),
    ("sync_gn: 1", "sync_gn must be true or false, got 1"),
    ("device: tpu", "device must be cpu, cuda, cuda:N or auto"),
    ("tile_size: big", "tile_size must be an integer, HxW or 'auto'"),
    ("timestep_spacing: sideways", "timestep_spacing must be one of uniform, leading, trailing"),
    ("dilate_settings: [a, b]", "dilate_settings must be text"),
])
def test_a_preset_value_is_checked_as_its_flag_would_be(txt2img, tmp_path, line, message):
    """A custom preset's wrong types were TypeErrors mid-run (or after loading)."""
    preset = tmp_path / "custom.yaml"
    preset.write_text(line + "\n")
    if message is None:
        assert txt2img.parse_args(["--preset", str(preset)]).n_iter == 3
        return
    with pytest.raises(txt2img.UsageError) as error:
        txt2img.parse_args(["--preset", str(preset)])
    assert str(error.value).startswith(f"preset {preset}: {message}"), str(error.value)
