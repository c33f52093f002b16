"""The Python API (ldm.pipeline) refuses what the CLI refuses, with one ValueError line, before
any sampling: wrong types, options that do nothing, latents that do not fit the model."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CKPT, TINY_CONFIG
from ldm.pipeline import GenerationOptions, Pipeline

SMALL = dict(H=64, W=64, steps=1, precision="full")


@pytest.mark.parametrize("options, message", [
    (dict(H="128"), "--H must be an integer, got '128'"),
    (dict(H=128.0), "--H must be an integer"),
    (dict(steps=1.5), "--steps must be an integer"),
    (dict(seed=None), "--seed must be an integer, got None"),
    (dict(scale="9"), "--scale must be a number"),
    (dict(negative_prompt=None), "--negative_prompt must be text"),
    (dict(dilate_settings=3), "--dilate_settings must be a file path"),
    (dict(freeu=(1, 1, 1)), "--freeu takes four numbers"),
    (dict(sync_gn="false", tiled_decoding=True), "--sync_gn must be True or False, got 'false'"),
    (dict(tiled_decoding=True, tile_size=8.0),
     "--tile_size must be a positive integer, HxW or 'auto'"),
    (dict(sync_gn=True), "--sync_gn needs --tiled_decoding"),
    (dict(progressive_dilate=True), "--progressive_dilate needs --dilate or --dilate_settings"),
    (dict(inflate_tau=5), "--inflate_tau needs --disperse_settings"),
    (dict(sampler="dpm", ddim_eta=1.0), "DPM-Solver++ (2M) is deterministic"),
    (dict(rng="cuda"), "--rng must be one of cpu, device, got 'cuda'"),
    (dict(ddim_eta=1.2), "--ddim_eta must be between 0 and 1, got 1.2"),
    (dict(tiled_decoding=True, H=128, W=128),
     "--overlap (24) must be smaller than the tile (8 latent pixels): use --overlap 6 or less"),
    (dict(ndcfg_tau=5), "--ndcfg_tau needs --ndcfg_dilate_settings"),
    (dict(tiled_decoding=True, overlap=3), "--overlap must be even and non-negative, got 3"),
    (dict(H=72), "--H must be a positive multiple of 64, got 72"),
    (dict(seed=2**32), "--seed must be in 0..4294967295, got 4294967296"),
    (dict(steps=True), "--steps must be an integer, got True"),
    (dict(scale=True), "--scale must be a number, got True"),  # (True would be 1: no CFG)
    (dict(ddim_eta=-0.1), "--ddim_eta must be between 0 and 1, got -0.1"),
    (dict(dilate=2, dilate_settings="x.txt"), "use either --dilate or --dilate_settings"),
    (dict(precision="fp16"), "--precision must be 'full' or 'autocast', got 'fp16'"),
    (dict(sampler="dpm", timestep_spacing="leading"), "steps through its own time grid"),
    (dict(steps=501), "--steps must be at most 500 with DDIM, got 501"),
    (dict(dilate=64.5), "--dilate must be at most 64, got 64.5"),
], ids=lambda v: str(v)[:30])
def test_bad_options_are_one_value_error(options, message):
    with pytest.raises(ValueError) as error:
        GenerationOptions(**{**SMALL, **options}).validate()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_limits_the_messages_name_are_allowed():
    """'at most N' means N is accepted: each sampler's step limit, and the largest factor."""
    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.scalecrafter.redilation import MAX_FACTOR
    for name, sampler in SAMPLERS.items():
        GenerationOptions(**{**SMALL, "sampler": name, "steps": sampler.max_steps}).validate()
    GenerationOptions(**{**SMALL, "dilate": MAX_FACTOR}).validate()


def test_numpy_numbers_become_pythons():
    """torch's generator and the tiler take Python ints: numpy's become them in validate."""
    import numpy as np
    opts = GenerationOptions(**{**SMALL, "seed": np.int64(7), "steps": np.int32(2),
                                "tiled_decoding": np.bool_(True), "tile_size": np.int64(4),
                                "overlap": 2})
    opts.validate()
    assert type(opts.seed) is type(opts.steps) is type(opts.tile_size) is int
    assert opts.tiled_decoding is True
    torch.Generator().manual_seed(opts.seed)


@pytest.fixture(scope="module")
def pipe():
    assert TINY_CKPT.is_file(), "the tiny reference checkpoint is missing"
    return Pipeline.load(TINY_CONFIG, TINY_CKPT)


@pytest.mark.parametrize("prompts, options, x_T, message", [
    ([], {}, None, "prompts must be a non-empty list of strings"),
    ([None], {}, None, "prompts must be a non-empty list of strings"),
    (["a fox"], dict(f=16), None, "--C 4 --f 16 do not fit the model: its latents have 4 "
                                  "channels at 1/8"),
    (["a fox"], dict(C=8), None, "do not fit the model"),
    (["a fox"], {}, torch.zeros(1, 4, 4, 4), "x_T has shape (1, 4, 4, 4), the options want "
                                             "(1, 4, 8, 8)"),
    (None, {}, None, "prompts must be a string or a sequence of strings, got NoneType"),
    (b"a fox", {}, None, "prompts must be a string or a sequence of strings, got bytes"),
    ({"a fox": 1}, {}, None, "prompts must be a string or a sequence of strings, got dict"),
    (["a fox"], {}, np.zeros((1, 4, 8, 8)), "x_T must be a floating-point torch.Tensor, got "
                                            "ndarray"),
    (["a fox"], {}, torch.zeros(1, 4, 8, 8, dtype=torch.int64),
     "x_T must be a floating-point torch.Tensor, got a torch.int64 tensor"),
], ids=["no-prompts", "not-text", "downsampling", "channels", "start-noise", "none", "bytes",
        "dict", "numpy-noise", "integer-noise"])
def test_generate_refuses_what_does_not_fit(pipe, prompts, options, x_T, message):
    with pytest.raises(ValueError) as error:
        pipe.generate(prompts, GenerationOptions(**{**SMALL, **options}), x_T=x_T,
                      progress=False)
    assert message in str(error.value)


def test_start_noise_of_any_float_dtype_is_the_samplers_float32(pipe):
    """numpy's float64 (torch.from_numpy) or a half-precision x_T: the same run as float32."""
    opts = GenerationOptions(**SMALL)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe.generate("a fox", opts, x_T=x, progress=False).latents
    wide = pipe.generate("a fox", opts, x_T=x.double(), progress=False).latents
    assert torch.equal(wide, ref)
    half = pipe.generate("a fox", opts, x_T=x.half(), progress=False).latents
    assert torch.equal(half, pipe.generate("a fox", opts, x_T=x.half().float(),
                                           progress=False).latents)


def test_a_generator_that_is_not_one_is_refused(pipe):
    opts = GenerationOptions(**SMALL)
    for call in (lambda: pipe.generate("a fox", opts, generator=42, progress=False),
                 lambda: pipe.sample(["a fox"], opts, 42, progress=False)):
        with pytest.raises(ValueError, match="generator must be a torch.Generator .* or None, "
                                             "got int"):
            call()


@pytest.mark.parametrize("latents, message", [
    (torch.zeros(4, 8, 8), "the latents must be a (batch, 4, h, w) tensor, got shape (4, 8, 8)"),
    (torch.zeros(1, 3, 8, 8), "got shape (1, 3, 8, 8)"),
    (torch.zeros(0, 4, 8, 8), "got shape (0, 4, 8, 8)"),
    (np.zeros((1, 4, 8, 8), np.float32), "the latents must be a floating-point torch.Tensor, "
                                         "got ndarray"),
], ids=["no-batch", "channels", "empty", "numpy"])
def test_decode_refuses_latents_that_do_not_fit(pipe, latents, message):
    for call in (pipe.decode, pipe.decode_tiles):
        opts = GenerationOptions(**SMALL, tiled_decoding=call is pipe.decode_tiles, overlap=2)
        with pytest.raises(ValueError) as error:
            call(latents, opts)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_decode_checks_its_options_and_takes_float64_latents(pipe):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="--overlap must be even"):
        pipe.decode(z, GenerationOptions(**SMALL, tiled_decoding=True, overlap=3))
    opts = GenerationOptions(**SMALL)
    assert torch.equal(pipe.decode(z.double(), opts, progress=False),
                       pipe.decode(z, opts, progress=False))


def test_a_saved_latent_decodes_with_options_made_for_another_size(pipe):
    """The tiling is checked against the latent given (the default tile is half its side), and
    options only sampling reads do not matter to a decode."""
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(6))
    tiled = dict(tiled_decoding=True, overlap=8, sync_gn=True, precision="full")
    other = GenerationOptions(H=128, W=128, sampler="dpm", ddim_eta=1.0, **tiled)
    same = GenerationOptions(H=256, W=256, **tiled)
    assert torch.equal(pipe.decode(z, other, progress=False), pipe.decode(z, same, progress=False))
    with pytest.raises(ValueError, match="must be smaller than the tile \\(4 latent pixels\\)"):
        pipe.decode(z[..., :8, :8], other)
    with pytest.raises(ValueError, match="tiles \\(16, 16\\) given for a whole decode"):
        pipe.decode(z, GenerationOptions(H=256, W=256), tiles=(16, 16))


def test_prompts_may_be_any_ordered_sequence(pipe):
    from collections import UserList
    opts = GenerationOptions(**SMALL)
    ref = pipe.generate(["a fox", "a cat"], opts, progress=False).latents
    for prompts in (("a fox", "a cat"), UserList(["a fox", "a cat"]),
                    (p for p in ["a fox", "a cat"])):
        assert torch.equal(pipe.generate(prompts, opts, progress=False).latents, ref)
    with pytest.raises(ValueError, match="got set"):
        pipe.generate({"a fox", "a cat"}, opts, progress=False)


def test_relative_settings_files_are_the_repositorys_from_any_folder(monkeypatch, tmp_path):
    """As --config and the CLI's settings flags: from any folder."""
    monkeypatch.chdir(tmp_path)
    opts = GenerationOptions(**SMALL, dilate_settings="configs/scalecrafter/dilate/"
                                                      "sd2.1_1024x1024.txt")
    opts.validate()
    assert Path(opts.dilate_settings).is_absolute() and Path(opts.dilate_settings).is_file()
    opts = GenerationOptions(**SMALL, dilate_settings="mine.txt")  # nowhere: kept as given
    opts.validate()
    assert opts.dilate_settings == "mine.txt"


def test_a_tile_size_of_one_number_in_a_sequence_or_array_is_that_number():
    for given, tile in (((4,), 4), ([6], 6), (np.array([5, 7]), (5, 7)), (np.int64(4), 4)):
        opts = GenerationOptions(**SMALL, tiled_decoding=True, overlap=2, tile_size=given)
        opts.validate()
        assert opts.tile_size == tile and type(opts.tile_size) is type(tile), given


def test_real_numbers_become_pythons_floats():
    from fractions import Fraction
    opts = GenerationOptions(**SMALL, scale=Fraction(15, 2), ddim_eta=np.float32(0.5),
                             dilate=np.int64(2), freeu=(1, np.float64(1.2), 0.9, 0.2))
    opts.validate()
    assert (opts.scale, opts.ddim_eta, opts.dilate) == (7.5, 0.5, 2.0)
    assert {type(v) for v in (opts.scale, opts.ddim_eta, opts.dilate, *opts.freeu)} == {float}


def test_a_misspelt_option_is_named_with_the_likely_one(pipe):
    with pytest.raises(ValueError, match="unknown option 'sampeler' \\(did you mean "
                                         "'sampler'\\?\\)"):
        pipe.options(sampeler="plms")
    with pytest.raises(ValueError, match="unknown option 'zzz'$"):
        pipe.options(zzz=1)


def test_a_single_string_is_one_prompt(pipe):
    opts = GenerationOptions(**SMALL)
    one = pipe.generate("a fox", opts, progress=False)
    listed = pipe.generate(["a fox"], opts, progress=False)
    assert len(one.images) == 1 and torch.equal(one.latents, listed.latents)


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp16"), "precision must be 'full' or 'autocast', got 'fp16'"),
    (dict(device="gpu"), "unknown device 'gpu'"),
    (dict(chanels_last=True), "unknown layout option(s) chanels_last"),
], ids=["precision", "device", "misspelt-switch"])
def test_load_refuses_bad_arguments_before_reading_the_file(kwargs, message, monkeypatch):
    import ldm.checkpoint
    monkeypatch.setattr(ldm.checkpoint, "load_state_dict",
                        lambda *a, **k: pytest.fail("read the checkpoint"))
    with pytest.raises(ValueError) as error:
        Pipeline.load(TINY_CONFIG, TINY_CKPT, **kwargs)
    assert message in str(error.value)


def test_load_refuses_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available"):
        Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cuda")


def test_device_rng_draws_on_the_pipeline_device(pipe):
    """rng 'device' seeds a generator on the pipeline's device (on the CPU: the CPU's stream, so
    the same image); 'cpu' always a CPU one."""
    for rng in ("cpu", "device"):
        generator = pipe.noise_generator(GenerationOptions(**SMALL, seed=7, rng=rng))
        assert generator.device == torch.device("cpu") and generator.initial_seed() == 7
    opts = {**SMALL, "steps": 2, "ddim_eta": 1.0}
    on_device = pipe.generate(["a fox"], GenerationOptions(**opts, rng="device"), progress=False)
    on_cpu = pipe.generate(["a fox"], GenerationOptions(**opts), progress=False)
    assert torch.equal(on_device.latents, on_cpu.latents)


def test_a_batch_draws_its_start_noise_as_one_tensor(pipe):
    """As the reference: one torch.randn(B, C, h, w) per batch, so with eta 0 the first image of
    a batch of two is the image of a batch of one, and the second another image."""
    opts = GenerationOptions(**{**SMALL, "steps": 2, "seed": 5})
    two = pipe.generate(["a fox", "a fox"], opts, progress=False).latents
    one = pipe.generate(["a fox"], opts, progress=False).latents
    assert torch.allclose(two[:1], one, rtol=1e-4, atol=1e-5)
    assert (two[1] - two[0]).abs().max() > 0.1


def test_every_option_is_a_txt2img_flag_of_its_name():
    """The CLI builds GenerationOptions from the flags of the fields' names (the sampler from
    --plms/--dpm), so an option without its flag would silently keep its default there."""
    from dataclasses import fields

    from conftest import load_script
    txt2img = load_script("txt2img", "txt2img_api")
    args = txt2img.parse_args(["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT),
                               "--rng", "device", "--plms"])
    assert [f.name for f in fields(GenerationOptions) if not hasattr(args, f.name)] == ["sampler"]
    opts = txt2img.options_from_args(args)
    assert (opts.rng, opts.sampler) == ("device", "plms")
    from ldm.models.diffusion.ddim import TIMESTEP_SPACINGS  # the flag's choices (torch-free)
    spacing = next(a for a in txt2img.build_parser()._actions if a.dest == "timestep_spacing")
    assert tuple(spacing.choices) == TIMESTEP_SPACINGS


def test_numbers_that_overflow_are_an_error_not_black_images(pipe):
    """(Which stage overflows first is float32's and torch's kernels' business.)"""
    opts = GenerationOptions(**{**SMALL, "steps": 2, "scale": 1e30})
    with pytest.raises(ValueError, match=r"(sampling|decoding) produced NaN or infinite"):
        pipe.generate(["a fox"], opts, progress=False)


def nan_sampler(monkeypatch, sampler="ddim"):
    """The sampler returns latents with a NaN, whatever it is given."""
    import dataclasses

    from ldm.models.diffusion.samplers import SAMPLERS

    def run(denoiser, x, *args):
        return x.clone().index_fill_(0, torch.tensor([0]), float("nan"))
    monkeypatch.setitem(SAMPLERS, sampler, dataclasses.replace(SAMPLERS[sampler], run=run))


def test_non_finite_latents_or_pixels_are_named_by_stage(pipe, monkeypatch):
    from ldm import pipeline

    opts = GenerationOptions(**SMALL)
    with monkeypatch.context() as patched:
        nan_sampler(patched)
        with pytest.raises(ValueError, match="sampling produced NaN or infinite latents"):
            pipe.generate(["a fox"], opts, progress=False)
    monkeypatch.setattr(pipeline, "full_decode",
                        lambda vae, z, *a, **k: torch.full((1, 3, 64, 64), float("inf")))
    with pytest.raises(ValueError, match="decoding produced NaN or infinite pixels"):
        pipe.generate(["a fox"], opts, progress=False)


def test_a_prompt_cut_to_the_context_is_named_once(pipe, capsys):
    """open_clip (SD 2.x) cuts a prompt to 77 tokens without a word: say so, once a prompt."""
    long = "a detailed oil painting of " + "ripe red apples, " * 30 + "(api test)"
    pipe.model.get_conditioning([" ".join(["pear"] * 75)], (64, 64))  # 75 tokens: all fit
    assert "warning" not in capsys.readouterr().err
    pipe.model.get_conditioning([" ".join(["pear"] * 76)], (64, 64))  # the last one is cut
    assert capsys.readouterr().err.count("exceeds the text encoder's 77-token context") == 1
    pipe.model.get_conditioning(["a fox", long], (64, 64))
    pipe.model.get_conditioning([long], (64, 64))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: the text 'a detailed oil painting of ripe red appl...' "
                        "exceeds the text encoder's 77-token context; the rest is ignored"]


def test_a_size_beyond_memory_is_refused_before_sampling(pipe, monkeypatch):
    """One UNet feature map of the CFG batch that does not fit the free memory ends a run with
    one line, not with the kernel killing the process."""
    from ldm import pipeline

    one_map = 2 * 32 * 64 * 64 * 4  # the tiny UNet's (32 channels) first map, CFG, fp32
    free = pipeline.MIN_UNET_MAPS * one_map - 1
    monkeypatch.setattr(pipeline, "available_bytes", lambda device: free)
    with pytest.raises(ValueError, match=r"512x512 with 1 image\(s\) a batch does not fit: a "
                                         r"UNet call needs more than 8.0 MiB, and 8.0 MiB "
                                         r"are free on cpu"):
        pipe.generate(["a fox"], GenerationOptions(**{**SMALL, "H": 512, "W": 512}),
                      progress=False)
    pipe.check(["a fox"], GenerationOptions(**{**SMALL, "H": 512, "W": 512, "scale": 1.0}))
    # under autocast the maps are the CPU's bf16: half the bytes, so the CFG batch fits
    autocast = GenerationOptions(**{**SMALL, "H": 512, "W": 512, "precision": "autocast"})
    pipe.check(["a fox"], autocast)
    monkeypatch.setattr(pipeline, "available_bytes", lambda device: free // 2)
    with pytest.raises(ValueError, match="does not fit"):
        pipe.check(["a fox"], autocast)


def test_the_nan_message_blames_half_precision_only_under_autocast(pipe, monkeypatch):
    nan_sampler(monkeypatch)
    for precision, says_half in (("full", False), ("autocast", True)):
        opts = GenerationOptions(**{**SMALL, "precision": precision})
        with pytest.raises(ValueError, match="sampling produced NaN") as failed:
            pipe.generate(["a fox"], opts, progress=False)
        assert ("half precision overflowed" in str(failed.value)) == says_half


def test_a_repository_config_path_loads_from_any_folder(tmp_path, monkeypatch):
    """As --config: `configs/...` not found here is the repository's."""
    from ldm.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    pipe = Pipeline.load("configs/tiny/tiny-sd21.yaml", TINY_CKPT)
    assert pipe.model.family == "sd2"


def test_load_refuses_a_cuda_index_torch_does_not_see(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:2' was asked for, but torch sees 2 CUDA "
                                         r"device\(s\), cuda:0 to cuda:1"):
        Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cuda:2")


@pytest.mark.parametrize("device, current", [("cuda:1", ["cuda:1"]), ("cuda", []), ("cpu", [])])
def test_cuda_n_becomes_the_current_device(monkeypatch, device, current):
    """Streams, CUDA graphs and synchronize() follow the current device, not the tensors'."""
    from ldm.pipeline import make_current

    made = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made.append(str(d)))
    make_current(torch.device(device))
    assert made == current


def test_cuda_n_is_current_before_the_weights_are_read(monkeypatch):
    """The staged load's copy stream is made on the current device: cuda:N must be current
    before the checkpoint is read, not only once the model is built."""
    import ldm.checkpoint

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(f"current {d}"))

    def read(path):
        events.append("read")
        raise KeyboardInterrupt  # stop here: nothing else on a CPU machine can play CUDA
    monkeypatch.setattr(ldm.checkpoint, "load_state_dict", read)
    with pytest.raises(KeyboardInterrupt):
        Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cuda:1")
    assert events == ["current cuda:1", "read"]


def test_device_rng_asks_for_the_pipelines_device(pipe, monkeypatch):
    """On a CUDA pipeline rng 'device' seeds CUDA's generator (the seed's stream there), 'cpu'
    the CPU's. (Recorded: a CPU machine can't make a CUDA generator.)"""
    import copy

    asked, cpu_generator = [], torch.Generator

    def generator(device="cpu"):
        asked.append(torch.device(device).type)
        return cpu_generator()

    monkeypatch.setattr(torch, "Generator", generator)  # (ldm.pipeline's torch is this one)
    on_cuda = copy.copy(pipe)
    on_cuda.device = torch.device("cuda")
    for rng in ("device", "cpu"):
        on_cuda.noise_generator(GenerationOptions(**SMALL, seed=7, rng=rng))
    assert asked == ["cuda", "cpu"]


@pytest.mark.parametrize("tile_size", [None, "auto"], ids=["whole", "auto-tiled"])
def test_a_decode_uses_the_budget_it_is_given(pipe, monkeypatch, tile_size):
    """decode(budget=) and decode_tiles(budget=) plan from that figure, never from the free
    memory of the moment: txt2img resolves it once per batch and records the tiling from it."""
    import ldm.pipeline

    def no_lookup(device):
        raise AssertionError("the free memory was read although a budget was given")

    seen = []
    resolve, tiled, full = (ldm.pipeline.resolve_tile_size, ldm.pipeline.tiled_decode,
                            ldm.pipeline.full_decode)
    monkeypatch.setattr(ldm.pipeline, "default_budget", no_lookup)
    monkeypatch.setattr(ldm.pipeline, "resolve_tile_size",
                        lambda *a: seen.append(("tiles", a[-1])) or resolve(*a))
    monkeypatch.setattr(ldm.pipeline, "tiled_decode", lambda *a, budget_bytes, **k: seen.append(
        ("tiled", budget_bytes)) or tiled(*a, budget_bytes=budget_bytes, **k))
    monkeypatch.setattr(ldm.pipeline, "full_decode", lambda vae, z, budget, **k: seen.append(
        ("full", budget)) or full(vae, z, budget, **k))
    opts = pipe.options(H=64, W=64, tiled_decoding=tile_size is not None, tile_size=tile_size,
                        overlap=2)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    budget = 12345 * 2**10
    tiles = pipe.decode_tiles(z, opts, budget)
    pipe.decode(z, opts, progress=False, tiles=tiles, budget=budget)
    pipe.decode(z, opts, progress=False, budget=budget)  # its tiles resolved from the same
    kinds = ["tiles", "tiled", "tiles", "tiled"] if tile_size else ["full", "full"]
    assert seen == [(kind, budget) for kind in kinds]


def test_txt2img_resolves_the_budget_once_per_batch_for_tiles_and_decode(monkeypatch,
                                                                          tmp_path):
    """The free memory moves while a run goes on: each batch's tiling (recorded) and decode
    come from one reading of it."""
    from conftest import load_script

    cli = load_script("txt2img")
    readings, seen = iter([3 * 2**30, 2**30, 2**29]), []
    decode_tiles, decode = Pipeline.decode_tiles, Pipeline.decode
    monkeypatch.setattr(Pipeline, "decode_budget", lambda self, z, opts: next(readings))
    monkeypatch.setattr(Pipeline, "decode_tiles", lambda self, z, opts, budget=None: seen.append(
        ("tiles", budget)) or decode_tiles(self, z, opts, budget))
    monkeypatch.setattr(Pipeline, "decode", lambda self, z, opts, budget=None, **k: seen.append(
        ("decode", budget)) or decode(self, z, opts, budget=budget, **k))
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "64", "--W", "64",
            "--steps", "1", "--n_iter", "2", "--n_samples", "1", "--precision", "full",
            "--outdir", str(tmp_path), "--tiled_decoding", "--tile_size", "auto",
            "--overlap", "2"]
    assert cli.main(argv) == 0
    assert seen == [("tiles", 3 * 2**30), ("decode", 3 * 2**30), ("tiles", 2**30),
                    ("decode", 2**30)]


def test_a_wide_image_is_wide(pipe):
    """H is the height, W the width, in the latents, the decoded pixels and the PIL image."""
    result = pipe.generate(["x"], GenerationOptions(**{**SMALL, "H": 64, "W": 128}),
                           progress=False)
    assert result.latents.shape == (1, 4, 8, 16) and result.decoded.shape == (1, 3, 64, 128)
    assert result.images[0].size == (128, 64)


def test_pixels_beyond_the_range_are_clamped_not_wrapped():
    """A VAE decodes a little outside [-1, 1]; cast without a clamp, 1.02 would wrap to dark."""
    from ldm.pipeline import eight_bit
    decoded = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.02]).view(1, 1, 1, 5)
    assert eight_bit(decoded).flatten().tolist() == [0, 0, 127, 255, 255]


def test_a_negative_prompt_at_scale_1_is_warned_unused_once(pipe, capsys):
    opts = GenerationOptions(**SMALL, scale=1.0, negative_prompt="blurry")
    for _ in range(2):
        pipe.generate("a fox", opts, progress=False)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --negative_prompt is unused at --scale 1 (no unconditional branch runs)"]
    pipe.generate("a fox", GenerationOptions(**SMALL, negative_prompt="blurry"), progress=False)
    assert capsys.readouterr().err == ""
