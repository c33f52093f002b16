"""SDXL against the tiny sgm-made reference (../shared/reference/tiny-sdxl): conditioner, UNet
calls, whole CLI runs with the authors' SDXL settings files as published, and the full-size
layout of sd_xl_base.yaml."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REF, REPO, rel_err, sdxl_vector_err

TINY_XL = REF / "tiny-sdxl"
XL_SETTINGS = REF / "scalecrafter-settings-sdxl"
XL_CASES = json.loads((TINY_XL / "cases.json").read_text())["files"]


def xl_cases(kind):
    return [(name, case) for name, case in XL_CASES.items() if case["kind"] == kind]


def load(name):
    return np.load(TINY_XL / name)


@pytest.fixture(scope="session")
def xl_pipe():
    from ldm.pipeline import Pipeline
    return Pipeline.load(TINY_XL / "tiny-sdxl.yaml", TINY_XL / "tiny-sdxl.safetensors")


def test_the_published_extras_load_without_a_word(capsys):
    """The tiny file carries sd_xl_base_1.0's extras (denoiser.sigmas, the CLIP position ids):
    known, so dropped or rebuilt silently."""
    from ldm.checkpoint import load_state_dict
    from ldm.pipeline import Pipeline

    path = TINY_XL / "tiny-sdxl.safetensors"
    keys = set(load_state_dict(path))
    assert {"denoiser.sigmas",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"} <= keys
    capsys.readouterr()
    Pipeline.load(TINY_XL / "tiny-sdxl.yaml", path)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, case", xl_cases("cond"), ids=lambda v: str(v)[:24])
def test_conditioner_matches_sgm(xl_pipe, name, case):
    model, ref = xl_pipe.model, load(name)
    size = (case["H"], case["W"])
    cond = model.get_conditioning(case["prompts"], size)
    uncond = model.get_unconditional_conditioning([""] * len(case["prompts"]), size)
    assert rel_err(cond.context, ref["crossattn"]) <= 1e-4
    text_err, size_err = sdxl_vector_err(cond.vector, ref["vector"], size)
    assert text_err <= 1e-4 and size_err <= 1
    # sgm zeroes the text parts for "": exactly zero context and pooled part, same size part
    assert not uncond.context.any() and not uncond.vector[:, :64].any()
    assert torch.equal(uncond.context, torch.from_numpy(ref["uc_crossattn"]))
    assert sdxl_vector_err(uncond.vector, ref["uc_vector"], size)[1] <= 1
    embedders = model.cond_model.embedders
    assert torch.equal(embedders[0].tokenizer(case["prompts"]),
                       torch.from_numpy(ref["tokens_clip"]))
    assert torch.equal(embedders[1].tokenize(case["prompts"]),
                       torch.from_numpy(ref["tokens_openclip"]))


def test_a_nonempty_negative_prompt_is_encoded(xl_pipe):
    model, size = xl_pipe.model, (256, 384)
    uncond = model.get_unconditional_conditioning(["blurry", ""], size)
    cond = model.get_conditioning(["blurry"], size)
    # a batch of two runs other matmul blockings than a batch of one: float32 rounding apart
    # (6.7e-7 measured), where a prompt encoded wrongly or zeroed is O(1) apart
    assert rel_err(uncond.context[:1], cond.context) <= 1e-5 and not uncond.context[1:].any()
    assert rel_err(uncond.vector[:1], cond.vector) <= 1e-5


def test_clip_layer_options_name_the_same_hidden_states_as_transformers():
    """The tiny CLIP has 3 layers and sgm takes hidden_states[2]. "penultimate" and the negative
    index -2 name that state too (transformers' tuple holds the embedding and 3 layer outputs),
    and -4 the embedding; "last" is the final norm of hidden_states[3]."""
    from test_core import load_tower

    from ldm.checkpoint import load_state_dict
    from ldm.modules.encoders.clip_text import FrozenCLIPEmbedder
    name, case = xl_cases("cond")[0]
    ref = torch.from_numpy(load(name)["crossattn"])[..., :64]  # the CLIP part of the context
    prefix = "conditioner.embedders.0."
    state = {k[len(prefix):]: v.float() for k, v in load_state_dict(
        TINY_XL / "tiny-sdxl.safetensors").items() if k.startswith(prefix)}
    version = str(TINY_XL / "tiny-clip-text.json")

    def embedder(**layer):  # (built without the layers after the chosen one: load_tower)
        clip = FrozenCLIPEmbedder(version=version, **layer)
        load_tower(clip, state)
        with torch.no_grad():
            return clip, clip.encode(case["prompts"])
    for layer in ({"layer": "penultimate"}, {"layer": "hidden", "layer_idx": -2}):
        assert rel_err(embedder(**layer)[1], ref) <= 1e-4, layer
    clip, last = embedder(layer="last")
    text = clip.transformer.text_model
    tokens = clip.tokenizer(case["prompts"])
    with torch.no_grad():
        assert torch.equal(embedder(layer="hidden", layer_idx=-4)[1], text.embeddings(tokens))
        assert torch.equal(last, text.final_layer_norm(text.hidden_state(tokens, 3)))
    assert rel_err(last, ref) > 0.1
    assert len(text.encoder.layers) == 3 and \
        len(embedder(layer="hidden", layer_idx=1)[0].transformer.text_model.encoder.layers) == 1
    for idx in (None, 4, -5):
        with pytest.raises(ValueError, match="within the 3 layers"):
            FrozenCLIPEmbedder(version=version, layer="hidden", layer_idx=idx)


@pytest.mark.parametrize("setting", [{"legacy": True}, {"layer": "last"},
                                     {"always_return_pooled": False}])
def test_the_big_towers_other_settings_are_refused_not_ignored(setting):
    """sgm's FrozenOpenCLIPEmbedder2 has settings SDXL doesn't use (legacy: the last layer's
    normed tokens); computing SDXL's features under their name would be silently wrong."""
    from ldm.modules.encoders.sdxl import FrozenOpenCLIPEmbedder2
    with pytest.raises(ValueError, match="SDXL's setting only"):
        FrozenOpenCLIPEmbedder2(arch=str(TINY_XL / "tiny-openclip-bigg.json"), **setting)
    FrozenOpenCLIPEmbedder2(arch=str(TINY_XL / "tiny-openclip-bigg.json"))  # the shipped one


@pytest.mark.parametrize("name, case", xl_cases("unet"), ids=lambda v: str(v)[:28])
def test_unet_call_matches_sgm(xl_pipe, name, case):
    from ldm.modules.encoders.conditioning import Conditioning
    from ldm.scalecrafter.redilation import ConvOverride, overridden_convs, uniform_dilation_map

    data, unet = load(name), xl_pipe.model.unet
    plan = uniform_dilation_map(unet, case["dilate"], case["skip"]) if "dilate" in case else {}
    assert sorted(plan) == sorted(case.get("dilated_convs", []))
    cond = Conditioning(torch.from_numpy(data["context"]), torch.from_numpy(data["y"]))
    with torch.no_grad(), overridden_convs(unet, {k: ConvOverride(v) for k, v in plan.items()}):
        out = xl_pipe.model.apply_model(torch.from_numpy(data["x"]),
                                        torch.from_numpy(data["t"]), cond)
    assert rel_err(out, data["out"]) <= 1e-4


def test_settings_translate_to_the_reference_sets(xl_pipe, capsys):
    from ldm.scalecrafter.settings import read_conv_list, read_dilation_settings

    unet = xl_pipe.model.unet
    for case in dict(xl_cases("sample")).values():  # every published file the runs used
        assert read_dilation_settings(XL_SETTINGS / case["dilate_settings"], unet) == \
            case["effective_dilate"]
        if "ndcfg_dilate_settings" in case:
            assert read_dilation_settings(XL_SETTINGS / case["ndcfg_dilate_settings"], unet) \
                == case["effective_ndcfg_dilate"]
    case = XL_CASES["tiny-sdxl-sample-sdxl4096-progressive-disperse-rect.npz"]
    assert read_conv_list(XL_SETTINGS / case["disperse_settings"], unet) == \
        set(case["effective_disperse"])
    ours = REPO / "configs" / "scalecrafter"
    published = sorted(XL_SETTINGS.glob("*/sdxl_*.txt"))
    assert len(published) == 7  # 4 dilation, 2 noise-damped, 1 dispersion
    for path in published:  # our shipped files: same sets, real convs only
        read = read_conv_list if path.parent.name == "disperse" else read_dilation_settings
        assert read(ours / path.parent.name / path.name, unet) == read(path, unet)
        lines = [line for line in (ours / path.parent.name / path.name).read_text().splitlines()
                 if not line.startswith("#")]
        assert len(lines) == len(read(path, unet))


def run_cli(txt2img, tmp_path, case, capsys):
    argv = ["--config", str(TINY_XL / "tiny-sdxl.yaml"),
            "--ckpt", str(TINY_XL / "tiny-sdxl.safetensors"),
            "--prompt", case["prompt"], "--seed", str(case["seed"]),
            "--H", str(case["H"]), "--W", str(case["W"]), "--steps", str(case["steps"]),
            "--ddim_eta", str(case["eta"]), "--scale", str(case["scale"]),
            "--timestep_spacing", "uniform",  # the reference's protocol (LDM's DDIM)
            "--dilate_settings", str(XL_SETTINGS / case["dilate_settings"]),
            "--dilate_tau", str(case["dilate_tau"]),
            "--progressive_dilate" if case["progressive"] else "--no-progressive_dilate",
            "--n_iter", "1", "--n_samples", str(case["n_samples"]), "--precision", "full",
            "--outdir", str(tmp_path), "--save_latent"]
    if "ndcfg_dilate_settings" in case:
        argv += ["--ndcfg_dilate_settings", str(XL_SETTINGS / case["ndcfg_dilate_settings"]),
                 "--ndcfg_tau", str(case["ndcfg_tau"])]
    if "disperse_settings" in case:
        argv += ["--disperse_settings", str(XL_SETTINGS / case["disperse_settings"]),
                 "--disperse_transform", str(REF / "dispersion" / "R20to1_new.mat"),
                 "--inflate_tau", str(case["inflate_tau"])]
    capsys.readouterr()
    assert txt2img.main(argv) == 0
    return capsys.readouterr().err


@pytest.mark.parametrize("name, case", xl_cases("sample"), ids=lambda v: str(v)[:40])
def test_cli_run_with_the_authors_settings_matches_sgm(txt2img, xl_pipe, tmp_path, capsys,
                                                        name, case):
    err = run_cli(txt2img, tmp_path, case, capsys)
    ref = load(name)
    latent = np.load(tmp_path / "samples" / "00000.npy")
    assert rel_err(latent[None], ref["latent"]) <= 1e-4
    from ldm.models.diffusion.ddim import ddim_timesteps
    from ldm.pipeline import GenerationOptions
    image = xl_pipe.decode(torch.from_numpy(latent[None]), GenerationOptions())
    assert rel_err(image, ref["image_full"]) <= 1e-4
    assert len(ddim_timesteps(case["steps"])) == ref["steps_run"]
    size = (case["H"], case["W"])  # the run's conditioning, both branches
    cond = xl_pipe.model.get_conditioning([case["prompt"]], size)
    uncond = xl_pipe.model.get_unconditional_conditioning([""], size)
    assert rel_err(cond.context, ref["cond_crossattn"]) <= 1e-4
    for ours, key in ((cond.vector, "cond_vector"), (uncond.vector, "uc_vector")):
        text_err, size_err = sdxl_vector_err(ours, ref[key], size)
        assert text_err <= 1e-4 and size_err <= 1, (key, text_err, size_err)
    assert not uncond.context.any() and not ref["uc_crossattn"].any()
    # one warning line per settings file, naming exactly the convs SDXL lacks
    warnings = [line for line in err.splitlines() if "does not have" in line]
    assert len(warnings) == len(case["skipped_names"])
    for file, names in case["skipped_names"].items():
        line = next(w for w in warnings if w.split(": skipped")[0].endswith(file))
        assert line.endswith(": " + ", ".join(names))


@pytest.mark.parametrize("targets", ["ours", "sgm"])
def test_sd_xl_base_yaml_builds_the_published_layout(targets, tmp_path):
    """Our sd_xl_base.yaml, and the same file with Stability's (sgm) targets, on the meta
    device: exactly the keys and shapes of the published checkpoint."""
    import fnmatch

    from ldm.layouts import unread_keys
    from ldm.targets import SGM_TARGETS
    from ldm.util import instantiate_from_config, load_config

    manifest = json.loads((REF / "sdxl-base.keys.json").read_text())
    path = REPO / "configs" / "stable-diffusion" / "sd_xl_base.yaml"
    if targets == "sgm":  # as Stability's file names them (its VAE: the inference wrapper)
        text = path.read_text()
        for theirs, ours in SGM_TARGETS.items():
            text = text.replace(f"target: {ours}\n", f"target: {theirs}\n")
        text = text.replace("target: sgm.models.autoencoder.AutoencoderKL\n",
                            "target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper\n")
        assert "target: ldm." not in text and "AutoencoderKLInferenceWrapper" in text
        path = tmp_path / "sd_xl_base.yaml"
        path.write_text(text)
    config = load_config(path)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    manifest.pop("denoiser.sigmas")  # sgm's schedule buffer: files may or may not carry it
    # the big tower reads its projection (the pooled vector), not CLIP's logit scale
    patterns = unread_keys(model)
    unread = {k for k in manifest if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    clip = "conditioner.embedders.0.transformer.text_model."  # (hidden layer 11 of 12)
    assert unread == {"conditioner.embedders.1.model.logit_scale"} | {
        k for k in manifest if k.startswith((clip + "encoder.layers.11.",
                                             clip + "final_layer_norm."))}
    assert len(unread) == 1 + 16 + 2
    assert shapes == {k: v for k, v in manifest.items() if k not in unread}
    assert len(manifest) == 2515
    assert model.family == "sdxl" and model.scale_factor == 0.13025


XL_PRESETS = ["sdxl_2048x2048", "sdxl_2560x2560", "sdxl_4096x2048", "sdxl_4096x4096",
              "sdxl_4096x4096_disperse"]


def _check_files_match_the_authors(args, theirs, unet, authors):
    """Each settings file the authors' preset names (the ndcfg one where its tau is not 0) is
    ours with the same content, read on the SDXL UNet (theirs loses the convs SDXL lacks)."""
    from ldm.scalecrafter.settings import read_conv_list, read_dilation_settings

    kinds = {"dilate_settings": ("dilate", read_dilation_settings),
             "ndcfg_dilate_settings": ("ndcfg_dilate", read_dilation_settings),
             "disperse_settings": ("disperse", read_conv_list)}
    for key, (folder, read) in kinds.items():
        if not theirs.get(key) or (key.startswith("ndcfg") and not theirs["ndcfg_tau"]):
            continue
        ours = getattr(args, key)
        assert ours and Path(ours).name == Path(theirs[key]).name, key
        assert read(REPO / ours, unet) == read(authors / folder / Path(ours).name, unet), key


def test_sdxl_presets_carry_the_authors_settings(txt2img, xl_pipe, capsys):
    from ldm.scalecrafter.settings import build_settings

    authors = REF / "scalecrafter-settings-sdxl" / "presets"
    for name in XL_PRESETS:
        args = txt2img.parse_args(["--preset", name, "--ckpt", "x"])
        theirs = yaml.safe_load((authors / f"{name}.yaml").read_text())
        assert args.preset_family == "sdxl" and args.scale == 5
        assert tuple(args.freeu) == (1.1, 1.2, 0.6, 0.4)
        assert (args.H, args.W) == (theirs["pixel_height"], theirs["pixel_width"])
        assert (args.dilate_tau, args.ndcfg_tau, args.progressive_dilate, args.steps) == \
            (theirs["dilate_tau"], theirs["ndcfg_tau"], theirs["progressive"],
             theirs["num_inference_steps"])
        assert (args.inflate_tau > 0) == name.endswith("_disperse")
        opts = txt2img.options_from_args(args)
        capsys.readouterr()
        build_settings(xl_pipe.model.unet, opts)  # our files: real convs only, no warning
        assert "warning" not in capsys.readouterr().err
        _check_files_match_the_authors(args, theirs, xl_pipe.model.unet, authors.parent)
    assert txt2img.parse_args(["--preset", "sdxl_2048x2048", "--scale", "7",
                               "--ckpt", "x"]).scale == 7


def test_sdxl_presets_through_the_api_are_the_clis_options(txt2img, xl_pipe):
    """Family defaults (1024², scale 5, eta 1, leading) below each preset, then a flag."""
    import dataclasses

    from ldm.util import load_config
    config = TINY_XL / "tiny-sdxl.yaml"
    assert xl_pipe.trained_side() == 1024  # sgm's configs do not say it: the family's
    for name in XL_PRESETS:
        for flags, given in (([], {}), (["--plms", "--steps", "30"],
                                        {"sampler": "plms", "steps": 30})):
            args = txt2img.parse_args(["--preset", name, "--config", str(config), *flags])
            txt2img.apply_family_defaults(args, load_config(config))
            cli, api = txt2img.options_from_args(args), xl_pipe.options(preset=name, **given)
            cli.validate()
            api.validate()
            assert dataclasses.asdict(api) == dataclasses.asdict(cli), (name, flags)


def test_sdxl_preset_is_refused_for_another_family(txt2img, tmp_path, capsys):
    argv = ["--preset", "sdxl_2048x2048", "--config", str(REF / "tiny" / "tiny-sd21.yaml"),
            "--ckpt", str(REF / "tiny" / "tiny-sd21.ckpt"), "--outdir", str(tmp_path)]
    assert txt2img.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sdxl" in err[0] and "sd2" in err[0]


def test_noise_damped_cfg_with_dispersion_is_defined(xl_pipe, txt2img, tmp_path):
    """Our definition (README): the damped pass disperses only the convs its own settings
    re-dilate, at half its factor; dispersed convs it does not re-dilate run as trained. The
    authors' code would crash here (5x5 kernels at padding 1)."""
    from ldm.scalecrafter.schedule import StepPlanner

    args = txt2img.parse_args(["--preset", "sdxl_4096x4096_disperse", "--ckpt", "x"])
    planner = StepPlanner(xl_pipe.model.unet,
                          xl_pipe.settings_for(txt2img.options_from_args(args)))
    from ldm.scalecrafter.schedule import factor_at

    damped, s = planner.damped(0), planner.settings
    assert set(damped) == set(s.ndcfg_dilation) and s.disperse - set(damped)
    for name, override in damped.items():  # the damped pass's own factor, halved if dispersed
        factor = factor_at(s.ndcfg_dilation[name], 0, s.ndcfg_tau, s.progressive)
        if name in s.disperse:
            assert override.factor == factor / 2
            assert torch.equal(override.weight, planner.dispersed[name])
        else:
            assert override.factor == factor and override.weight is None
    middle = damped["middle_block.0.in_layers.2"]
    assert middle.factor == 1 and middle.weight.shape[-1] == 5
    # the README's formula, computed here: at step 0 the progressive factor is the file's
    # (x2), halved for the 5x5 kernel R w, R the authors' transform
    import scipy.io
    R = scipy.io.loadmat(str(REF / "dispersion" / "R20to1_new.mat"))["R"]
    for name in sorted(set(damped) & s.disperse):
        w = xl_pipe.model.unet.get_submodule(name).weight.detach().double().numpy()
        expected = np.einsum("ab,oib->oia", R, w.reshape(*w.shape[:2], 9))
        assert damped[name].factor == s.ndcfg_dilation[name] / 2 == 1
        assert rel_err(damped[name].weight, expected.reshape(*w.shape[:2], 5, 5)) <= 1e-6
    argv = ["--preset", "sdxl_4096x4096_disperse", "--config", str(TINY_XL / "tiny-sdxl.yaml"),
            "--ckpt", str(TINY_XL / "tiny-sdxl.safetensors"), "--H", "256", "--W", "384",
            "--steps", "3", "--dilate_tau", "2", "--ndcfg_tau", "2", "--inflate_tau", "2",
            "--n_iter", "1", "--n_samples", "1", "--precision", "full", "--overlap", "8",
            "--outdir", str(tmp_path), "--save_latent", "--negative_prompt", "blurry"]
    assert txt2img.main(argv) == 0
    assert np.isfinite(np.load(tmp_path / "samples" / "00000.npy")).all()


def test_benchmark_sdxl_case_on_the_tiny_layout(tmp_path):
    from conftest import load_script

    bench = load_script("benchmark", "benchmark_sdxl")
    out = tmp_path / "bench.json"
    runner = lambda name, params, device: bench.run_case(name, params, device)  # noqa: E731
    argv = ["--tiny", "--only", "sdxl", "--sdxl-sides", "8", "--json", str(out)]
    assert bench.main(argv, runner=runner) == 0
    report = json.loads(out.read_text())
    assert list(report["sdxl_unet_cfg_call"]) == ["8"] and not report["unet_cfg_call"]
    call = report["sdxl_unet_cfg_call"]["8"]
    assert call["seconds"] > 0 and call["peak_gb"] > 0 and "error" not in call


def test_freeu_stages_on_sdxl_follow_the_authors_channel_rule(xl_pipe):
    """The authors' SDXL FreeU scales up-block resnets whose backbone input has 1280 (stage 1)
    or 640 (stage 2) channels: up_blocks.0 and the first resnet of up_blocks.1, then the rest of
    up_blocks.1 and the first of up_blocks.2 (output blocks 0-3 and 4-6 here)."""
    from ldm.scalecrafter.freeu import freeu_stage_params, output_block_h_channels

    unet, params = xl_pipe.model.unet, (1.1, 1.2, 0.6, 0.4)
    stages = [freeu_stage_params(h, unet.model_channels, params)
              for h in output_block_h_channels(unet)]
    assert stages == [(1.1, 0.6)] * 4 + [(1.2, 0.4)] * 3 + [None] * 2


def test_settings_typo_is_refused_before_the_checkpoint_is_read(txt2img, tmp_path, capsys):
    """sgm-layout configs too: the settings are checked on the meta-built UNet (the checkpoint
    here is garbage, and is never read)."""
    settings = tmp_path / "typo.txt"
    settings.write_text("up_blocks.0.resnets.0.conv1:2\nup_blocks.0.resnet.1.conv1:2\n")
    ckpt = tmp_path / "never-read.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    argv = ["--config", str(TINY_XL / "tiny-sdxl.yaml"), "--ckpt", str(ckpt),
            "--dilate_settings", str(settings), "--outdir", str(tmp_path / "out")]
    assert txt2img.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {settings}:2: 'up_blocks.0.resnet.1.conv1' is not a 3x3 "
                   "convolution of this UNet"]


def test_recomputed_single_tile_decode_is_the_full_decode(xl_pipe, monkeypatch):
    """SDXL's VAE through the tiled decoder with every layer recomputed (no budget, two-row
    bands) in one tile with its own GroupNorm statistics: the reference's full decode."""
    from ldm.scalecrafter import lean_decode, tiled_decode as td

    ref = load("tiny-sdxl-sample-sdxl4096-progressive-ndcfg-rect.npz")
    z = torch.from_numpy(ref["latent"]) / xl_pipe.model.scale_factor
    for module in (lean_decode, td):
        monkeypatch.setattr(module, "band_rows", lambda src, band_bytes=None: 2)
    image = td.tiled_decode(xl_pipe.model.first_stage_model, z, 0, False,
                            tile_size=tuple(z.shape[2:]), budget_bytes=0)
    assert rel_err(image, ref["image_full"]) <= 1e-4


def family_args(txt2img, *argv, config="sd_xl_base.yaml"):
    args = txt2img.parse_args(["--config", f"configs/stable-diffusion/{config}", *argv])
    args.note = txt2img.apply_family_defaults(args, txt2img.check_config(args.config))
    return args


def test_an_sdxl_run_takes_the_authors_sdxl_defaults(txt2img, capsys):
    """Without flags: the native 1024², and text2image_xl.py's guidance 5, eta 1 and diffusers'
    leading DDIM timesteps, said in one note line; flags and presets win; FreeU stays off."""
    args = family_args(txt2img)
    assert (args.H, args.W, args.scale, args.ddim_eta, args.timestep_spacing) == \
        (1024, 1024, 5.0, 1.0, "leading") and args.freeu is None
    assert args.note == ("note: SDXL model: --H 1024 --W 1024 --scale 5 --ddim_eta 1 "
                         "--timestep_spacing leading (its authors' defaults; flags override)")
    args = family_args(txt2img, "--H", "2048", "--scale", "7", "--timestep_spacing", "uniform")
    assert (args.H, args.W, args.scale, args.timestep_spacing) == (2048, 1024, 7, "uniform")
    dpm = family_args(txt2img, "--dpm")  # eta is DDIM's alone, the spacing DDIM's and PLMS's
    assert (dpm.ddim_eta, dpm.timestep_spacing, dpm.scale) == (0.0, "uniform", 5.0)
    txt2img.options_from_args(dpm).validate()
    preset = family_args(txt2img, "--preset", "sdxl_2048x2048")
    assert (preset.H, preset.timestep_spacing) == (2048, "leading")


def test_other_families_keep_or_take_their_own_defaults(txt2img, capsys):
    seed = family_args(txt2img, config="v2-inference.yaml")  # the seed's: LDM's txt2img
    assert (seed.H, seed.scale, seed.ddim_eta, seed.timestep_spacing) == \
        (512, 9.0, 0.0, "uniform")
    assert seed.note == ""
    sd1 = family_args(txt2img, config="v1-inference.yaml")  # the authors' text2image.py
    assert (sd1.H, sd1.scale, sd1.ddim_eta, sd1.timestep_spacing) == \
        (512, 7.5, 1.0, "leading")
    assert sd1.note == ("note: SD 1.x model: --scale 7.5 --ddim_eta 1 --timestep_spacing "
                        "leading (its authors' defaults; flags override)")
    sd1 = family_args(txt2img, "--ddim_eta", "0", config="v1-inference.yaml")
    assert (sd1.H, sd1.scale, sd1.ddim_eta, sd1.timestep_spacing) == \
        (512, 7.5, 0.0, "leading")


def test_a_run_says_which_family_defaults_it_took(txt2img, tmp_path, capsys):
    argv = ["--config", str(TINY_XL / "tiny-sdxl.yaml"), "--ckpt",
            str(TINY_XL / "tiny-sdxl.safetensors"), "--H", "64", "--W", "64", "--steps", "2",
            "--n_iter", "1", "--n_samples", "1", "--outdir", str(tmp_path)]
    capsys.readouterr()
    assert txt2img.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert "note: SDXL model: --scale 5 --ddim_eta 1 --timestep_spacing leading (its authors' " \
           "defaults; flags override)" in err
    from PIL import Image
    with Image.open(tmp_path / "samples" / "00000.png") as image:
        text = image.text["parameters"]
    assert "CFG scale: 5.0," in text and "Eta: 1.0" in text
    assert "Timestep spacing: leading" in text


def test_the_api_options_take_the_family_defaults(xl_pipe):
    opts = xl_pipe.options(H=256, W=384)
    assert (opts.H, opts.W, opts.scale, opts.ddim_eta, opts.timestep_spacing) == \
        (256, 384, 5.0, 1.0, "leading")
    plms = xl_pipe.options(sampler="plms")
    assert (plms.ddim_eta, plms.timestep_spacing) == (0.0, "leading")
    plms.validate()


def test_a_leading_run_calls_the_unet_once_a_step(xl_pipe):
    """--steps 6: LDM's uniform schedule runs 7 steps, the authors' SDXL one 6."""
    calls = []
    hook = xl_pipe.model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        for spacing, expected in (("uniform", 7), ("leading", 6)):
            calls.clear()
            opts = xl_pipe.options(H=64, W=64, steps=6, precision="full",
                                   timestep_spacing=spacing)
            xl_pipe.sample(["a corgi"], opts, torch.Generator().manual_seed(0), progress=False)
            assert len(calls) == expected, spacing
    finally:
        hook.remove()
