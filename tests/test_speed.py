"""Start-up and per-step speed work, checked on the CPU by exact properties: memory-mapped
checkpoints, weights loaded straight into their final dtype, the background checkpoint hash, the
seeding without lightning, and the UNet's native-half norm switch."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_CKPT, TINY_CONFIG, rel_err
from ldm import checkpoint, precision
from ldm.checkpoint import load_state_dict
from ldm.hashing import BackgroundShortHash, short_hash
from ldm.modules.normalization import GroupNorm32, LayerNorm32, set_native_norms
from ldm.util import build_model, load_config


def _record_mmap(monkeypatch):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mmap"))
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpoint.torch, "load", spy)
    return seen


@pytest.mark.parametrize("legacy", [False, True])
def test_zip_checkpoints_are_memory_mapped_legacy_ones_read(tmp_path, monkeypatch, legacy):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=not legacy)
    seen = _record_mmap(monkeypatch)
    loaded = load_state_dict(path)
    assert seen == [not legacy]
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


def _old_route(config, ckpt, half):
    """How weights were placed before: every tensor in float32, then the denoising children
    halved by prepare_for_inference."""
    model = build_model(config, "cpu", load_state_dict(ckpt))
    for child in precision.denoising_modules(model):
        child.to(half)
    return model.state_dict()


def test_weights_load_straight_into_the_dtypes_prepare_for_inference_gives(monkeypatch):
    """With a half dtype for the CPU (as CUDA gets fp16), the per-key policy gives every tensor
    the dtype and value of the old fp32-then-halve route; the VAE and the schedule stay fp32."""
    monkeypatch.setitem(precision.HALF_WEIGHTS, "cpu", torch.bfloat16)
    config = load_config(TINY_CONFIG)
    expected = _old_route(config, TINY_CKPT, torch.bfloat16)
    policy = precision.weight_dtype_policy("cpu", "autocast")
    got = build_model(config, "cpu", load_state_dict(TINY_CKPT), policy).state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    assert policy("first_stage_model.decoder.conv_in.weight") == torch.float32
    assert policy("alphas_cumprod") == torch.float32
    assert policy("model.diffusion_model.out.2.weight") == torch.bfloat16


def test_policy_is_float32_on_the_cpu_and_under_full_precision():
    for device, prec in (("cpu", "autocast"), ("cpu", "full"), ("cuda", "full")):
        policy = precision.weight_dtype_policy(device, prec)
        assert policy("model.diffusion_model.out.2.weight") == torch.float32
    assert precision.weight_dtype_policy("cuda", "autocast")("cond_stage_model.x") \
        == torch.float16


def test_background_hash_equals_short_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert BackgroundShortHash(path).result() == short_hash(path)
    with pytest.raises(FileNotFoundError):
        BackgroundShortHash(tmp_path / "missing").result()


def test_own_seed_everything_seeds_like_lightning(txt2img, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    assert txt2img.seed_everything(51) == 51
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    assert drawn == (random.Random(51).random(), np.random.RandomState(51).rand(),
                     torch.rand(1, generator=torch.Generator().manual_seed(51)).item())
    assert os.environ["PL_GLOBAL_SEED"] == "51" and os.environ["PL_SEED_WORKERS"] == "0"


def test_cli_no_longer_imports_lightning(txt2img):
    import inspect
    assert "lightning" not in inspect.getsource(txt2img.run)


def test_every_unet_norm_is_switchable(tiny_pipe):
    unet = tiny_pipe.model.unet
    groups = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    layers = [m for m in unet.modules() if isinstance(m, nn.LayerNorm)]
    assert groups and all(isinstance(m, GroupNorm32) for m in groups)
    assert layers and all(isinstance(m, LayerNorm32) for m in layers)
    assert set_native_norms(unet, False) == len(groups) + len(layers)


def _group_norm(gen):
    return GroupNorm32(4, 8, eps=1e-6), 3 + 5 * torch.randn(2, 8, 6, 5, generator=gen)


def _layer_norm(gen):
    return LayerNorm32(8), 3 + 5 * torch.randn(2, 7, 8, generator=gen)


@torch.no_grad()
@pytest.mark.parametrize("make", [_group_norm, _layer_norm])
def test_native_norms_are_exact_in_float32_and_close_in_half(make):
    gen = torch.Generator().manual_seed(0)
    norm, x = make(gen)
    norm.weight.copy_(torch.randn(8, generator=gen))
    norm.bias.copy_(torch.randn(8, generator=gen))
    reference = norm(x)
    norm.in_input_dtype = True
    assert torch.equal(norm(x), reference)  # fp32 inputs never take the native path
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), reference) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not promote it to fp32
        assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_native_norms_unet_call_close_under_autocast(tiny_pipe):
    unet = tiny_pipe.model.unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ctx = tiny_pipe.model.get_conditioning(["a fox", "a hen"], (128, 128))

    def call(native):
        set_native_norms(unet, native)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return tiny_pipe.model.apply_model(x, t, ctx).float()
    try:
        reference, native = call(False), call(True)
        with torch.no_grad():  # full precision: the switch changes nothing at all
            set_native_norms(unet, True)
            a = tiny_pipe.model.apply_model(x, t, ctx)
            set_native_norms(unet, False)
            b = tiny_pipe.model.apply_model(x, t, ctx)
    finally:
        set_native_norms(unet, False)
    assert torch.equal(a, b)
    assert rel_err(native, reference) < 3e-2


def test_fast_paths_per_device_and_overrides():
    assert precision.fast_paths("cpu") == precision.REFERENCE_PATHS
    cuda = precision.fast_paths("cuda")
    assert cuda == dict(precision.REFERENCE_PATHS, **precision.FAST_PATHS["cuda"])
    assert precision.fast_paths("cuda", channels_last=True)["channels_last"] is True
    assert precision.fast_paths("cpu", native_norms=True)["native_norms"] is True
    with pytest.raises(TypeError):
        precision.fast_paths("cpu", fused=True)


def test_compile_takes_the_devices_compile_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(precision, "compile_unet_in_place",
                        lambda unet, **how: seen.append((unet, how)))
    mode = {"options": {"freezing": True}, "cuda_graphs": True}
    monkeypatch.setitem(precision.COMPILE_MODES, "cpu", mode)
    unet = nn.Conv2d(4, 4, 3)
    precision.prepare_for_inference(unet, "cpu", "full", compile_unet=True)
    precision.prepare_for_inference(unet, "meta", "full", compile_unet=True)  # not listed
    precision.prepare_for_inference(unet, "cpu", "full")  # no --compile
    assert seen == [(unet, mode), (unet, {})]


def test_a_compile_mode_lays_out_the_unet_unless_the_layout_is_given(monkeypatch):
    """COMPILE_MODES' layout (CUDA: channels-last conv weights, run 7) applies when compiling,
    to the model and to the recorded kernels; an explicit --no-channels_last still wins, and
    without --compile the device's eager default stands."""
    from ldm.pipeline import Pipeline

    seen = []
    monkeypatch.setattr(precision, "compile_unet_in_place",
                        lambda unet, **how: seen.append(how))
    monkeypatch.setitem(precision.COMPILE_MODES, "cpu", {"channels_last": True,
                                                         "cuda_graphs": True})
    assert precision.COMPILE_MODES["cuda"] == {"channels_last": True}
    assert precision.fast_paths("cuda", compile_unet=True)["channels_last"] is True
    assert precision.fast_paths("cuda")["channels_last"] is False

    def laid_out(**layout):
        model = nn.Sequential(nn.Conv2d(4, 4, 3))  # (its own UNet: it has no `unet`)
        pipe = Pipeline.from_model(model, "cpu", "full", **layout)
        return (pipe.kernels["channels_last"],
                model[0].weight.is_contiguous(memory_format=torch.channels_last))

    assert laid_out(compile_unet=True) == (True, True)
    assert laid_out(compile_unet=True, channels_last=False) == (False, False)
    assert laid_out() == (False, False)
    assert seen == [{"cuda_graphs": True}] * 2  # the layout is applied before compiling


def test_cli_switches_default_to_the_device_policy(txt2img):
    args = txt2img.parse_args(["--ckpt", "x"])
    assert args.channels_last is None and args.fast_kernels is None and not args.timings
    args = txt2img.parse_args(["--ckpt", "x", "--no-channels_last", "--no-fast_kernels"])
    assert args.channels_last is False and args.fast_kernels is False


def test_cli_timings_line(txt2img, tmp_path, capsys):
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--H", "64", "--W", "64",
            "--steps", "1", "--n_iter", "1", "--n_samples", "1", "--precision", "full",
            "--outdir", str(tmp_path), "--timings"]
    assert txt2img.main(argv) == 0
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("timings")]
    assert len(line) == 1
    seconds = {k: float(v) for k, v in (p.split() for p in line[0].split(":", 1)[1].split(","))}
    assert list(seconds) == ["startup", "load", "sample", "decode", "write", "total"]
    # the process's age at the start and at the report (here: pytest's process), to the tick
    assert seconds["total"] >= sum(v for k, v in seconds.items() if k != "total") - 0.05


def test_the_pipeline_knows_every_kernel_switch_in_effect(tiny_pipe, monkeypatch):
    """What the images' metadata records: the device's defaults, with the flags over them."""
    from ldm.pipeline import Pipeline

    assert tiny_pipe.kernels == {"channels_last": False, "cudnn_benchmark": False,
                                 "native_norms": False, "cudnn_attention": False,
                                 "compile": False}
    monkeypatch.setitem(precision.FAST_PATHS, "cpu", {"cudnn_attention": True,
                                                      "native_norms": True})
    pipe = Pipeline.load(TINY_CONFIG, TINY_CKPT, channels_last=True, native_norms=False,
                         compile_unet=True)  # (compiles at its first call: never made here)
    assert pipe.kernels == {"channels_last": True, "cudnn_benchmark": False,
                            "native_norms": False, "cudnn_attention": False, "compile": True}
    assert pipe.sampling_kernels["cudnn_attention"]  # asked for, but cuDNN's: nothing on a CPU
    for loaded, native in ((pipe, False), (Pipeline.load(TINY_CONFIG, TINY_CKPT), True)):
        norms = [m for m in loaded.model.unet.modules()
                 if isinstance(m, (GroupNorm32, LayerNorm32))]
        assert norms and {m.in_input_dtype for m in norms} == {native}  # as recorded
        assert loaded.kernels["native_norms"] is native


def test_the_documented_device_defaults():
    """The tables README and docs/benchmarks.md describe: CUDA's fast paths as measured (run
    4), the CPU's reference kernels, and autocast's dtype per device."""
    assert precision.FAST_PATHS["cuda"] == {"channels_last": False, "cudnn_benchmark": True,
                                            "native_norms": True, "cudnn_attention": True}
    assert "cpu" not in precision.FAST_PATHS
    assert precision.AUTOCAST_DTYPES == {"cuda": torch.float16, "cpu": torch.bfloat16}
    assert precision.HALF_WEIGHTS == {"cuda": torch.float16}


def test_cudnn_autotuning_only_while_sampling(tiny_pipe, monkeypatch):
    assert tiny_pipe.sampling_kernels == {"cudnn_benchmark": False, "cudnn_attention": False}
    before = torch.backends.cudnn.benchmark
    with precision.autotuned(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    seen = []
    from dataclasses import replace

    from ldm.models.diffusion.samplers import SAMPLERS
    real = SAMPLERS["ddim"]
    monkeypatch.setitem(SAMPLERS, "ddim", replace(real, run=lambda *a, **k: (
        seen.append(torch.backends.cudnn.benchmark), real.run(*a, **k))[1]))
    monkeypatch.setitem(tiny_pipe.sampling_kernels, "cudnn_benchmark", True)
    from ldm.pipeline import GenerationOptions
    tiny_pipe.sample(["x"], GenerationOptions(H=64, W=64, steps=1, precision="full"),
                     torch.Generator().manual_seed(0), progress=False)
    assert seen == [True] and torch.backends.cudnn.benchmark is before


def test_cudnn_attention_first_only_inside_the_block():
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    q, k, v = torch.randn(3, 2, 4, 50, 16).unbind(0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with precision.sampling_kernels(cudnn_attention=True):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        # where cuDNN cannot run (here: the CPU) the next backend does, with the same numbers
        assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, k, v), plain)
    assert torch._C._get_sdp_priority_order() == before
    with precision.sampling_kernels(cudnn_attention=False):
        assert torch._C._get_sdp_priority_order() == before


def test_cudnn_attention_first_is_a_no_op_where_torch_cannot_reorder(monkeypatch):
    """Before torch 2.6 `sdpa_kernel` has no priority order: the switch (on by default with
    CUDA) must then leave PyTorch's own order rather than fail."""
    import torch.nn.attention as attention

    def old_sdpa_kernel(backends):  # torch 2.3-2.5's signature
        raise AssertionError("must not be called")

    monkeypatch.setattr(attention, "sdpa_kernel", old_sdpa_kernel)
    assert precision.cudnn_first_order() is None
    before = torch._C._get_sdp_priority_order()
    with precision.sampling_kernels(cudnn_attention=True):
        assert torch._C._get_sdp_priority_order() == before


def test_process_seconds_is_this_process_age(txt2img):
    import time

    before = txt2img.process_seconds()
    time.sleep(0.05)
    after = txt2img.process_seconds()
    assert 0 < before < after and after - before < 1


def _check_allocator_settings(value):
    """torch's own parser of PYTORCH_CUDA_ALLOC_CONF (it runs without a GPU)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        torch.cuda.memory._set_allocator_settings
    setter(value)


def test_fast_pinned_allocator_conf_is_valid_and_keeps_the_users_settings():
    from ldm.scalecrafter.memory import fast_pinned_allocator_conf as conf

    try:
        for cpus, threads in ((1, 1), (2, 2), (6, 4), (16, 16), (96, 16)):
            name, value = conf({}, torch.__version__, cpus)
            assert (name, value) == ("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:"
                                     f"True,pinned_num_register_threads:{threads}")
            _check_allocator_settings(value)  # a power of two, known keys
        # the user's own settings stay, under the variable they used
        name, value = conf({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, "2.11.0", 8)
        assert name == "PYTORCH_ALLOC_CONF"
        assert value.startswith("expandable_segments:True,pinned_use_cuda_host_register:True")
        _check_allocator_settings(value)
    finally:
        _check_allocator_settings("pinned_use_cuda_host_register:False,"
                                  "pinned_num_register_threads:1")
    assert conf({"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:4"}, "2.11", 8) is None
    # torch 2.9 reads the old name only where the new one is unset; older ones only the old one
    both = {"PYTORCH_ALLOC_CONF": "expandable_segments:True",
            "PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:4"}
    assert conf(both, "2.9.0", 8)[0] == "PYTORCH_ALLOC_CONF"
    assert conf(both, "2.8.0", 8) is None
    assert conf({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, "2.8.0", 8)[0] == (
        "PYTORCH_CUDA_ALLOC_CONF")
    assert conf({}, "2.1.2+cu121", 8) is None  # before the option existed: torch would refuse it


def test_the_cli_asks_for_threaded_pinned_memory_on_cuda(txt2img, monkeypatch):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    txt2img.use_fast_pinned_memory()
    assert "pinned_use_cuda_host_register:True" in os.environ["PYTORCH_CUDA_ALLOC_CONF"]
