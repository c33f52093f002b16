"""ldm.outputs and the outputs of scripts/txt2img.py: atomic writes that never overwrite,
numbering that goes on across runs, generation parameters in every PNG, JSON sidecars, latents,
byte-identical PNGs from identical runs, and nothing partial after Ctrl-C."""
import errno
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY_CKPT = REFERENCE / "tiny" / "tiny-sd21.ckpt"
TINY_CONFIG = REPO / "configs" / "tiny" / "tiny-sd21.yaml"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import outputs  # noqa: E402
from ldm.hashing import short_hash  # noqa: E402
from ldm.outputs import OutputError, OutputWriter, ensure_writable_dir, write_new_file  # noqa
from ldm.pipeline import GenerationOptions  # noqa: E402
from conftest import load_script


def partial_files(folder):
    return sorted(p.name for p in Path(folder).rglob(outputs.PARTIAL_PREFIX + "*"))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class Interrupt:
    """A stand-in for an os function that raises KeyboardInterrupt on its `at`-th call."""

    def __init__(self, real, at=1):
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# write_new_file


def test_write_new_file_never_overwrites(tmp_path):
    (tmp_path / "00000.png").write_bytes(b"old")
    path = write_new_file(tmp_path / "00000.png", b"new")
    assert path == tmp_path / "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"old"
    assert path.read_bytes() == b"new"
    assert write_new_file(tmp_path / "00000.png", b"newer") == tmp_path / "00002.png"
    assert write_new_file(tmp_path / "grid-0009.png", b"g") == tmp_path / "grid-0009.png"
    assert write_new_file(tmp_path / "grid-0009.png", b"h") == tmp_path / "grid-0010.png"
    assert partial_files(tmp_path) == []


def test_new_files_are_not_private(tmp_path):
    """mkstemp makes 0600 files; a sample must get the mode open() would give it."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_new_file(tmp_path / "00000.png", b"x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("where", ["fsync", "link"])
def test_ctrl_c_inside_a_write_leaves_no_partial_file(tmp_path, monkeypatch, where):
    first = write_new_file(tmp_path / "00000.png", b"finished image")
    monkeypatch.setattr(outputs.os, where, Interrupt(getattr(os, where)))
    with pytest.raises(KeyboardInterrupt):
        write_new_file(tmp_path / "00001.png", b"half-written image")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]
    assert first.read_bytes() == b"finished image"
    assert outputs._pending == set()


def test_file_systems_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    (tmp_path / "00000.png").write_bytes(b"old")
    monkeypatch.setattr(outputs.os, "link", no_link)
    assert write_new_file(tmp_path / "00000.png", b"new") == tmp_path / "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"old"
    assert (tmp_path / "00001.png").read_bytes() == b"new"
    assert partial_files(tmp_path) == []


def test_an_output_folder_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file exists and is not a folder") as info:
        ensure_writable_dir(tmp_path / "file" / "out" / "samples")
    assert "\n" not in str(info.value)
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


# ---------------------------------------------------------------------------------------------
# OutputWriter, without a model


def fake_run(tmp_path, **overrides):
    assert TINY_CKPT.is_file(), f"the tiny reference checkpoint {TINY_CKPT} is missing"
    args = SimpleNamespace(ckpt=str(TINY_CKPT), config=str(TINY_CONFIG), save_latent=True,
                           metadata="json")
    opts = GenerationOptions(H=128, W=128, steps=2, seed=51, precision="full", dilate=2.0,
                             dilate_tau=1, dilate_skip=1, freeu=(1.1, 1.2, 0.9, 0.2))
    for key, value in overrides.items():
        setattr(opts if hasattr(opts, key) else args, key, value)
    return args, opts


def fake_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 128, 128), generator=g) * 2 - 1, torch.randn((n, 4, 16, 16),
                                                                          generator=g)


def test_writer_files_and_numbering_across_runs(tmp_path):
    args, opts = fake_run(tmp_path)
    writer = OutputWriter(tmp_path / "out", args, opts)
    decoded, latents = fake_batch(2, 0)
    paths = writer.save_batch(["a cat, sitting", "a dog"], decoded, latents)
    assert [p.name for p in paths] == ["00000.png", "00001.png"]
    assert writer.save_grid(2).name == "grid-0000.png"
    assert writer.summary() == ("samples/00000.png to 00001.png (with .npy latents and .json "
                                "sidecars), grid-0000.png")
    samples = tmp_path / "out" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "00000.json", "00000.npy", "00000.png", "00001.json", "00001.npy", "00001.png"]
    latent = np.load(samples / "00001.npy")
    assert latent.dtype == np.float32 and latent.shape == (4, 16, 16)
    np.testing.assert_array_equal(latent, latents[1].numpy())
    sidecar = json.loads((samples / "00000.json").read_text())
    assert sidecar["prompt"] == "a cat, sitting"
    assert sidecar["ckpt_hash"] == short_hash(TINY_CKPT)
    assert sidecar["options"]["dilate"] == 2.0 and sidecar["image"] == "00000.png"
    assert sidecar["file_hashes"] == {"config": short_hash(TINY_CONFIG)}
    # a second run into the same folder goes on numbering; a gap is never refilled
    (tmp_path / "out" / "grid-0000.png").rename(tmp_path / "out" / "grid-0003.png")
    writer = OutputWriter(tmp_path / "out", *fake_run(tmp_path, save_latent=False,
                                                      metadata="png"))
    paths = writer.save_batch(["a bird"], *fake_batch(1, 1))
    assert [p.name for p in paths] == ["00002.png"]
    assert not (samples / "00002.npy").exists() and not (samples / "00002.json").exists()
    assert writer.save_grid(1).name == "grid-0004.png"
    assert writer.save_grid(1) is None  # one grid a run
    assert writer.summary() == "samples/00002.png, grid-0004.png"
    with Image.open(tmp_path / "out" / "grid-0004.png") as grid:
        assert grid.text["parameters"].startswith("a bird\nSteps: 2")


def test_file_hashes_find_repository_paths_and_never_fail_a_run(tmp_path, monkeypatch):
    """A relative config found through the repository (as --config is, from any folder); a file
    that cannot be read is 'unreadable' (where the run reads it, it says why)."""
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(config="configs/tiny/tiny-sd21.yaml", from_file=None,
                           dilate_settings=str(tmp_path), disperse_transform=None)
    assert outputs.input_file_hashes(args) == {"config": short_hash(TINY_CONFIG),
                                               "dilate_settings": "unreadable"}


def test_parameters_text_carries_every_setting(tmp_path):
    args, opts = fake_run(tmp_path, dilate=None, dilate_settings="/x/dil, v2.txt", ndcfg_tau=5,
                          ndcfg_dilate_settings="nd.txt", tiled_decoding=True, overlap=4,
                          sync_gn=True, tile_size=32, sampler="dpm", scale=7.5, W=192,
                          fixed_code=True)
    text = outputs.parameters_text("a cat", args, opts, "0123456789", 3, 1)
    prompt, line = text.split("\n")
    assert prompt == "a cat"
    fields = dict(re.findall(r'(\w[\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:, |$)', line))
    assert fields["Seed"] == "51" and fields["Size"] == "192x128" and fields["Steps"] == "2"
    assert (fields["Precision"], fields["Fixed code"], fields["RNG"]) == ("full", "True", "cpu")
    assert fields["Sampler"] == "DPM-Solver++ (2M)" and fields["CFG scale"] == "7.5"
    assert fields["Model"] == "tiny-sd21.ckpt" and fields["Model hash"] == "0123456789"
    assert fields["Batch size"] == "3" and fields["Batch pos"] == "1"
    assert json.loads(fields["dilate_settings"]) == "/x/dil, v2.txt"  # quoted: it has a comma
    assert fields["freeu"] == "1.1 1.2 0.9 0.2"
    for name in ("dilate", "dilate_tau", "dilate_skip", "progressive_dilate", "dilate_settings",
                 "ndcfg_dilate_settings", "ndcfg_tau", "disperse_settings", "disperse_transform",
                 "inflate_tau", "freeu", "tiled_decoding", "overlap", "sync_gn", "tile_size"):
        assert name in fields, name  # every ScaleCrafter setting, each under its flag name
    assert (fields["tiled_decoding"], fields["sync_gn"]) == ("True", "True")
    assert (fields["ndcfg_tau"], fields["overlap"], fields["tile_size"]) == ("5", "4", "32")
    assert "Timestep spacing" not in fields  # DPM-Solver++ has its own time grid
    assert "Device" not in fields and "Preset" not in fields  # none known here
    args.device, args.preset, opts.precision = "cpu", "sd2.1_2048x2048", "autocast"
    fields = dict(re.findall(r'(\w[\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:, |$)',
                             outputs.parameters_text("a cat", args, opts, "0")))
    assert (fields["Device"], fields["Autocast dtype"], fields["Preset"]) == \
        ("cpu", "bfloat16", "sd2.1_2048x2048")
    assert fields["Precision"] == "autocast"
    opts.precision = "full"
    opts.sampler, opts.tile_size = "ddim", (32, 48)
    fields = dict(re.findall(r'(\w[\w \-/]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:, |$)',
                             outputs.parameters_text("a cat", args, opts, "0", tiles=(32, 48))))
    assert (fields["Timestep spacing"], fields["tile_size"], fields["Tiles"]) == \
        ("uniform", "32x48", "32x48")


def test_ctrl_c_while_saving_keeps_finished_images(tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of an image's write: the images before it stay as they
    were, the interrupted one does not appear, no temp file remains."""
    args, opts = fake_run(tmp_path)
    writer = OutputWriter(tmp_path / "out", args, opts)
    writer.save_batch(["first"], *fake_batch(1, 0))
    before = snapshot(tmp_path / "out")
    # each image writes .png, .npy and .json (one fsync each): stop in the 2nd image's .png
    monkeypatch.setattr(outputs.os, "fsync", Interrupt(os.fsync, at=4))
    with pytest.raises(KeyboardInterrupt):
        writer.save_batch(["second", "third"], *fake_batch(2, 1))
    monkeypatch.undo()
    writer.discard_partial_files()
    after = snapshot(tmp_path / "out")
    assert partial_files(tmp_path) == []
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(after) == sorted(before) + ["samples/00001.json", "samples/00001.npy",
                                              "samples/00001.png"]
    assert writer.count == 2
    with Image.open(tmp_path / "out" / "samples" / "00001.png") as image:
        assert image.text["parameters"].startswith("second\n")


# ---------------------------------------------------------------------------------------------
# The command line, end to end with the tiny model


@pytest.fixture(scope="module")
def cli():
    return load_script("txt2img", "txt2img_outputs")


def test_same_command_twice_gives_identical_numbered_outputs(cli, tmp_path, capsys):
    assert TINY_CKPT.is_file(), f"the tiny reference checkpoint {TINY_CKPT} is missing"
    out = tmp_path / "out"
    prompt = "a watercolor fox, in snow"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "128", "--W", "128",
            "--steps", "2", "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--device", "cpu", "--outdir", str(out), "--prompt", prompt, "--seed", "51",
            "--dilate", "2", "--dilate_tau", "1", "--dilate_skip", "1", "--metadata", "json",
            "--save_latent"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    capsys.readouterr()
    samples = out / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        f"0000{i}.{ext}" for i in (0, 1) for ext in ("json", "npy", "png")]
    assert sorted(p.name for p in out.glob("grid-*")) == ["grid-0000.png", "grid-0001.png"]
    assert partial_files(out) == []
    # determinism: byte for byte, metadata included
    assert (samples / "00000.png").read_bytes() == (samples / "00001.png").read_bytes()
    assert (out / "grid-0000.png").read_bytes() == (out / "grid-0001.png").read_bytes()
    # the metadata round trip
    with Image.open(samples / "00001.png") as image:
        assert image.size == (128, 128)
        parameters = image.text["parameters"]
    ckpt_hash = short_hash(TINY_CKPT)
    assert re.fullmatch(r"[0-9a-f]{10}", ckpt_hash)
    assert parameters.startswith(prompt + "\n")
    for part in ("Seed: 51", "RNG: cpu", "Size: 128x128", "Steps: 2", "Sampler: DDIM", "CFG scale: 9.0",
                 "Device: cpu", "n_samples: 1",
                 "dilate: 2.0", "dilate_tau: 1", "dilate_skip: 1", "progressive_dilate: False",
                 "Model: tiny-sd21.ckpt", f"Model hash: {ckpt_hash}"):
        assert part in parameters, (part, parameters)
    sidecar = json.loads((samples / "00001.json").read_text())
    assert sidecar["parameters"] == parameters and sidecar["ckpt_hash"] == ckpt_hash
    latent = np.load(samples / "00000.npy")
    assert latent.dtype == np.float32 and latent.shape == (4, 16, 16)
    assert np.isfinite(latent).all()
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.text["parameters"].startswith(prompt + "\n")


def test_an_auto_tiled_image_names_its_tiles_and_they_decode_it_again(cli, tmp_path, capsys):
    """`auto` follows the free memory (here: a budget that fits only small tiles); the `Tiles`
    the metadata names give the same pixels as --tile_size under the same budget (a budget
    that makes layers recompute can move the last bits: torch 2.7-2.12 give 4 pixels one
    level apart here)."""
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "192", "--W", "256",
            "--steps", "1", "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--device", "cpu", "--outdir", str(tmp_path), "--seed", "7", "--tiled_decoding",
            "--sync_gn", "--overlap", "2", "--metadata", "json"]
    assert cli.main(argv + ["--tile_size", "auto", "--decode_budget_gb", "0.0005"]) == 0
    with Image.open(tmp_path / "samples" / "00000.png") as image:
        auto_pixels, parameters = np.asarray(image), image.text["parameters"]
    tiles = re.search(r"Tiles: (\d+)x(\d+)", parameters)
    assert tiles and (int(tiles[1]), int(tiles[2])) not in ((12, 16), (24, 32))  # not half, whole
    assert json.loads((tmp_path / "samples" / "00000.json").read_text())["tiles"] == tiles[0][7:]
    assert cli.main(argv + ["--tile_size", f"{tiles[1]}x{tiles[2]}",
                            "--decode_budget_gb", "0.0005"]) == 0
    with Image.open(tmp_path / "samples" / "00001.png") as image:
        assert np.array_equal(np.asarray(image), auto_pixels)
        tile = f"{tiles[1]}x{tiles[2]}"
        assert f"tile_size: {tile}, Tiles: {tile}" in image.text["parameters"]
    assert cli.main(argv) == 0  # the seed's tiling, named too
    with Image.open(tmp_path / "samples" / "00002.png") as image:
        assert "Tiles: 12x16" in image.text["parameters"]
    capsys.readouterr()


def test_grid_written_with_the_last_batch_is_the_grid(tmp_path):
    """save_batch(..., grid_rows=...) encodes the grid beside the batch's images and writes it after
    them: the same file save_grid writes, the prompts of every batch in its parameters."""
    first, last = fake_batch(2, 0), fake_batch(1, 1)
    grids = []
    for folder, together in (("together", True), ("apart", False)):
        writer = OutputWriter(tmp_path / folder, *fake_run(tmp_path))
        writer.save_batch(["a cat", "a dog"], *first)
        if together:
            paths = writer.save_batch(["a bird"], *last, grid_rows=2)
            grid = writer.grid_path
        else:
            paths = writer.save_batch(["a bird"], *last)
            grid = writer.save_grid(2)
        assert [p.name for p in paths] == ["00002.png"] and grid.name == "grid-0000.png"
        grids.append(grid.read_bytes())
    assert grids[0] == grids[1]
    with Image.open(tmp_path / "together" / "grid-0000.png") as image:
        assert image.text["parameters"].startswith("a cat\na dog\na bird\nSteps: 2")


@pytest.mark.parametrize("fixed", [True, False])
def test_fixed_code_repeats_the_start_noise_across_batches(cli, tmp_path, capsys, fixed):
    """--fixed_code draws the start noise once for every batch (with eta 0 the batches are
    then the same image); without it, each batch continues the seeded stream."""
    out = tmp_path / "out"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "64", "--W", "64",
            "--steps", "2", "--n_iter", "2", "--n_samples", "1", "--precision", "full",
            "--outdir", str(out), "--prompt", "a fox", "--save_latent"]
    assert cli.main(argv + (["--fixed_code"] if fixed else [])) == 0
    capsys.readouterr()
    first, second = (np.load(out / "samples" / f"0000{i}.npy") for i in (0, 1))
    assert np.array_equal(first, second) == fixed
    if not fixed:  # the stream: x_T, one draw per DDIM step (2 here), then the next x_T
        from conftest import rel_err
        stream = torch.Generator().manual_seed(42)
        for _ in range(3):
            torch.randn((1, 4, 8, 8), generator=stream)
        start = torch.randn((1, 4, 8, 8), generator=stream)
        pipe = cli.load_pipeline(cli.parse_args(argv), cli.PhaseTimer("cpu", False))
        assert not hasattr(pipe.model.first_stage_model, "encoder")  # txt2img only decodes
        opts = GenerationOptions(H=64, W=64, steps=2, precision="full")
        z, _ = pipe.sample(["a fox"], opts, None, start, progress=False)
        assert rel_err(z[0], second) <= 1e-6


def test_prompt_file_repeat_and_grid_rows(cli, tmp_path, capsys):
    """Three prompts, each twice, in batches of 4: six images, and a grid of 3 images a row
    (--n_rows, not the batch size) naming each prompt once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na boat\na tree\n")
    out = tmp_path / "out"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "64", "--W", "64",
            "--steps", "1", "--n_iter", "1", "--n_samples", "4", "--precision", "full",
            "--outdir", str(out), "--from-file", str(prompts), "--repeat", "2",
            "--n_rows", "3"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    written = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in written] == [f"0000{i}.png" for i in range(6)]
    with Image.open(written[4]) as image:  # the second batch's first image
        assert image.text["parameters"].startswith("a tree\n")
        assert "Batch size: 2, Batch pos: 0, Batch index: 1" in image.text["parameters"]
    with Image.open(out / "grid-0000.png") as grid:  # make_grid: 2 px of padding around each
        assert grid.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)
        assert grid.text["parameters"].startswith("a fox\na boat\na tree\nSteps: ")


def test_fixed_code_serves_a_short_last_batch(cli, tmp_path, capsys):
    """Three prompts in batches of 2 with --fixed_code: the last batch of one takes the first
    start noise, so the same prompt gives the first image again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na fox\na fox\n")
    out = tmp_path / "out"
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "64", "--W", "64",
            "--steps", "2", "--n_iter", "1", "--n_samples", "2", "--precision", "full",
            "--outdir", str(out), "--from-file", str(prompts), "--fixed_code", "--save_latent"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    first, second, last = (np.load(out / "samples" / f"0000{i}.npy") for i in range(3))
    from conftest import rel_err
    assert rel_err(last, first) <= 1e-5 and rel_err(second, first) > 0.1


def test_an_interrupted_batch_keeps_its_written_images_in_the_grid(tmp_path, monkeypatch):
    """Ctrl-C between two images of one batch: the grid written then has the image kept."""
    writer = OutputWriter(tmp_path / "out", *fake_run(tmp_path))
    real, calls = writer._write_sample, []

    def second_interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(writer, "_write_sample", second_interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.save_batch(["a cat", "a dog"], *fake_batch(2, 0))
    grid = writer.save_grid(2)
    with Image.open(grid) as image:
        assert image.size == (128, 128)  # one 128² image
    assert writer.summary() == ("samples/00000.png (with .npy latents and .json sidecars), "
                                "grid-0000.png")


def test_sampling_without_a_generator_draws_from_the_global_one(tiny_pipe):
    from ldm.pipeline import GenerationOptions
    opts = GenerationOptions(H=64, W=64, steps=1, precision="full")
    torch.manual_seed(1)
    z, _ = tiny_pipe.sample(["x"], opts, None, progress=False)
    torch.manual_seed(1)
    start = torch.randn((1, 4, 8, 8))
    z_from_start, _ = tiny_pipe.sample(["x"], opts, None, start, progress=False)
    assert torch.equal(z, z_from_start)  # (eta 0: the start alone decides)


def test_images_become_8_bit_by_truncation_as_the_seeds_scripts_do():
    """LDM's scripts write `(255 * x).astype(uint8)` of x in [0, 1]: truncation, not rounding."""
    from ldm.pipeline import to_pil

    level = 100.7 / 255  # 100.7 levels: truncated to 100 (rounding would give 101)
    image = to_pil(torch.full((1, 3, 2, 2), 2 * level - 1))[0]
    assert np.asarray(image).tolist() == [[[100] * 3] * 2] * 2


def test_the_grid_holds_each_samples_exact_pixels_and_keeps_only_8_bits(tmp_path):
    """make_grid's layout (2-pixel black borders, rows of n_rows images) over the very pixels
    of the sample PNGs; what the run keeps for it is uint8, a quarter of the decoded floats."""
    args, opts = fake_run(tmp_path)
    writer = OutputWriter(tmp_path / "out", args, opts)
    first, second = fake_batch(2, 1), fake_batch(1, 2)
    paths = writer.save_batch(["a", "b"], *first)
    paths += writer.save_batch(["c"], *second, grid_rows=2)
    assert all(image.dtype == torch.uint8 for image in writer.images)
    with Image.open(writer.grid_path) as grid:
        grid = np.asarray(grid.convert("RGB"))
    assert grid.shape == (2 + 2 * 130, 2 + 2 * 130, 3)
    for k, path in enumerate(paths):
        with Image.open(path) as sample:
            sample = np.asarray(sample.convert("RGB"))
        top, left = 2 + (k // 2) * 130, 2 + (k % 2) * 130
        assert np.array_equal(grid[top:top + 128, left:left + 128], sample), k
    assert not grid[:2].any() and not grid[:, 130:132].any()  # the borders
    assert not grid[132:, 132:].any()  # no fourth image: its place stays black
