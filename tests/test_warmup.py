"""The library warm-up that runs while a model loads: it runs in its own thread with the dtypes
the run computes in, hands over its error, and changes no number of the run."""
import threading

import pytest
import torch

from conftest import TINY_CKPT, TINY_CONFIG
from ldm import warmup
from ldm.pipeline import GenerationOptions, Pipeline


def _spy(monkeypatch):
    calls, real = [], warmup.touch_libraries

    def spy(device, dtypes, cudnn_attention=False):
        calls.append((threading.current_thread().name, torch.device(device).type, dtypes,
                      cudnn_attention))
        return real(device, dtypes, cudnn_attention)
    monkeypatch.setattr(warmup, "touch_libraries", spy)
    return calls


def test_a_warmed_load_samples_the_same_numbers(tiny_pipe, monkeypatch):
    """Forced on the CPU (CUDA's candidate): the warm-up runs in its thread with autocast's
    dtype and the VAE's float32, and the run's latents and image are bit for bit the same."""
    calls = _spy(monkeypatch)
    warmed = Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", precision="autocast",
                           warm_up=True, cudnn_attention=True)
    assert calls == [("warm-up-libraries", "cpu", (torch.bfloat16, torch.float32), True)]
    opts = GenerationOptions(H=128, W=128, steps=2, precision="full")
    ours = warmed.generate(["a corgi"], opts, progress=False)
    plain = tiny_pipe.generate(["a corgi"], opts, progress=False)
    assert torch.equal(ours.latents, plain.latents) and torch.equal(ours.decoded, plain.decoded)


def test_the_device_policy_decides_when_not_told(monkeypatch):
    calls = _spy(monkeypatch)
    assert warmup.WARM_UPS.get("cpu") is None  # the CPU has nothing worth warming
    Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu")
    assert calls == []
    monkeypatch.setitem(warmup.WARM_UPS, "cpu", True)
    Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu")
    assert calls == [("warm-up-libraries", "cpu", (torch.float32,), False)]
    Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", warm_up=False)
    assert len(calls) == 1


def test_a_failed_warm_up_fails_the_load_with_its_error(monkeypatch):
    def broken(device, dtypes, cudnn_attention=False):
        raise RuntimeError("CUDA error: no kernel image is available")
    monkeypatch.setattr(warmup, "touch_libraries", broken)
    with pytest.raises(RuntimeError, match="no kernel image"):
        Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", warm_up=True)
