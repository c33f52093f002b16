"""SD 1.x: the CLIP text encoder, the UNet, whole runs and presets against the published
implementation's tiny SD 1.5 set (../shared/reference/tiny-sd1)."""
import json

import numpy as np
import pytest
import torch

from conftest import REF, REPO, check_preset_against_authors, rel_err
from ldm.scalecrafter.redilation import ConvOverride, overridden_convs, uniform_dilation_map
from ldm.util import instantiate_from_config, load_config

SD1 = REF / "tiny-sd1"
SD1_CONFIG = SD1 / "tiny-sd15.yaml"
SD1_CKPT = SD1 / "tiny-sd15.ckpt"


def sd1_cases():
    return json.loads((SD1 / "cases.json").read_text())["models"][0]


def sd1_ref(name):
    return np.load(SD1 / name)


@pytest.fixture(scope="session")
def sd1_pipe():
    from ldm.pipeline import Pipeline
    return Pipeline.load(SD1_CONFIG, SD1_CKPT, device="cpu")


@pytest.mark.parametrize("case", sd1_cases()["cond"], ids=lambda c: c["name"])
def test_tokens_and_conditioning_match_reference(sd1_pipe, case):
    ref = sd1_ref(case["file"])
    embedder = sd1_pipe.model.cond_stage_model
    assert torch.equal(embedder.tokenizer(case["prompts"]), torch.from_numpy(ref["tokens"]))
    cond = sd1_pipe.model.get_learned_conditioning(case["prompts"])
    assert rel_err(cond, ref["cond"]) <= 1e-4


def test_tokenizer_pads_with_end_of_text_and_keeps_it_last(sd1_pipe):
    tokens = sd1_pipe.model.cond_stage_model.tokenizer(["", "word " * 100])
    assert tokens[0, :3].tolist() == [49406, 49407, 49407] and (tokens[0, 1:] == 49407).all()
    assert tokens[1, 0] == 49406 and tokens[1, 76] == 49407 and (tokens[1, 1:76] != 49407).all()


@pytest.mark.parametrize("case", sd1_cases()["unet"], ids=lambda c: c["name"])
def test_unet_call_matches_reference(sd1_pipe, case):
    ref = sd1_ref(case["file"])
    unet = sd1_pipe.model.unet
    plan = {}
    if "dilate" in case:
        plan = {name: ConvOverride(f)
                for name, f in uniform_dilation_map(unet, case["dilate"], case["skip"]).items()}
    with torch.no_grad(), overridden_convs(unet, plan):
        out = sd1_pipe.model.apply_model(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]),
                                         torch.from_numpy(ref["context"]))
    assert rel_err(out, ref["out"]) <= 1e-4


def sample_argv(case, outdir):
    return ["--prompt", case["prompt"], "--config", str(SD1_CONFIG), "--ckpt", str(SD1_CKPT),
            "--H", str(case["H"]), "--W", str(case["W"]), "--steps", str(case["steps"]),
            "--ddim_eta", str(case["eta"]), "--scale", str(case["scale"]),
            "--timestep_spacing", "uniform",  # the reference's protocol (LDM's DDIM)
            "--seed", str(case["seed"]), "--dilate", str(case["dilate"]),
            "--dilate_tau", str(case["dilate_tau"]), "--dilate_skip", str(case["dilate_skip"]),
            "--n_iter", "1", "--n_samples", "1", "--precision", "full", "--device", "cpu",
            "--outdir", str(outdir), "--save_latent", "--metadata", "json"]


@pytest.mark.parametrize("case", sd1_cases()["sample"], ids=lambda c: c["name"])
def test_sample_run_through_the_cli_matches_reference(txt2img, sd1_pipe, tmp_path, case):
    ref = sd1_ref(case["file"])
    assert txt2img.main(sample_argv(case, tmp_path)) == 0
    latent = np.load(tmp_path / "samples" / "00000.npy")[None]
    assert rel_err(latent, ref["latent"]) <= 1e-4
    decoded = sd1_pipe.decode(torch.from_numpy(latent), sd1_pipe_opts())
    assert rel_err(decoded, ref["image_full"]) <= 1e-4
    cond = sd1_pipe.model.get_learned_conditioning([case["prompt"]])
    assert rel_err(cond, ref["cond"]) <= 1e-4


def sd1_pipe_opts(**kw):
    from ldm.pipeline import GenerationOptions
    return GenerationOptions(precision="full", **kw)


def test_v1_inference_config_builds_the_published_keys_and_shapes():
    manifest = json.loads((REF / "sd15-v1-inference.keys.json").read_text())
    config = load_config(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest and len(shapes) == 1143
    assert model.family == "sd1"


def test_negative_prompt_is_the_unconditional_branch(sd1_pipe, tmp_path, txt2img):
    """CFG's unconditional rows are the negative prompt's encoding: a run with a negative
    prompt equals a run whose unconditional text embedding was replaced by that encoding."""
    from ldm.scalecrafter.guidance import GuidedDenoiser
    model = sd1_pipe.model
    opts = sd1_pipe_opts(H=64, W=64, steps=3, scale=5.0, seed=3, negative_prompt="blurry")
    seen = []
    original = GuidedDenoiser.__init__

    def spy(self, model_, cond, uncond=None, *args, **kwargs):
        seen.append(uncond)
        original(self, model_, cond, uncond, *args, **kwargs)

    GuidedDenoiser.__init__ = spy
    try:
        with_negative = sd1_pipe.generate(["a boat"], opts, progress=False).latents
        plain = sd1_pipe.generate(["a boat"], sd1_pipe_opts(H=64, W=64, steps=3, scale=5.0,
                                                            seed=3), progress=False).latents
    finally:
        GuidedDenoiser.__init__ = original
    from ldm.modules.encoders.conditioning import as_conditioning
    contexts = [as_conditioning(uncond).context for uncond in seen]
    assert torch.equal(contexts[0], model.get_learned_conditioning(["blurry"]))
    assert torch.equal(contexts[1], model.get_learned_conditioning([""]))
    assert not torch.allclose(with_negative, plain)
    argv = ["--prompt", "a boat", "--negative_prompt", "blurry, low quality",
            "--config", str(SD1_CONFIG), "--ckpt", str(SD1_CKPT), "--H", "64", "--W", "64",
            "--steps", "2", "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--outdir", str(tmp_path), "--metadata", "json"]
    assert txt2img.main(argv) == 0
    sidecar = json.loads((tmp_path / "samples" / "00000.json").read_text())
    assert "\nNegative prompt: blurry, low quality\n" in sidecar["parameters"]
    assert sidecar["options"]["negative_prompt"] == "blurry, low quality"


SD15_PRESETS = ["sd1.5_1024x1024", "sd1.5_1280x1280", "sd1.5_2048x1024", "sd1.5_2048x2048",
                "sd1.5_2048x2048_disperse"]


AUTHORS = REPO / "tests" / "data" / "authors-sd15"


def test_sd15_settings_files_are_the_authors_in_our_names():
    """Each shipped file holds exactly the authors' file's convs and factors, translated from
    diffusers' names (tests/data/authors-sd15: their repository's files)."""
    from ldm.scalecrafter.settings import read_conv_list, read_dilation_settings
    config = load_config(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    ours = REPO / "configs" / "scalecrafter"
    files = sorted(AUTHORS.glob("*dilate/*.txt"))
    assert len(files) == 6
    for path in files:
        theirs = read_dilation_settings(path, unet)
        assert theirs == read_dilation_settings(ours / path.parent.name / path.name, unet)
        assert len(theirs) == len(path.read_text().split()), path.name
    disperse = "disperse/sd1.5_2048x2048.txt"
    assert read_conv_list(AUTHORS / disperse, unet) == read_conv_list(ours / disperse, unet)
    # spot checks of the translation, in our names
    dilate = read_dilation_settings(ours / "dilate" / "sd1.5_2048x2048.txt", unet)
    assert len(dilate) == 39 and dilate["middle_block.0.in_layers.2"] == 4
    assert dilate["input_blocks.9.0.op"] == 3  # down_blocks.2.downsamplers.0.conv
    assert dilate["output_blocks.8.2.conv"] == 2  # up_blocks.2.upsamplers.0.conv


@pytest.mark.parametrize("name", SD15_PRESETS)
def test_sd15_presets_carry_the_authors_settings(txt2img, name):
    """Size, steps, taus, progressive and settings files as the authors' presets have them."""
    args = check_preset_against_authors(txt2img, name, AUTHORS / "presets" / f"{name}.yaml")
    # text2image.py's sampling: scale 7.5, eta 1, diffusers' DDIM (leading), SD 1.5's FreeU
    assert (args.scale, args.ddim_eta, args.timestep_spacing) == (7.5, 1.0, "leading")
    assert args.freeu == [1.2, 1.4, 0.9, 0.2] and args.preset_family == "sd1"
    assert name in txt2img.list_presets()
    # --dpm sets aside what DPM-Solver++ does not take: the eta and the spacing
    dpm = txt2img.parse_args(["--preset", name, "--ckpt", "x", "--dpm"])
    assert (dpm.ddim_eta, dpm.timestep_spacing) == (0.0, "uniform")
    txt2img.options_from_args(dpm).validate()


def test_sd15_preset_runs_end_to_end_on_the_tiny_sd1_model(txt2img, tmp_path):
    argv = ["--preset", "sd1.5_2048x2048_disperse", "--config", str(SD1_CONFIG),
            "--ckpt", str(SD1_CKPT), "--H", "128", "--W", "192", "--steps", "3",
            "--dilate_tau", "2", "--ndcfg_tau", "2", "--inflate_tau", "1", "--overlap", "4",
            "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--outdir", str(tmp_path), "--save_latent"]
    assert txt2img.main(argv) == 0
    assert np.isfinite(np.load(tmp_path / "samples" / "00000.npy")).all()


@pytest.mark.parametrize("preset, config", [
    ("sd1.5_1024x1024", REF / "tiny" / "tiny-sd21.yaml"),
    ("sd2.1_1024x1024", SD1_CONFIG)])
def test_a_preset_for_another_family_is_refused(txt2img, tmp_path, capsys, preset, config):
    argv = ["--preset", preset, "--config", str(config), "--ckpt", str(SD1_CKPT),
            "--outdir", str(tmp_path)]
    assert txt2img.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "made for" in err and preset in err


def test_sd15_presets_through_the_api_and_a_presets_own_sampler(sd1_pipe, txt2img, tmp_path):
    """The API's options for an SD 1.5 preset are the CLI's (the family's defaults below the
    preset); a preset that names its sampler gets the family defaults that sampler takes."""
    import dataclasses

    from ldm.util import load_config
    args = txt2img.parse_args(["--preset", "sd1.5_2048x1024", "--config", str(SD1_CONFIG)])
    txt2img.apply_family_defaults(args, load_config(args.config))
    cli, api = txt2img.options_from_args(args), sd1_pipe.options(preset="sd1.5_2048x1024")
    cli.validate()
    api.validate()
    assert dataclasses.asdict(api) == dataclasses.asdict(cli)
    preset = tmp_path / "plms.yaml"
    preset.write_text("family: sd1\nsampler: plms\nH: 1024\n")
    opts = sd1_pipe.options(preset=str(preset))
    assert (opts.sampler, opts.ddim_eta, opts.scale) == ("plms", 0.0, 7.5)
    opts.validate()


def test_seed_defaults(txt2img):
    args = txt2img.parse_args([])
    assert args.overlap == 24 and args.negative_prompt == ""
    assert (args.steps, args.scale, args.H, args.W, args.n_samples, args.n_iter) == \
        (50, 9.0, 512, 512, 3, 3)
    # LDM's txt2img: autocast; ours beside it: the CPU's noise stream, LDM's timesteps, the CPU
    assert (args.precision, args.rng, args.timestep_spacing, args.device) == \
        ("autocast", "cpu", "uniform", "cpu")
    from ldm.pipeline import GenerationOptions
    api = GenerationOptions()
    assert (api.precision, api.rng, api.timestep_spacing) == ("autocast", "cpu", "uniform")


def test_a_prompt_cut_to_the_context_is_named_once(sd1_pipe, capsys):
    """CLIP ViT-L's tokenizer (SD 1.x, SDXL) keeps 75 tokens between its start and end."""
    exact = " ".join(["apple"] * 75)  # 75 tokens: fits
    sd1_pipe.model.get_conditioning([exact], (64, 64))
    assert "warning" not in capsys.readouterr().err
    sd1_pipe.model.get_conditioning([exact + " pear"], (64, 64))
    assert capsys.readouterr().err.count("exceeds the text encoder's 77-token context") == 1
