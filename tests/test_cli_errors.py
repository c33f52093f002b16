"""scripts/txt2img.py refuses bad input with one line on stderr and a non-zero exit, before it
loads the model where it can; it never shows a traceback unless --debug is given.

Most cases call the CLI's main(argv) in-process; two run it as a subprocess, end to end."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIFFUSERS_VAE, diffusers_folder, load_script, our_stderr

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY_CKPT = REFERENCE / "tiny" / "tiny-sd21.ckpt"
TINY_CONFIG = REPO / "configs" / "tiny" / "tiny-sd21.yaml"
SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
SCRIPT = REPO / "scripts" / "txt2img.py"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def cli():
    """The CLI module, imported from its file (scripts/ is not a package)."""
    return load_script("txt2img", "txt2img_cli_errors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs of every kind, made once for the module."""
    d = tmp_path_factory.mktemp("bad")

    def write(name, data):
        path = d / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    assert TINY_CKPT.is_file(), f"the tiny reference checkpoint {TINY_CKPT} is missing"
    assert TINY_CONFIG.is_file(), f"the tiny config {TINY_CONFIG} is missing"
    good = TINY_CKPT.read_bytes()
    paths = {
        "folder": d / "a-folder",
        "regular": write("regular-file", "not a folder"),
        "missing": d / "missing",
        "not_ldm.yaml": write("not_ldm.yaml", "foo: 1\nbar: [1, 2]\n"),
        "no_target.yaml": write("no_target.yaml", "model:\n  params:\n    channels: 4\n"),
        "bad_target.yaml": write("bad_target.yaml", "model:\n  target: ldm.no_such.Model\n"),
        "os_target.yaml": write("os_target.yaml", "model:\n  target: os.system\n  params:\n"
                                "    command: touch {}\n".format(d / "ran")),
        "function_target.yaml": write("function_target.yaml",
                                      "model:\n  target: ldm.util.load_config\n"),
        "no_unet.yaml": write("no_unet.yaml", TINY_CONFIG.read_text().replace(
            "    unet_config:", "    not_a_unet_config:")),
        "word_scale.yaml": write("word_scale.yaml", TINY_CONFIG.read_text().replace(
            "scale_factor: 0.18215", "scale_factor: abc")),
        "true_scale.yaml": write("true_scale.yaml", TINY_CONFIG.read_text().replace(
            "scale_factor: 0.18215", "scale_factor: true")),  # YAML's bool, an int to Python
        "no_vae.yaml": write("no_vae.yaml", TINY_CONFIG.read_text().replace(
            "    first_stage_config:", "    not_a_first_stage_config:")),
        "broken.yaml": write("broken.yaml", "model: [\n"),
        "empty.ckpt": write("empty.ckpt", b""),
        "truncated.ckpt": write("truncated.ckpt", good[: len(good) // 2]),
        "garbage.ckpt": write("garbage.ckpt", bytes(range(256)) * 40),
        "empty.txt": write("empty.txt", ""),
        "blank.txt": write("blank.txt", "  \n\n\t\n"),
        "latin1.txt": write("latin1.txt", "caf\xe9 au lait\n".encode("latin-1")),
        "bad_settings.txt": write("bad_settings.txt", "no factor here\n"),
        "unknown_conv.txt": write("unknown_conv.txt", "down_blocks.9.resnets.0.conv1:2\n"),
    }
    paths["folder"].mkdir()
    other = d / "other.ckpt"  # a valid torch file, but not a Stable Diffusion state dict
    torch.save({"encoder.weight": torch.zeros(4, 4), "encoder.bias": torch.zeros(4)}, other)
    paths["other.ckpt"] = other
    return paths


@pytest.fixture
def base(tmp_path):
    return ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "128", "--W", "128",
            "--steps", "2", "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--device", "cpu", "--outdir", str(tmp_path / "out"), "--prompt", "a red cube"]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model."""
    import ldm.pipeline

    def load(*args, **kwargs):
        pytest.fail("the model was loaded although the input could be refused before")

    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", classmethod(load))


@pytest.fixture
def no_sampling(monkeypatch):
    import ldm.pipeline

    def sample(*args, **kwargs):
        pytest.fail("sampling started although the input is bad")

    monkeypatch.setattr(ldm.pipeline.Pipeline, "sample", sample)


def call(cli, capsys, argv):
    """(exit status, stderr lines) of main(argv) in this process."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    return status, err.splitlines()


def fill(flag, files):
    """`{name}` in a flag becomes the path files[name]."""
    return re.sub(r"\{([^}]+)\}", lambda m: str(files[m.group(1)]), flag)


def assert_one_line(status, lines, expected, code=1):
    assert status == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    assert expected in lines[0], lines
    assert "Traceback" not in lines[0]


# (case id, extra flags: {name} are paths of the `files` fixture, expected part of the message)
EARLY = [
    ("H-not-multiple-of-64", ["--H", "100"], "--H must be a positive multiple of 64, got 100"),
    ("W-zero", ["--W", "0"], "--W must be a positive multiple of 64, got 0"),
    ("H-negative", ["--H", "-64"], "--H must be a positive multiple of 64"),
    ("steps-zero", ["--steps", "0"], "--steps must be positive, got 0"),
    ("steps-negative", ["--steps", "-5"], "--steps must be positive, got -5"),
    ("samples-zero", ["--n_samples", "0"], "--n_samples must be positive, got 0"),
    ("samples-zero-from-file", ["--n_samples", "0", "--from-file", "{blank.txt}"],
     "--n_samples must be positive"),
    ("n_iter-zero", ["--n_iter", "0"], "--n_iter must be positive"),
    ("dilate-zero", ["--dilate", "0"], "--dilate must be at least 1 (1: the trained conv), "
                                       "got 0"),
    ("dilate-negative", ["--dilate", "-2"], "--dilate must be at least 1"),
    ("dilate-below-1", ["--dilate", "0.5"], "--dilate must be at least 1 (1: the trained conv), "
                                           "got 0.5"),
    ("dilate-nan", ["--dilate", "nan"], "--dilate must be a finite number"),
    ("sync-gn-without-tiles", ["--sync_gn"], "--sync_gn needs --tiled_decoding"),
    ("ddim-steps-over-500", ["--steps", "501"], "--steps must be at most 500 with DDIM"),
    ("dpm-steps-over-1000", ["--dpm", "--steps", "1001"], "--steps must be at most 1000 with DPM"),
    ("plms-eta", ["--plms", "--ddim_eta", "1"], "PLMS is deterministic: use --ddim_eta 0"),
    ("dpm-eta", ["--dpm", "--ddim_eta", "0.5"], "DPM-Solver++ (2M) is deterministic"),
    ("progressive-without-dilation", ["--progressive_dilate"],
     "--progressive_dilate needs --dilate or --dilate_settings"),
    ("dilate-tau-negative", ["--dilate", "2", "--dilate_tau", "-1"], "--dilate_tau"),
    ("dilate-skip-negative", ["--dilate", "2", "--dilate_skip", "-1"], "--dilate_skip"),
    ("ndcfg-tau-negative", ["--ndcfg_tau", "-3"], "--ndcfg_tau must not be negative"),
    ("inflate-tau-negative", ["--inflate_tau", "-1"], "--inflate_tau must not be negative"),
    ("overlap-odd", ["--tiled_decoding", "--overlap", "3"], "--overlap must be even"),
    ("overlap-negative", ["--tiled_decoding", "--overlap", "-2"], "--overlap must be even"),
    ("overlap-not-smaller", ["--tiled_decoding", "--overlap", "8"],
     "--overlap (8) must be smaller than the tile (8 latent pixels)"),
    ("overlap-vs-tile-size", ["--tiled_decoding", "--tile_size", "6", "--overlap", "6"],
     "must be smaller than the tile"),
    ("tile-size-zero", ["--tiled_decoding", "--tile_size", "0"],
     "--tile_size must be a positive integer, HxW or 'auto', got 0"),
    ("decode-budget-zero", ["--tiled_decoding", "--decode_budget_gb", "0"],
     "--decode_budget_gb must be a positive number"),
    ("decode-budget-nan", ["--decode_budget_gb", "nan"], "--decode_budget_gb must be a positive"),
    ("decode-budget-huge", ["--decode_budget_gb", "1e300"],
     "--decode_budget_gb must be a positive number of GiB (at most 2^20), got 1e+300"),
    ("dilate-huge", ["--dilate", "1e20"], "--dilate must be at most 64, got 1e+20"),
    ("scale-inf", ["--scale", "inf"], "--scale must be a finite number"),
    ("freeu-nan", ["--freeu", "1.1", "1.2", "nan", "0.2"], "--freeu must be a finite number"),
    ("seed-negative", ["--seed", "-1"], "--seed must be in 0..4294967295"),
    ("prompt-and-file", ["--from-file", "{blank.txt}", "--prompt", "x"],
     "--prompt and --from-file exclude each other"),
    ("repeat-without-file", ["--repeat", "2"], "--repeat repeats the prompts of --from-file"),
    ("outdir-empty", ["--outdir", ""], "--outdir must not be empty"),
    ("settings-no-entries", ["--dilate_settings", "{blank.txt}"], "has no entries"),
    ("preset-not-yaml", ["--preset", "{broken.yaml}"], "is not valid YAML"),
    ("config-missing", ["--config", "{missing}"], "does not exist"),
    ("config-folder", ["--config", "{folder}"], "is a folder, not a file"),
    ("config-not-yaml", ["--config", "{broken.yaml}"], "is not valid YAML"),
    ("config-not-ldm", ["--config", "{not_ldm.yaml}"], "has no 'model' section"),
    ("config-no-target", ["--config", "{no_target.yaml}"], "has no 'model.target'"),
    ("config-bad-target", ["--config", "{bad_target.yaml}"], "cannot import target"),
    ("config-runs-code", ["--config", "{os_target.yaml}"],
     "target 'os.system' is not a model class of this package (ldm.*, or an sgm.* name of one)"),
    ("config-function-target", ["--config", "{function_target.yaml}"],
     "target 'ldm.util.load_config' is not a class"),
    ("config-empty-path", ["--config", ""], "config file: an empty path was given"),
    ("ndcfg-settings-without-tau", ["--ndcfg_dilate_settings", "x.txt"],
     "--ndcfg_dilate_settings acts for --ndcfg_tau steps, and --ndcfg_tau is 0: give "
     "--ndcfg_tau N"),
    ("disperse-settings-without-tau", ["--dilate", "2", "--disperse_settings", "x.txt"],
     "--disperse_settings acts for --inflate_tau steps, and --inflate_tau is 0"),
    ("ckpt-empty-path", ["--ckpt", " "], "checkpoint file: an empty path was given"),
    ("config-without-unet", ["--config", "{no_unet.yaml}"],
     "no_unet.yaml has no 'model.params.unet_config' with a target"),
    ("config-word-scale", ["--config", "{word_scale.yaml}"],
     "word_scale.yaml: 'model.params.scale_factor' must be a number, got 'abc'"),
    ("config-bool-scale", ["--config", "{true_scale.yaml}"],
     "true_scale.yaml: 'model.params.scale_factor' must be a number, got True"),
    ("config-without-vae", ["--config", "{no_vae.yaml}"],
     "no_vae.yaml has no 'model.params.first_stage_config' with a target"),
    ("ckpt-missing", ["--ckpt", "{missing}"], "does not exist"),
    ("ckpt-model-id-missing", ["--ckpt", "nobody/no-such-model"],
     "checkpoint nobody/no-such-model does not exist, as a file or as a model in the Hugging "
     "Face cache ("),
    ("vae-model-id-missing", ["--vae", "nobody/no-such-vae"],
     "--vae nobody/no-such-vae does not exist, as a file or as a model in the Hugging Face "
     "cache ("),
    ("ckpt-folder", ["--ckpt", "{folder}"], "is a folder, not a file (a diffusers pipeline folder holds unet/"),
    ("ckpt-empty", ["--ckpt", "{empty.ckpt}"], "is empty"),
    ("prompt-file-missing", ["--from-file", "{missing}"], "prompt file"),
    ("prompt-file-empty", ["--from-file", "{empty.txt}"], "has no prompts"),
    ("prompt-file-blank", ["--from-file", "{blank.txt}"], "has no prompts"),
    ("prompt-file-not-utf8", ["--from-file", "{latin1.txt}"], "not UTF-8"),
    ("outdir-under-a-file", ["--outdir", "{regular}/sub"], "is not a folder"),
    ("outdir-is-a-file", ["--outdir", "{regular}"], "is not a folder"),
    ("settings-file-missing", ["--dilate_settings", "{missing}"], "does not exist"),
    # settings files are checked against the config's UNet built on the meta device
    ("settings-file-syntax", ["--dilate_settings", "{bad_settings.txt}"],
     "expected 'module_name:factor'"),
    ("settings-file-unknown-conv", ["--dilate_settings", "{unknown_conv.txt}"],
     "is not a 3x3 convolution"),
    ("disperse-without-transform", ["--disperse_settings", "{bad_settings.txt}",
                                    "--inflate_tau", "5"], "needs --disperse_transform"),
    ("preset-unknown", ["--preset", "no-such-preset"], "unknown preset"),
    ("tile-size-untiled", ["--tile_size", "auto"], "--tile_size needs --tiled_decoding"),
    ("dilate-skip-alone", ["--dilate_skip", "2"], "--dilate_skip applies to --dilate's uniform"),
    ("dilate-tau-alone", ["--dilate_tau", "5"], "--dilate_tau counts the steps of a "
                                                 "re-dilation, and there is none"),
    ("dilate-tau-0-alone", ["--dilate_tau", "0"], "--dilate_tau counts the steps"),
    ("dilate-skip-settings", ["--dilate_settings", str(REPO / "configs" / "scalecrafter" /
                                                       "dilate" / "sd2.1_1024x1024.txt"),
                              "--dilate_skip", "0"], "--dilate_skip applies to --dilate's"),
    ("disperse-undilated", ["--disperse_settings", str(REPO / "configs" / "scalecrafter" /
                                                       "disperse" / "sd2.1_2048x2048.txt"),
                            "--disperse_transform", str(REPO / "configs" / "scalecrafter" /
                                                        "transforms" / "R20to1.npy"),
                            "--inflate_tau", "3"],
     "--disperse_settings disperses re-dilated convs: it needs --dilate or --dilate_settings"),
    ("latent-channels", ["--C", "3"], "--C 3 --f 8 do not fit the model: its latents have 4 "
                                      "channels at 1/8 of the image size"),
    ("downsampling", ["--f", "16"], "--C 4 --f 16 do not fit the model"),
]


@pytest.mark.parametrize("flags, expected", [c[1:] for c in EARLY], ids=[c[0] for c in EARLY])
def test_bad_input_is_refused_before_loading(cli, capsys, files, base, no_load, tmp_path,
                                             flags, expected):
    flags = [fill(f, files) for f in flags]
    if "--from-file" in flags:  # (the two exclude each other)
        base = base[:base.index("--prompt")]
    status, lines = call(cli, capsys, base + flags)
    assert_one_line(status, lines, expected)
    assert not (tmp_path / "out").exists(), "a refused run created its output folder"
    assert not (files["folder"].parent / "ran").exists(), "a config target ran code"


@pytest.mark.parametrize("flags, expected", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--H", "abc"], "argument --H: invalid int value: 'abc'"),
    (["--tile_size", "big"], "argument --tile_size: expected an integer, HxW or 'auto', got 'big'"),
    (["--steps"], "argument --steps: expected one argument"),
    (["--freeu", "1", "2", "3"], "argument --freeu: expected 4 arguments"),
    (["--precision", "half"], "argument --precision: invalid choice"),
    (["--plms", "--dpm"], "argument --dpm: not allowed with argument --plms"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda, cuda:N or auto, got 'gpu'"),
    (["--device", "cuda:x"], "expected cpu, cuda, cuda:N or auto, got 'cuda:x'"),
], ids=["unknown-flag", "not-a-number", "tile-size-word", "missing-value", "freeu-three", "bad-choice",
        "plms-and-dpm", "device-word", "device-index-word"])
def test_bad_flags_exit_2_with_one_line(cli, capsys, base, no_load, flags, expected):
    status, lines = call(cli, capsys, base + flags)
    assert_one_line(status, lines, expected, code=2)


@pytest.mark.parametrize("config", ["v1-inference.yaml", "v2-inference.yaml",
                                    "sd_xl_base.yaml"])
def test_latent_shape_is_checked_in_either_config_layout(cli, config):
    """LDM's configs name the UNet `unet_config`, Stability's `network_config`."""
    from ldm.pipeline import GenerationOptions
    from ldm.util import load_config

    config = load_config(REPO / "configs" / "stable-diffusion" / config)
    cli.check_latent_shape(config, GenerationOptions())
    with pytest.raises(ValueError, match="its latents have 4 channels at 1/8 of the image"):
        cli.check_latent_shape(config, GenerationOptions(C=8))


def test_an_empty_prompt_is_allowed(cli):
    """As in the seed, `--prompt ""` is allowed; blank lines of a prompt file are skipped."""
    args = cli.parse_args(["--prompt", "", "--n_samples", "2"])
    assert cli.read_prompts(args) == [["", ""]]


def test_a_checkpoint_is_required(cli, capsys, base, no_load):
    i = base.index("--ckpt")
    status, lines = call(cli, capsys, base[:i] + base[i + 2:])
    assert_one_line(status, lines, "--ckpt is required")


def test_an_existing_output_folder_that_refuses_files_is_refused_before_loading(
        cli, capsys, base, no_load, tmp_path, monkeypatch):
    """A folder that exists but takes no files (read-only mount, no permission: simulated, as
    root may write anywhere) is refused in one line before the model loads, not after sampling."""
    import ldm.outputs

    samples = tmp_path / "out" / "samples"
    samples.mkdir(parents=True)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ldm.outputs.tempfile, "TemporaryFile", refuse)
    status, lines = call(cli, capsys, base)
    assert_one_line(status, lines, f"output folder {samples} is not writable: Permission denied")


# Checkpoints that can only be judged by reading them: refused by the loader, before sampling;
# a file that is no checkpoint at all before the model is even built (on the meta device).
LOADED = [
    ("truncated", "{truncated.ckpt}", None, "is not a valid PyTorch checkpoint", False),
    ("garbage", "{garbage.ckpt}", None, "is not a valid PyTorch checkpoint", False),
    ("not-sd", "{other.ckpt}", None, "does not fit the config", True),
    ("wrong-config", str(TINY_CKPT), str(SD_CONFIG), "does not fit the config", True),
]


@pytest.mark.parametrize("ckpt, config, expected, builds", [c[1:] for c in LOADED],
                         ids=[c[0] for c in LOADED])
def test_bad_checkpoint_is_refused(cli, capsys, files, base, no_sampling, tmp_path, monkeypatch,
                                   ckpt, config, expected, builds):
    import ldm.pipeline

    if not builds:
        monkeypatch.setattr(ldm.pipeline, "build_model",
                            lambda *a, **k: pytest.fail("built the model for a bad file"))
    ckpt = fill(ckpt, files)
    argv = base + ["--ckpt", ckpt] + (["--config", config] if config else [])
    status, lines = call(cli, capsys, argv)
    assert_one_line(status, lines, expected)
    assert ckpt in lines[0]
    assert not list((tmp_path / "out").rglob("*.png"))


def test_debug_shows_the_traceback(cli, capsys, base, no_load):
    with pytest.raises(ValueError, match="positive multiple of 64"):
        cli.main(base + ["--H", "100", "--debug"])


def test_ctrl_c_before_sampling_is_one_line(cli, capsys, base, monkeypatch, tmp_path):
    """Exit 130 with one line, and the output folders the run created are gone again (those
    that were there stay)."""
    import ldm.pipeline

    def load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", classmethod(load))
    existing = tmp_path / "existing"
    (existing / "samples").mkdir(parents=True)
    for outdir in (tmp_path / "new" / "out", existing):
        status, lines = call(cli, capsys, base + ["--outdir", str(outdir)])
        assert status == 130
        assert lines == ["interrupted: no image was made"]
    assert not (tmp_path / "new").exists()
    assert (existing / "samples").is_dir()


def test_a_run_refused_after_its_checks_leaves_no_folder_behind(cli, capsys, base, tmp_path):
    """A checkpoint that fails to load is found once the output folder exists: the folders
    the run created go again, those that were there stay."""
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    existing = tmp_path / "existing"
    (existing / "samples").mkdir(parents=True)
    for outdir in (tmp_path / "new" / "out", existing):
        status, lines = call(cli, capsys, base + ["--ckpt", str(broken), "--outdir", str(outdir)])
        assert status == 1 and len(lines) == 1 and lines[0].startswith("error:")
    assert not (tmp_path / "new").exists()
    assert (existing / "samples").is_dir()


def test_ctrl_c_in_the_first_batch_leaves_no_folder_behind(cli, capsys, base, monkeypatch,
                                                           tmp_path):
    import ldm.pipeline

    def sample(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ldm.pipeline.Pipeline, "sample", sample)
    status, lines = call(cli, capsys, base + ["--outdir", str(tmp_path / "new" / "out")])
    assert status == 130 and lines[-1] == "interrupted: no image was made"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_the_model_loads_is_one_line_with_its_status(
        cli, capsys, base, monkeypatch, tmp_path, signal_name, code):
    """Loading is the long wait (minutes for SDXL), when `timeout` or a batch system's SIGTERM
    often comes: its own status (143), one line, no folder left."""
    import ldm.pipeline

    stop = KeyboardInterrupt if signal_name == "SIGINT" else cli.Terminated

    def load(*args, **kwargs):
        raise stop
    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", load)
    status, lines = call(cli, capsys, base + ["--outdir", str(tmp_path / "new" / "out")])
    assert (status, lines) == (code, ["interrupted: no image was made"])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_while_sampling_keeps_finished_images(cli, capsys, base, monkeypatch, tmp_path,
                                                     signal_name, code):
    """The first batch is saved, Ctrl-C (or SIGTERM) comes in the second: exit 130 (143), one
    line naming what was kept, the first image complete with its grid, nothing partial."""
    from PIL import Image

    import ldm.pipeline

    calls = []
    stop = KeyboardInterrupt if signal_name == "SIGINT" else cli.Terminated

    def sample(self, prompts, opts, generator, x_T=None, settings=None, progress=True):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise stop
        z = torch.randn((len(prompts), opts.C, opts.H // opts.f, opts.W // opts.f),
                        generator=generator)
        return z, []

    monkeypatch.setattr(ldm.pipeline.Pipeline, "sample", sample)
    argv = base + ["--n_iter", "3"]
    status, lines = call(cli, capsys, argv)
    assert status == code
    messages = [line for line in lines if line.startswith(("interrupted", "error"))]
    assert len(messages) == 1 and "kept 1 finished image" in messages[0], lines
    assert messages[0].endswith(": samples/00000.png, grid-0000.png"), messages[0]
    assert not any("Traceback" in line for line in lines)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png"]
    with Image.open(out / "grid-0000.png") as grid:  # the grid of the images kept
        assert grid.size == (128, 128)
    assert not list(out.rglob(".partial-*"))
    with Image.open(out / "samples" / "00000.png") as image:
        image.load()  # complete, readable
        assert image.size == (128, 128)


def test_the_grid_of_an_interrupted_run_keeps_its_rows(cli, capsys, base, monkeypatch, tmp_path):
    """Two images kept of batches of one, then Ctrl-C: their grid has --n_rows a row."""
    from PIL import Image

    import ldm.pipeline

    calls = []

    def sample(self, prompts, opts, generator, x_T=None, settings=None, progress=True):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return torch.zeros((len(prompts), opts.C, opts.H // opts.f, opts.W // opts.f)), []

    monkeypatch.setattr(ldm.pipeline.Pipeline, "sample", sample)
    status, _ = call(cli, capsys, base + ["--n_iter", "4", "--n_rows", "2"])
    assert status == 130
    with Image.open(tmp_path / "out" / "grid-0000.png") as grid:  # 2 px of padding around each
        assert grid.size == (2 * (128 + 2) + 2, 128 + 2 + 2)


def run_script(*argv, cwd=REPO):
    # as a user runs it: no warnings filter, and buffered output (the exit must flush it)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONUNBUFFERED")}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_unknown_flag_end_to_end():
    result = run_script("--prompt", "x", "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: unrecognized arguments: --no-such-flag (see --help)"]


def test_malicious_checkpoint_is_refused_end_to_end(tmp_path):
    """A .ckpt whose pickle would run os.system: one line saying it was refused, exit 1, and
    the command never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, evil)
    assert not marker.exists()
    result = run_script("--config", TINY_CONFIG, "--ckpt", evil, "--H", "128", "--W", "128",
                        "--steps", "2", "--n_iter", "1", "--n_samples", "1", "--precision",
                        "full", "--outdir", tmp_path / "out", "--prompt", "x")
    assert result.returncode == 1, result.stderr
    lines = our_stderr(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: checkpoint") and "refused" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    assert not list((tmp_path / "out" / "samples").glob("*.png"))


def test_a_run_end_to_end_exits_fast_with_everything_written(tmp_path):
    """The script leaves without the interpreter's teardown (exit_now): its exit status, its
    last words on stdout and stderr, and every file are there all the same."""
    from PIL import Image

    result = run_script("--config", TINY_CONFIG, "--ckpt", TINY_CKPT, "--H", "64", "--W", "64",
                        "--steps", "1", "--n_iter", "1", "--n_samples", "2", "--precision",
                        "full", "--outdir", tmp_path, "--prompt", "x", "--timings")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(
        "Enjoy.\nThis run wrote samples/00000.png to 00001.png, grid-0000.png.")
    # what loads, before the load's seconds (on stdout: stderr holds warnings and errors)
    size = TINY_CKPT.stat().st_size / 1e6  # (a full-size one in GB)
    assert result.stdout.splitlines()[0] == (
        f"Loading {TINY_CKPT} ({size:.1f} MB) with {TINY_CONFIG} on cpu")
    assert result.stderr.rstrip().splitlines()[-1].startswith("timings (s): startup")
    for name in ("samples/00000.png", "samples/00001.png", "grid-0000.png"):
        with Image.open(tmp_path / name) as image:
            image.load()
            assert "parameters" in image.text


@pytest.mark.parametrize("flag, gpus, chosen", [("auto", 0, "cpu"), ("auto", 1, "cuda"),
                                               ("cuda:1", 2, "cuda:1")])
def test_the_device_given_is_the_device_loaded_on(cli, capsys, base, monkeypatch, flag, gpus,
                                                  chosen):
    """The sample scripts pass --device auto (no extra interpreter just to ask torch); cuda:N
    goes to the pipeline as it is."""
    import ldm.pipeline

    seen = []

    def load(cls, *args, device=None, **kwargs):
        seen.append(device)
        raise ValueError("stopped after choosing the device")

    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", classmethod(load))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    argv = [a if a != "cpu" else flag for a in base]
    status, lines = call(cli, capsys, argv)
    assert_one_line(status, lines, "stopped after choosing the device")
    assert seen == [chosen]


@pytest.mark.parametrize("device, count, expected", [
    ("cuda:1", 0, "--device cuda:1 was asked for, but no CUDA device is available"),
    ("cuda", 0, "--device cuda was asked for, but no CUDA device is available"),
    ("cuda:2", 2, "--device cuda:2 was asked for, but torch sees 2 CUDA device(s), cuda:0 to "
                  "cuda:1 (after CUDA_VISIBLE_DEVICES)"),
])
def test_a_cuda_device_torch_does_not_see_is_refused_before_loading(cli, capsys, base, no_load,
                                                                     monkeypatch, device, count,
                                                                     expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    argv = [a if a != "cpu" else device for a in base]
    status, lines = call(cli, capsys, argv)
    assert_one_line(status, lines, expected)


def test_the_metadata_names_the_device_type():
    """cuda:1's numbers are cuda's: a rerun on another GPU index is the same run."""
    from ldm.outputs import run_fields
    from ldm.pipeline import GenerationOptions

    fields = run_fields(argparse.Namespace(device="cuda:1"), GenerationOptions())
    assert fields == {"Device": "cuda", "Autocast dtype": "float16"}


def test_a_failed_compile_is_one_line_naming_its_cause(cli, capsys, base, monkeypatch):
    """torch.compile's backend errors say only "backend='inductor' raised:" on their first
    line; the cause (no C++ compiler, no Triton, ...) is what the user needs."""
    import ldm.precision

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("No working C++ compiler found")
    failure = None
    try:  # a real failure of torch.compile (a one-line function: fast to trace)
        torch.compile(lambda x: x + 1, backend=no_compiler)(torch.ones(1))
    except Exception as err:  # noqa: BLE001  (whatever torch raises is what the CLI gets)
        failure = err
    finally:
        torch._dynamo.reset()
    assert failure is not None, "this torch ran past a failing backend (suppress_errors?)"

    def compile_unet_in_place(unet):
        def forward(*args, **kwargs):
            raise failure
        unet.forward = forward
    monkeypatch.setattr(ldm.precision, "compile_unet_in_place", compile_unet_in_place)
    status, lines = call(cli, capsys, base + ["--compile"])
    errors = [line for line in lines if line.startswith("error: ")]
    assert status == 1 and errors == [
        "error: torch.compile failed (RuntimeError: No working C++ compiler found); "
        "run without --compile"], lines
    assert not [line for line in lines if "Traceback" in line]


def test_compile_says_why_the_first_step_waits(cli, capsys, base, monkeypatch):
    import ldm.precision

    compiled = []
    monkeypatch.setattr(ldm.precision, "compile_unet_in_place", compiled.append)
    status, lines = call(cli, capsys, base + ["--compile"])
    assert status == 0 and len(compiled) == 1
    assert [line for line in lines if line.startswith("note: --compile: the first step "
                                                      "compiles the UNet")]


def test_the_default_config_is_found_from_any_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["--ckpt", str(TINY_CKPT)])
    assert Path(args.config) == REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"
    (tmp_path / "configs" / "stable-diffusion").mkdir(parents=True)
    own = tmp_path / "configs" / "stable-diffusion" / "v2-inference.yaml"
    own.write_text("model: {}\n")  # a file of that name here is the user's, and wins
    assert Path(cli.parse_args(["--ckpt", str(TINY_CKPT)]).config).resolve() == own


def test_help_names_the_defaults(cli, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("number of sampling steps (default: 50)", "(default: 42)",
                  "a multiple of 64) (default: 512; SDXL: 1024)",
                  "(default: configs/stable-diffusion/v2-inference.yaml)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 102400000000 bytes. Error code 12"),
     "out of host memory (tried to allocate 95.4 GiB): try a smaller --H/--W"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                                 "total capacity of 79.1 GiB of which 1.2 GiB is free."),
     "out of GPU memory (tried to allocate 2.00 GiB): try a smaller --H/--W"),
    (MemoryError(), "out of host memory: try a smaller --H/--W"),
], ids=["cpu", "cuda", "python"])
def test_out_of_memory_is_one_line_with_what_to_change(cli, error, expected):
    assert cli.describe(error).startswith(expected)


def test_an_old_python_is_refused_in_one_line(cli):
    assert cli.python_too_old((3, 11, 4)) == "" and cli.python_too_old((3, 9, 0)) == ""
    assert cli.python_too_old((3, 8, 5)) == ("error: txt2img needs Python 3.9 or newer, this "
                                             "is 3.8 (see README: Manual setup)")


@pytest.mark.parametrize("config", [REFERENCE / "tiny-sd1" / "tiny-sd15.yaml",
                                    REFERENCE / "tiny-sdxl" / "tiny-sdxl.yaml"])
def test_a_family_with_its_own_defaults_still_refuses_in_one_line(cli, capsys, base, config):
    """The family's note line comes once the model loaded: a file the config cannot read
    (here the SD 2.x one) is one line, its error."""
    status, lines = call(cli, capsys, base + ["--config", str(config)])
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: checkpoint"), lines


def test_an_image_conditioned_config_is_refused_in_one_line(cli, capsys, base, tmp_path,
                                                            no_load):
    """Inpainting's UNet takes 9 channels and gives 4: not a latent txt2img can sample."""
    config = tmp_path / "inpainting.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("in_channels: 4", "in_channels: 9", 1))
    status, lines = call(cli, capsys, base + ["--config", str(config)])
    assert_one_line(status, lines, "the config's UNet takes 9 channels and gives 4: a model "
                                   "conditioned on an image")


def test_a_refiner_is_named_with_its_file(cli, capsys, base, tmp_path):
    from test_layouts import _refiner_state, write
    path = write(tmp_path, "refiner.safetensors", _refiner_state())
    status, lines = call(cli, capsys, base + ["--ckpt", str(path)])
    assert_one_line(status, lines, f"checkpoint {path} is an SDXL refiner")


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path):
    """A Ctrl-C in the first second lands in torch's import: the handler must not import torch
    again (a half-imported torch fails with nonsense). A stand-in torch raises it here."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
           "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY_CONFIG),
                             "--ckpt", str(TINY_CKPT), "--outdir", str(out)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert (result.returncode, result.stderr) == (130, "interrupted: no image was made\n")
    assert not out.exists()


def test_relative_settings_files_are_found_as_the_config_is(cli, tmp_path, monkeypatch):
    """From any folder, a repository path (configs/scalecrafter/...) is the repository's; a
    user preset's relative files are found beside it first."""
    monkeypatch.chdir(tmp_path)
    shipped = "configs/scalecrafter/dilate/sd2.1_1024x1024.txt"
    args = cli.parse_args(["--dilate_settings", shipped])
    assert Path(args.dilate_settings) == REPO / shipped
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.txt").write_text("middle_block.0.in_layers.2:2\n")
    preset = tmp_path / "presets" / "mine.yaml"
    preset.write_text(f"dilate_settings: mine.txt\nndcfg_dilate_settings: {shipped}\n")
    args = cli.parse_args(["--preset", str(preset)])
    assert Path(args.dilate_settings) == tmp_path / "presets" / "mine.txt"
    assert Path(args.ndcfg_dilate_settings) == REPO / shipped
    own = tmp_path / "configs" / "scalecrafter" / "dilate"  # one of that name here wins
    own.mkdir(parents=True)
    (own / "sd2.1_1024x1024.txt").write_text("middle_block.0.in_layers.2:2\n")
    assert cli.parse_args(["--dilate_settings", shipped]).dilate_settings == shipped


@pytest.mark.parametrize("scale, warned", [("1", True), ("5", False)])
def test_a_negative_prompt_at_scale_1_is_warned_unused(cli, capsys, base, scale, warned):
    status, lines = call(cli, capsys, base + ["--negative_prompt", "blurry", "--scale", scale,
                                              "--steps", "1"])
    assert status == 0, lines
    warning = "warning: --negative_prompt is unused at --scale 1 (no unconditional branch runs)"
    assert (warning in lines) == warned


@pytest.mark.parametrize("signals, code", [(["SIGTERM"], 143), (["SIGINT", "SIGINT"], 130)])
def test_a_signal_to_a_running_process_keeps_its_finished_images(base, tmp_path, signals, code):
    """`timeout`, `kill` and batch systems stop a job with SIGTERM: handled as Ctrl-C. A second
    Ctrl-C at once may cut the handling short, but never with a traceback or a partial file."""
    import signal
    import time

    from PIL import Image

    argv = base + ["--n_iter", "200"]
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "txt2img.py"), *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "out" / "samples" / "00000.png"
    deadline = time.monotonic() + 60
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in signals:
        process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(("interrupted: kept ", "interrupted again: ")), err
    if len(signals) == 1:
        assert (tmp_path / "out" / "grid-0000.png").is_file()
    assert not list((tmp_path / "out").rglob(".partial-*"))
    with Image.open(first) as image:
        image.load()  # complete, readable


def handled_without_interrupt(handler, signum):
    """Call a signal handler that must not raise KeyboardInterrupt: if it does (a regression),
    this test fails instead of the interrupt stopping the whole pytest session."""
    try:
        handler(signum, None)
    except KeyboardInterrupt as err:
        pytest.fail(f"the handler raised {type(err).__name__} instead of leaving")


@pytest.mark.parametrize("first, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_signal_leaves_at_once_with_the_firsts_status(cli, capsys, tmp_path, first,
                                                                code):
    """While the first stop is handled (the grid being written, say), another signal leaves
    with one line, the first's status, and no temp file of a write cut short."""
    import signal

    import ldm.outputs

    partial = tmp_path / ".partial-grid.png"
    partial.write_bytes(b"half a grid")
    ldm.outputs._pending.add(str(partial))
    left = []
    handler = cli.SignalStop(leave=left.append)
    stop = cli.Terminated if first == "SIGTERM" else KeyboardInterrupt
    with pytest.raises(BaseException) as raised:  # (another interrupt must not stop pytest)
        handler(getattr(signal, first), None)
    assert type(raised.value) is stop and left == []
    handled_without_interrupt(handler, signal.SIGINT)
    assert left == [code] and not partial.exists()
    assert capsys.readouterr().err.splitlines() == [
        "interrupted again: leaving at once (the images already written are kept)"]


def test_a_config_param_the_model_cannot_take_names_the_part(tmp_path):
    from omegaconf import OmegaConf

    from ldm.util import ConfigError, instantiate_from_config

    unet = OmegaConf.load(TINY_CONFIG).model.params.unet_config
    unet.params.num_head_channels = 0
    with pytest.raises(ConfigError, match="^the config's UNetModel could not be built from its "
                                          "params: integer division or modulo by zero$"):
        instantiate_from_config(unet)
    unet.params.num_head_channels, unet.params.model_channels = 16, "wide"  # a TypeError deep in
    with pytest.raises(ConfigError, match="^the config's UNetModel could not be built from its "
                                          "params: "):
        instantiate_from_config(unet)
    model = OmegaConf.load(TINY_CONFIG).model
    model.params.parameterization = "x0"  # neither eps nor v: refused, not run as eps
    with pytest.raises(ConfigError, match="could not be built from its params: parameterization "
                                          "must be 'eps' or 'v', got 'x0'$"):
        with torch.device("meta"):
            instantiate_from_config(model)


def test_a_full_disk_names_the_file_and_what_was_kept(cli, capsys, base, monkeypatch, tmp_path):
    import errno

    import ldm.outputs

    publish, calls = ldm.outputs._publish, []

    def full_disk_at_the_second(tmp, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return publish(tmp, path)

    monkeypatch.setattr(ldm.outputs, "_publish", full_disk_at_the_second)
    status, lines = call(cli, capsys, base + ["--n_iter", "2"])
    out = tmp_path / "out"
    assert_one_line(status, [line for line in lines if line.startswith("error")],
                    f"error: cannot write {out / 'samples' / '00001.png'}: No space left on "
                    f"device; kept 1 finished image(s) in {out}: samples/00000.png")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png"]  # no partial


def test_a_full_disk_at_the_first_image_keeps_nothing_and_no_folder(cli, capsys, base,
                                                                   monkeypatch, tmp_path):
    import errno

    import ldm.outputs

    def full_disk(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ldm.outputs, "_publish", full_disk)
    out = tmp_path / "new" / "out"
    status, lines = call(cli, capsys, base + ["--outdir", str(out)])
    assert_one_line(status, [line for line in lines if line.startswith("error")],
                    f"error: cannot write {out / 'samples' / '00000.png'}: No space left on "
                    "device; no image was kept")
    assert not (tmp_path / "new").exists()


def image_fields(path):
    """The `Key: value` pairs of a PNG's parameters (values unquoted)."""
    import json

    from PIL import Image

    with Image.open(path) as image:
        line = image.text["parameters"].splitlines()[-1]
    pairs = re.findall(r'(\w[\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:, |$)', line)
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def test_an_image_names_its_kernels_and_the_files_it_was_made_from(cli, capsys, base,
                                                                   tmp_path):
    """--channels_last (or --compile, or CUDA's fast kernels) moves the last bits: recorded.
    The files read are hashed, so an edited settings file or config shows, not only a path."""
    from ldm.hashing import short_hash

    settings = tmp_path / "dilate.txt"
    settings.write_text("down_blocks.1.resnets.0.conv1:2\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    argv = [a for a in base if a not in ("--prompt", "a red cube")] + [
        "--from-file", str(prompts), "--repeat", "2", "--dilate_settings", str(settings),
        "--dilate_tau", "1"]
    status, lines = call(cli, capsys, argv + ["--channels_last", "--decode_budget_gb", "0.75"])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00000.png")
    assert fields["Kernels"] == "channels_last"
    assert (fields["Prompt file"], fields["repeat"]) == ("prompts.txt", "2")
    assert fields["File hashes"] == (f"config: {short_hash(TINY_CONFIG)}, from-file: "
                                     f"{short_hash(prompts)}, dilate_settings: "
                                     f"{short_hash(settings)}")
    assert fields["decode_budget_gb"] == "0.75"  # given: it decides what a decode recomputes
    grid = image_fields(tmp_path / "out" / "grid-0000.png")  # a grid is shared as an image too
    for name in ("Kernels", "File hashes", "Prompt file", "repeat", "decode_budget_gb"):
        assert grid[name] == fields[name], name
    settings.write_text("down_blocks.1.resnets.0.conv1:3\n")  # edited between two runs
    status, lines = call(cli, capsys, argv)
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00002.png")
    assert "Kernels" not in fields  # the reference kernels
    assert "decode_budget_gb" not in fields  # a share of the free memory: not the image's
    assert fields["File hashes"].endswith(f"dilate_settings: {short_hash(settings)}")
    assert short_hash(settings) not in image_fields(
        tmp_path / "out" / "samples" / "00000.png")["File hashes"]


def test_file_hashes_are_of_the_files_as_read_before_the_load(cli, capsys, base, monkeypatch,
                                                               tmp_path):
    """The settings are read before the model loads (minutes); a file edited meanwhile must
    not put its new hash beside the old settings' image."""
    import ldm.pipeline
    from ldm.hashing import short_hash

    settings = tmp_path / "dilate.txt"
    settings.write_text("down_blocks.1.resnets.0.conv1:2\n")
    read = short_hash(settings)
    load = ldm.pipeline.Pipeline.load.__func__

    def load_while_edited(cls, *args, **kwargs):
        settings.write_text("down_blocks.1.resnets.0.conv1:3\n")
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", classmethod(load_while_edited))
    status, lines = call(cli, capsys, base + ["--dilate_settings", str(settings),
                                              "--dilate_tau", "1"])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00000.png")
    assert fields["File hashes"].endswith(f"dilate_settings: {read}")
    assert short_hash(settings) != read


def test_a_torch_too_old_is_one_line(cli, capsys, base, monkeypatch):
    """ldm.compat's floor, as the CLI reports it where the package is first imported."""
    import ldm.pipeline
    from ldm.compat import check_torch

    def load(*args, **kwargs):
        check_torch("2.6.0+cu124")
    monkeypatch.setattr(ldm.pipeline.Pipeline, "load", load)
    status, lines = call(cli, capsys, base)
    assert status == 1
    assert lines == ["error: torch 2.6.0+cu124 is too old: this tool needs torch >= 2.7 "
                     "(pip install -U torch torchvision)"]


def test_a_command_line_run_stops_on_both_signals_and_leaves_at_once_while_exiting(
        cli, monkeypatch):
    """stop_on_signals routes SIGINT and SIGTERM to one SignalStop; once exit_now is leaving,
    a signal leaves at once with the run's status (a hanging atexit handler cannot hold it)."""
    import atexit
    import signal

    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGTERM")}
    left = []

    class Left(Exception):
        pass

    def fake_exit(code):
        left.append(code)
        raise Left
    try:
        cli.stop_on_signals()
        handlers = [signal.getsignal(getattr(signal, name)) for name in before]
        assert isinstance(handlers[0], cli.SignalStop) and handlers[1] is handlers[0]
        monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: None)
        monkeypatch.setattr(cli.os, "_exit", fake_exit)
        with pytest.raises(Left):
            cli.exit_now(143)
        with pytest.raises(Left):
            handled_without_interrupt(signal.getsignal(signal.SIGINT), signal.SIGINT)
        assert left == [143, 143]
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def test_fetch_checkpoint_without_network_says_what_to_copy_and_leaves_nothing():
    """shellscripts/fetch_checkpoint.sh, offline (a refused connection stands in): exit 1, the URL
    and the target path in words, no partial file; a file already there is kept, no download."""
    script, name = REPO / "shellscripts" / "fetch_checkpoint.sh", f"test-fetch-{os.getpid()}.ckpt"
    target = REPO / "checkpoints" / name
    url = "http://127.0.0.1:9/model.ckpt"
    try:
        run = subprocess.run(["bash", str(script), name, url, "1 KB"], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 1, run.stderr
        assert url in run.stderr and f"-> {target}" in run.stderr
        assert not target.exists() and not target.with_name(name + ".partial").exists()
        target.write_bytes(b"weights")
        run = subprocess.run(["bash", str(script), name, url], capture_output=True, text=True,
                             timeout=60)
        assert (run.returncode, run.stderr, target.read_bytes()) == (0, "", b"weights")
    finally:
        for path in (target, target.with_name(name + ".partial")):
            path.unlink(missing_ok=True)


def test_a_transform_named_from_the_repository_is_found_from_anywhere_and_hashed(
        cli, capsys, base, tmp_path, monkeypatch):
    """A preset's dispersion transform, or one named relative to the repository, is found from
    any folder before the load, and its hash is in the image beside the settings file's."""
    from ldm.hashing import short_hash

    monkeypatch.chdir(tmp_path)
    transform = REPO / "configs" / "scalecrafter" / "transforms" / "R20to1.npy"
    args = cli.parse_args(["--preset", "sd2.1_2048x2048_disperse", "--ckpt", "x"])
    assert Path(args.disperse_transform) == transform
    settings = tmp_path / "disperse.txt"
    settings.write_text("down_blocks.1.resnets.0.conv1\n")
    status, lines = call(cli, capsys, base + [
        "--dilate", "2", "--dilate_tau", "1", "--disperse_settings", str(settings),
        "--disperse_transform", "configs/scalecrafter/transforms/R20to1.npy",
        "--inflate_tau", "1"])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00000.png")
    assert fields["File hashes"].endswith(f"disperse_settings: {short_hash(settings)}, "
                                          f"disperse_transform: {short_hash(transform)}")


def test_a_vae_file_is_taken_and_named_in_the_images(cli, capsys, base, tmp_path):
    """--vae: the checkpoint's VAE replaced by a standalone file's (its decoder's output
    bias moved: a brighter image), named and hashed in the metadata and the JSON sidecar; a
    --vae that is not there is one line before any loading."""
    import json

    import numpy as np
    from PIL import Image

    from ldm.checkpoint import load_state_dict, save_safetensors
    from ldm.hashing import short_hash

    vae = tmp_path / "vae-ft.safetensors"
    weights = {k[len("first_stage_model."):]: v.float() for k, v in load_state_dict(
        TINY_CKPT).items() if k.startswith("first_stage_model.")}
    weights["decoder.conv_out.bias"] += 0.5
    save_safetensors(weights, vae)
    status, lines = call(cli, capsys, base + ["--vae", str(vae), "--metadata", "json"])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00000.png")
    assert fields["VAE"] == "vae-ft.safetensors"
    assert f"vae: {short_hash(vae)}" in fields["File hashes"]
    sidecar = json.loads((tmp_path / "out" / "samples" / "00000.json").read_text())
    assert sidecar["vae"] == str(vae)
    status, lines = call(cli, capsys, base)
    assert status == 0, lines
    assert "VAE" not in image_fields(tmp_path / "out" / "samples" / "00001.png")
    swapped, own = (np.asarray(Image.open(tmp_path / "out" / "samples" / f"0000{i}.png"),
                               dtype=np.float64) for i in (0, 1))
    assert swapped.mean() > own.mean() + 20  # (+0.5 of the [-1, 1] range: ~64 levels)
    status, lines = call(cli, capsys, base + ["--vae", str(tmp_path / "missing.ckpt")])
    assert status != 0 and lines == [f"error: --vae file {tmp_path / 'missing.ckpt'} does not "
                                     "exist"]
    status, lines = call(cli, capsys, base + ["--vae", ""])
    assert status != 0 and lines == ["error: --vae file: an empty path was given"]
    empty = tmp_path / "empty"
    empty.mkdir()
    status, lines = call(cli, capsys, base + ["--vae", str(empty)])
    assert status != 0 and lines == [f"error: VAE folder {empty} holds no VAE weights file "
                                     "(diffusion_pytorch_model.safetensors or the like, in it or "
                                     "in its vae/, or one .safetensors / .ckpt)"]
    folder = tmp_path / "sd-vae-ft"  # a diffusers VAE folder: its file, named by the folder
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(DIFFUSERS_VAE.read_bytes())
    status, lines = call(cli, capsys, base + ["--vae", str(folder)])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00002.png")
    assert fields["VAE"] == "sd-vae-ft"


def test_a_diffusers_pipeline_folder_is_a_checkpoint(cli, capsys, base, tmp_path):
    """--ckpt FOLDER: a diffusers pipeline folder samples, hashed over its weights files; one
    of its parts' files is pointed to the folder; a folder that is none is told what one
    holds."""
    import hashlib

    from ldm.hashing import short_hash

    folder = diffusers_folder(tmp_path, "sd21")
    status, lines = call(cli, capsys, base + ["--ckpt", str(folder)])
    assert status == 0, lines
    fields = image_fields(tmp_path / "out" / "samples" / "00000.png")
    # the hash: SHA-256 of `part/file:its SHA-256` lines, the weights files part by part
    weights = ["unet/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    listing = "".join(f"{name}:{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n"
                      for name in weights)
    assert fields["Model"] == folder.name
    assert fields["Model hash"] == hashlib.sha256(listing.encode()).hexdigest()[:10]
    (folder / "vae" / "config.json").write_text("{}")  # (no weights: not hashed)
    assert short_hash(folder) == fields["Model hash"]
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"x" * 64)
    assert short_hash(folder) != fields["Model hash"]
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    status, lines = call(cli, capsys, base + ["--ckpt", str(unet)])
    assert status != 0 and lines == [f"error: checkpoint {unet} is the unet of the diffusers "
                                     f"pipeline folder {folder}: give that folder as --ckpt"]
    status, lines = call(cli, capsys, base + ["--ckpt", str(tmp_path / "out")])
    assert status != 0 and lines == [f"error: checkpoint file {tmp_path / 'out'} is a folder, "
                                     "not a file (a diffusers pipeline folder holds unet/, vae/ "
                                     "and text_encoder/; else give a single-file .ckpt / "
                                     ".safetensors)"]
