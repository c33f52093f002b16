"""How a loaded model is laid out for inference on its device: weight precision, memory format,
compilation. Family-blind: it knows the first stage (the VAE) and nothing else by name."""
import torch
from torch import nn

# Weight dtype under `--precision autocast`, per device type: on CUDA autocast computes in fp16
# anyway, so fp16 weights halve their memory and skip autocast's per-call weight casts. The CPU
# keeps fp32 weights (its numbers are the reference ones).
HALF_WEIGHTS = {"cuda": torch.float16}
# The VAE stays fp32 everywhere: the fp16 decoder overflows, and bf16 loses ~1e-2 (measured on
# the tiny model, docs/benchmarks.md; its random weights likely exaggerate that, a trained VAE
# was not measured); decoding is not where the time goes, and memory does not need bf16 either:
# the banded decode (scalecrafter/lean_decode.py) fits 4096² in fp32 within 16 GB.
VAE_DTYPE = torch.float32


def denoising_modules(model: nn.Module):
    """The model's children other than the first stage: the UNet wrapper and the conditioner(s)."""
    vae = getattr(model, "first_stage_model", None)
    return [child for child in model.children() if child is not vae]


def prepare_for_inference(model: nn.Module, device, precision: str = "autocast",
                          channels_last: bool = False, compile_unet: bool = False):
    """Lay the model out for `device`; returns it. Half weights under autocast where
    HALF_WEIGHTS says so; channels-last UNet memory format and torch.compile only when asked
    (each is kept where measured faster: scripts/benchmark.py --device cuda)."""
    device = torch.device(device)
    half = HALF_WEIGHTS.get(device.type) if precision == "autocast" else None
    if half is not None:
        for child in denoising_modules(model):
            child.to(half)
    if channels_last:
        unet_of(model).to(memory_format=torch.channels_last)
    if compile_unet:
        unet = unet_of(model)
        unet.forward = torch.compile(unet.forward, dynamic=False)
    return model


def unet_of(model: nn.Module) -> nn.Module:
    return model.unet if hasattr(model, "unet") else model
