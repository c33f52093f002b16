"""The CUDA path's fp16 weights and fast kernels, exercised on the CPU for every family: the
weight policy puts every module but the VAE in fp16, the run stays finite and close to the
fp32 run (CI has no GPU; scripts/gpu_check.py checks the same on a card)."""
import pytest
import torch

from conftest import REF, TINY_CKPT, TINY_CONFIG, rel_err
import ldm.precision as precision
from ldm.pipeline import GenerationOptions, Pipeline

MODELS = {
    "sd1": (REF / "tiny-sd1" / "tiny-sd15.yaml", REF / "tiny-sd1" / "tiny-sd15.ckpt"),
    "sd2": (TINY_CONFIG, TINY_CKPT),
    "sdxl": (REF / "tiny-sdxl" / "tiny-sdxl.yaml", REF / "tiny-sdxl" / "tiny-sdxl.safetensors"),
}


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """The CPU takes CUDA's policy: fp16 weights, native half norms, fp16 autocast."""
    monkeypatch.setitem(precision.HALF_WEIGHTS, "cpu", torch.float16)
    monkeypatch.setitem(precision.FAST_PATHS, "cpu", dict(precision.FAST_PATHS["cuda"]))
    monkeypatch.setattr(Pipeline, "_autocast",
                        lambda self, opts: torch.autocast("cpu", dtype=torch.float16))


def run(pipe, **kw):
    opts = GenerationOptions(H=64, W=128, steps=3, scale=5.0, seed=4, dilate=2, dilate_tau=2,
                             dilate_skip=1, **kw)
    return pipe.generate(["a lighthouse at dusk"], opts, progress=False)


@pytest.mark.parametrize("family", MODELS)
def test_half_weights_run_every_family_close_to_fp32(family, cpu_as_cuda):
    config, ckpt = MODELS[family]
    full = run(Pipeline.load(config, ckpt, precision="full"), precision="full")
    pipe = Pipeline.load(config, ckpt, precision="autocast")
    dtypes = {name: next(child.parameters()).dtype for name, child in pipe.model.named_children()}
    assert dtypes.pop("first_stage_model") == torch.float32
    assert set(dtypes.values()) == {torch.float16}
    half = run(pipe, precision="autocast", negative_prompt="blurry")
    assert torch.isfinite(half.decoded).all()
    reference = run(pipe, precision="autocast")
    assert rel_err(reference.latents, full.latents) < 1e-2  # measured ~2e-3 for each family
    assert not torch.allclose(half.latents, reference.latents)  # the negative prompt counts
