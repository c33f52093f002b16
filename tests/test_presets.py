"""Presets through the API (`Pipeline.options(preset=...)`): the options txt2img's --preset
makes, under the same rules (ldm.scalecrafter.presets)."""
import dataclasses
import re

import pytest

from ldm.models.diffusion.samplers import SAMPLERS
from ldm.scalecrafter.presets import SAMPLER_EXCLUDES, applied_values, list_presets, read_preset

# (the API's given options, txt2img's flags for the same)
SAME_RUNS = [
    ({}, []),
    ({"steps": 7, "H": 1536}, ["--steps", "7", "--H", "1536"]),
    ({"dilate": 3}, ["--dilate", "3"]),
    ({"dilate_settings": ""}, ["--dilate_settings", ""]),
    ({"sampler": "plms"}, ["--plms"]),
    ({"sampler": "dpm"}, ["--dpm"]),
    ({"tiled_decoding": False}, ["--no-tiled_decoding"]),
    ({"tiled_decoding": False, "sync_gn": True}, ["--no-tiled_decoding", "--sync_gn"]),
]


def _validated(opts):
    try:
        opts.validate()
    except ValueError as err:  # both must refuse a run alike
        return str(err)
    return dataclasses.asdict(opts)


@pytest.mark.parametrize("given, flags", SAME_RUNS)
def test_api_presets_make_the_clis_options(tiny_pipe, txt2img, given, flags):
    for name in (n for n in list_presets() if n.startswith("sd2.1")):
        args = txt2img.parse_args(["--preset", name, *flags])
        cli = _validated(txt2img.options_from_args(args))
        api = _validated(tiny_pipe.options(preset=name, **given))
        assert api == cli, (name, given)
    # the cases differ from the preset alone, so the rules above are really exercised
    alone = _validated(tiny_pipe.options(preset="sd2.1_2048x2048"))
    assert given == {} or alone != _validated(tiny_pipe.options(preset="sd2.1_2048x2048",
                                                                  **given))


def test_a_feature_turned_off_takes_the_presets_qualifiers_with_it(tiny_pipe, txt2img):
    """Progressive dilation qualifies the preset's re-dilation, SyncGN and the tile size its
    tiled decoding: off by the caller, they go too (unless given), and the run is valid."""
    opts = tiny_pipe.options(preset="sd2.1_2048x2048", dilate_settings="")
    assert (opts.dilate, opts.dilate_settings, opts.progressive_dilate) == (None, "", False)
    opts.validate()
    for given in ({}, {"dilate": 2}):  # still re-dilated
        opts = tiny_pipe.options(preset="sd2.1_2048x2048", **given)
        assert opts.progressive_dilate and opts.ndcfg_dilate_settings, given
    opts = tiny_pipe.options(preset="sd2.1_4096x4096_experimental", tiled_decoding=False)
    assert (opts.sync_gn, opts.tile_size) == (False, None)
    opts.validate()
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--dilate_settings", ""])
    assert not args.progressive_dilate


def test_a_prompt_flag_sets_aside_a_presets_prompt_file_and_the_reverse(txt2img, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    preset = tmp_path / "batch.yaml"
    preset.write_text(f"from_file: {prompts}\nrepeat: 2\n")
    args = txt2img.parse_args(["--preset", str(preset), "--prompt", "a dog"])
    assert (args.prompt, args.from_file, args.repeat) == ("a dog", None, 1)
    preset.write_text("prompt: a cow\n")
    args = txt2img.parse_args(["--preset", str(preset), "--from-file", str(prompts),
                               "--n_samples", "1"])
    assert args.prompt != "a cow" and txt2img.read_prompts(args) == [["a fox"], ["a cat"]]


@pytest.mark.parametrize("flag", ["--ndcfg_dilate_settings", "--disperse_settings"])
def test_an_empty_settings_flag_turns_a_presets_feature_off_in_the_cli(txt2img, flag):
    """The tau the preset's feature took along is 0 then: an empty file flag is no file given
    for nothing (a file given with its tau at 0 is still refused)."""
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048_disperse", flag, ""])
    txt2img.check_numbers(args)
    txt2img.options_from_args(args).validate()
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", "--ndcfg_tau", "0",
                               "--ndcfg_dilate_settings", "x.txt"])
    with pytest.raises(txt2img.UsageError, match="--ndcfg_tau is 0"):
        txt2img.check_numbers(args)


@pytest.mark.parametrize("off, gone", [
    ({"ndcfg_dilate_settings": None}, {"ndcfg_tau": 0}),
    ({"disperse_settings": ""}, {"inflate_tau": 0, "disperse_transform": None}),
    ({"dilate_settings": None}, {"progressive_dilate": False, "disperse_settings": None,
                                 "inflate_tau": 0, "disperse_transform": None}),
], ids=["ndcfg", "dispersion", "dilation"])
def test_turning_a_presets_feature_off_takes_its_settings_along(tiny_pipe, off, gone):
    """Given off, a feature's tau (and dispersion, which acts on re-dilated convs only) goes
    with it: the run is valid, and the rest of the preset stays."""
    preset = "sd2.1_2048x2048_disperse"
    full = tiny_pipe.options(preset=preset)
    opts = tiny_pipe.options(preset=preset, **off)
    opts.validate()
    assert {name: getattr(opts, name) for name in gone} == gone
    assert all(getattr(full, name) != value for name, value in gone.items())
    kept = {f.name for f in dataclasses.fields(opts)} - set(gone) - set(off)
    assert {n: getattr(opts, n) for n in kept} == {n: getattr(full, n) for n in kept}


def test_a_preset_file_of_ones_own_finds_its_files_beside_it(tiny_pipe, tmp_path):
    (tmp_path / "mine.txt").write_text("middle_block.0.in_layers.2:2\n")
    preset = tmp_path / "mine.yaml"
    preset.write_text("family: sd2\ndilate_settings: mine.txt\nfreeu: [1.1, 1.2, 0.9, 0.2]\n"
                      "ndcfg_dilate_settings: configs/scalecrafter/ndcfg_dilate/"
                      "sd2.1_2048x2048.txt\n")
    opts = tiny_pipe.options(preset=str(preset))
    assert opts.dilate_settings == str(tmp_path / "mine.txt")
    assert opts.ndcfg_dilate_settings.endswith("configs/scalecrafter/ndcfg_dilate/"
                                               "sd2.1_2048x2048.txt")
    assert opts.freeu == (1.1, 1.2, 0.9, 0.2)


def test_sampler_exclusions_are_the_samplers_own(tiny_pipe):
    """What a sampler sets aside of a preset is what it cannot take."""
    for name, sampler in SAMPLERS.items():
        cannot = {"ddim_eta"} if not sampler.takes_eta else set()
        cannot |= {"timestep_spacing"} if not sampler.spaced else set()
        assert set(SAMPLER_EXCLUDES.get(name, ())) == cannot, name
    preset = read_preset("sd2.1_1024x1024")
    assert {"ddim_eta", "timestep_spacing"} <= set(preset.values)
    assert "ddim_eta" not in applied_values(preset, {"sampler": "plms"})


@pytest.mark.parametrize("preset, message", [
    ("sdxl_2048x2048", "preset sdxl_2048x2048 is made for SDXL models; this model is SD 2.x"),
    ("no-such-preset", "unknown preset 'no-such-preset'; known: sd1.5_1024x1024"),
])
def test_a_preset_the_model_cannot_take_is_refused(tiny_pipe, preset, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.options(preset=preset)


@pytest.mark.parametrize("text, message", [
    ("family: sd2.1\n", "family must be one of sd1, sd2, sdxl, got 'sd2.1'"),
    ("family: [sd2]\n", "family must be one of sd1, sd2, sdxl, got ['sd2']"),
    ("1: 2\n", "is not a mapping of options"),
    ("H: ${nowhere}\n", ": Interpolation key 'nowhere' not found"),
    ("plms: true\ndpm: true\n", "names two samplers: dpm, plms"),
    ("plms: true\nsampler: dpm\n", "names two samplers: dpm, plms"),
    ("plms: 1\n", "plms must be true or false, got 1"),
    ("sampler: euler\n", "sampler must be one of ddim, plms, dpm, got 'euler'"),
    ("sampler: [plms]\n", "sampler must be one of ddim, plms, dpm, got ['plms']"),
    ("trained_size: big\n", "trained_size must be a positive integer (pixels), got 'big'"),
], ids=["family-name", "family-list", "number-key", "broken-interpolation", "two-switches",
        "switch-and-name", "switch-not-bool", "unknown-sampler", "sampler-list", "size-text"])
def test_odd_preset_files_are_one_value_error(tiny_pipe, txt2img, tmp_path, text, message):
    preset = tmp_path / "odd.yaml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_pipe.options(preset=str(preset))
    with pytest.raises(txt2img.UsageError, match=re.escape(message)):
        txt2img.parse_args(["--preset", str(preset)])


def test_a_tile_size_list_is_read_alike(tiny_pipe, txt2img, tmp_path):
    preset = tmp_path / "tiles.yaml"
    preset.write_text("tiled_decoding: true\ntile_size: [64, 96]\n")
    args = txt2img.parse_args(["--preset", str(preset)])
    assert args.tile_size == (64, 96)
    assert _validated(tiny_pipe.options(preset=str(preset))) == _validated(
        txt2img.options_from_args(args))
    preset.write_text("tiled_decoding: true\ntile_size: [64, true]\n")
    with pytest.raises(txt2img.UsageError, match="tile_size must be"):
        txt2img.parse_args(["--preset", str(preset)])


def test_a_preset_file_may_end_in_yml_and_use_interpolation(tiny_pipe, tmp_path):
    preset = tmp_path / "square.yml"
    preset.write_text("H: 1536\nW: ${H}\n")
    opts = tiny_pipe.options(preset=str(preset))
    assert (opts.H, opts.W) == (1536, 1536)


def test_a_missing_settings_file_is_named_where_the_preset_looks_first(tiny_pipe, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("dilate_settings: nope.txt\n")
    with pytest.raises(ValueError, match=re.escape(f"settings file {tmp_path / 'nope.txt'} "
                                                   "does not exist")):
        tiny_pipe.settings_for(tiny_pipe.options(preset=str(preset)))


def test_quoted_numbers_are_read_as_the_flags_read_them(tiny_pipe, txt2img, tmp_path, capsys):
    """'30' is 30 for both readers (argparse's types); what no type reads is refused by
    validate, not by options(); the steps warning reads the quoted count too."""
    preset = tmp_path / "quoted.yaml"
    preset.write_text("family: sd2\ndilate: '2'\ndilate_tau: '30'\nscale: '7.5'\n"
                      "steps: '50'\n")
    api = _validated(tiny_pipe.options(preset=str(preset)))
    assert api == _validated(txt2img.options_from_args(
        txt2img.parse_args(["--preset", str(preset)])))
    assert (api["dilate"], api["dilate_tau"], api["scale"], api["steps"]) == (2.0, 30, 7.5, 50)
    tiny_pipe.options(preset=str(preset), steps=5)
    assert "made for 50 steps" in capsys.readouterr().err
    tiny_pipe.options(preset=str(preset), steps=True)  # refused by validate alone, in one line
    assert capsys.readouterr().err == ""
    preset.write_text("family: sd2\nnegative_prompt: 5\n")  # a number where text is wanted
    api = _validated(tiny_pipe.options(preset=str(preset)))
    assert api == _validated(txt2img.options_from_args(
        txt2img.parse_args(["--preset", str(preset)])))
    assert api["negative_prompt"] == "5"
    preset.write_text("family: sd2\ndilate: 2\ndilate_tau: 'thirty'\nsteps: 50\n")
    opts = tiny_pipe.options(preset=str(preset), steps=3)
    with pytest.raises(ValueError, match="--dilate_tau must be an integer, got 'thirty'"):
        opts.validate()


def test_a_presets_cli_only_flags_are_refused_by_name(tiny_pipe, tmp_path):
    preset = tmp_path / "batch.yaml"
    preset.write_text("H: 1024\nn_samples: 4\nn_iter: 2\n")
    with pytest.raises(ValueError, match="sets n_iter, n_samples: not options of a generation"):
        tiny_pipe.options(preset=str(preset))
    preset.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="is not a mapping of options"):
        tiny_pipe.options(preset=str(preset))


def test_other_steps_warn_once_what_the_presets_taus_cover(tiny_pipe, capsys):
    for _ in range(2):
        tiny_pipe.options(preset="sd2.1_2048x2048", steps=5)
    assert capsys.readouterr().err.splitlines() == [
        "warning: preset sd2.1_2048x2048 is made for 50 steps and its taus count steps "
        "(dilate_tau 37, ndcfg_tau 37): with steps=5 they cover 5 of 5; set them for this "
        "length"]
    tiny_pipe.options(preset="sd2.1_2048x2048", steps=5, dilate_tau=3, ndcfg_tau=3)
    tiny_pipe.options(preset="sd2.1_2048x2048")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["plms: true\n", "sampler: plms\n"])
def test_a_presets_sampler_is_read_alike_and_a_flag_overrides_it(tiny_pipe, txt2img, tmp_path,
                                                                   text):
    """txt2img's switch or the option's name: the same preset for both, and the caller's
    sampler wins (its eta and spacing rules with it)."""
    preset = tmp_path / "sampler.yaml"
    preset.write_text("family: sd2\nH: 1024\n" + text)
    for flags, given, sampler in (([], {}, "plms"), (["--dpm"], {"sampler": "dpm"}, "dpm"),
                                  (["--ddim"], {"sampler": "ddim"}, "ddim")):
        args = txt2img.parse_args(["--preset", str(preset), *flags])
        cli = _validated(txt2img.options_from_args(args))
        api = _validated(tiny_pipe.options(preset=str(preset), **given))
        assert api == cli and api["sampler"] == sampler, flags


def test_the_steps_warning_reads_steps_as_the_options_do(tiny_pipe, txt2img, tmp_path, capsys):
    """A numpy step count (API) and a quoted one in a preset (the CLI reads it as its flag)."""
    import numpy as np
    tiny_pipe.options(preset="sd2.1_1024x1024", steps=np.int64(9))
    assert "with steps=9 they cover 9 of 9" in capsys.readouterr().err
    preset = tmp_path / "quoted.yaml"
    preset.write_text("dilate: 2\ndilate_tau: 30\nsteps: '50'\n")
    args = txt2img.parse_args(["--preset", str(preset), "--steps", "5"])
    assert "made for 50 steps" in txt2img.preset_steps_warning(
        args, txt2img.options_from_args(args))


def test_a_preset_for_models_trained_at_another_size_is_warned(tiny_pipe, txt2img, tmp_path,
                                                                 capsys):
    """SD 2.1's 768-v model (config image_size 96) under a preset tuned on the 512 base: the
    same family, but the factors are for another scale. One warning, CLI and API alike."""
    from omegaconf import OmegaConf

    from conftest import TINY_CKPT, TINY_CONFIG
    from ldm.pipeline import Pipeline
    config = OmegaConf.load(TINY_CONFIG)
    assert tiny_pipe.trained_side() == 512 == 8 * config.model.params.image_size
    tiny_pipe.options(preset="sd2.1_2048x2048")
    args = txt2img.parse_args(["--preset", "sd2.1_2048x2048"])
    assert txt2img.preset_size_warning(args, config) == "" == capsys.readouterr().err
    config.model.params.image_size = 96
    wider = tmp_path / "tiny-768.yaml"
    OmegaConf.save(config, wider)
    warning = ("warning: preset sd2.1_2048x2048 is tuned for models trained at 512x512; this "
               "model is trained at 768x768, so its factors and taus are made for another "
               "scale")
    assert txt2img.preset_size_warning(args, OmegaConf.load(wider)) == warning
    pipe = Pipeline.load(wider, TINY_CKPT)
    for _ in range(2):
        pipe.options(preset="sd2.1_2048x2048")
    assert capsys.readouterr().err.splitlines() == [warning]
    args = txt2img.parse_args(["--dilate", "2"])  # no preset, nothing to say
    assert txt2img.preset_size_warning(args, OmegaConf.load(wider)) == ""


def test_every_shipped_preset_names_its_models_training_size():
    from ldm.families import TRAINED_SIDES
    for name in list_presets():
        preset = read_preset(name)
        assert preset.trained_size == TRAINED_SIDES[preset.family], name


def test_a_presets_factors_at_another_size_are_warned(tiny_pipe, txt2img, capsys):
    """Factors are tuned for the preset's size (the authors' 2048x1024 files differ from their
    2048x2048 ones): another size gets one warning, naming the shipped presets for it."""
    from ldm.pipeline import Pipeline

    said = ("preset sd2.1_2048x2048 is tuned for 2048x2048; at {} its factors and taus are "
            "made for another size (presets for it: {})")

    def cli(*flags):
        args = txt2img.parse_args(["--preset", "sd2.1_2048x2048", *flags])
        return txt2img.preset_steps_warning(args, txt2img.options_from_args(args))
    assert cli("--H", "1024", "--W", "1024") == "warning: " + said.format(
        "--W 1024 --H 1024", "sd2.1_1024x1024")
    assert cli("--H", "1024") == "warning: " + said.format("--W 2048 --H 1024",
                                                           "sd2.1_2048x1024")
    assert cli() == cli("--H", "2048") == ""
    turned = txt2img.parse_args(["--preset", "sd2.1_2048x1024", "--W", "1024", "--H", "2048"])
    assert txt2img.preset_steps_warning(turned, txt2img.options_from_args(turned)) == ""
    pipe = Pipeline(tiny_pipe.model)  # (its own warnings: once in its life)
    for _ in range(2):
        pipe.options(preset="sd2.1_2048x2048", H=1024, W=1024)
    pipe.options(preset="sd2.1_2048x2048", W=2048)
    assert capsys.readouterr().err.splitlines() == [
        "warning: " + said.format("W=1024, H=1024", "sd2.1_1024x1024")]
    pipe.options(preset="sd2.1_2048x2048", H=1536, W=1536)  # no preset for it: none named
    assert capsys.readouterr().err.strip().endswith("made for another size")


def test_the_size_warning_reads_quoted_sides_alike(tiny_pipe, txt2img, tmp_path, capsys):
    from ldm.pipeline import Pipeline
    preset = tmp_path / "quoted.yaml"
    preset.write_text("family: sd2\nH: '2048'\nW: '2048'\ndilate: 2\n")
    args = txt2img.parse_args(["--preset", str(preset), "--H", "1024", "--W", "1024"])
    cli = txt2img.preset_steps_warning(args, txt2img.options_from_args(args))
    Pipeline(tiny_pipe.model).options(preset=str(preset), H=1024, W=1024)
    api = capsys.readouterr().err.strip()
    assert cli.startswith("warning: preset quoted is tuned for 2048x2048; at --W 1024 --H 1024")
    assert api.startswith("warning: preset quoted is tuned for 2048x2048; at W=1024, H=1024")
