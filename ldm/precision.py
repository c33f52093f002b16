"""How a loaded model is laid out for inference on its device: weight precision, memory format,
compilation. Family-blind: it knows the first stage (the VAE) and nothing else by name."""
import inspect
from contextlib import contextmanager

import torch
from torch import nn

from ldm.compat import CUDAGRAPH_UNSAFE

# The dtype `--precision autocast` computes in, per device type.
AUTOCAST_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}
# Weight dtype under `--precision autocast`, per device type: on CUDA autocast computes in fp16
# anyway, so fp16 weights halve their memory and skip autocast's per-call weight casts. The CPU
# keeps fp32 weights (its numbers are the reference ones).
HALF_WEIGHTS = {"cuda": torch.float16}
# The VAE stays fp32 everywhere: the fp16 decoder overflows, and bf16 loses ~1e-2 (measured on
# the tiny model, docs/benchmarks.md; its random weights likely exaggerate that, a trained VAE
# was not measured); decoding is not where the time goes, and memory does not need bf16 either:
# the banded decode (scalecrafter/lean_decode.py) fits 4096² in fp32 within 16 GB.
VAE_DTYPE = torch.float32
FIRST_STAGE = "first_stage_model"  # the VAE's child name in every family's model


def weight_dtype_policy(device, precision: str = "autocast"):
    """key -> dtype for every floating tensor of a checkpoint, so that weights are loaded
    straight into the dtype prepare_for_inference would give them (no fp32 copy on the host
    first): half for the children other than the first stage where HALF_WEIGHTS says so,
    float32 for the VAE and the model's own (root) buffers such as the schedule."""
    half = HALF_WEIGHTS.get(torch.device(device).type) if precision == "autocast" else None

    def dtype_of(key: str) -> torch.dtype:
        child, dot, _ = key.partition(".")
        if child == FIRST_STAGE:
            return VAE_DTYPE
        return half if dot and half is not None else torch.float32
    return dtype_of


def denoising_modules(model: nn.Module):
    """The model's children other than the first stage: the UNet wrapper and the conditioner(s)."""
    vae = getattr(model, FIRST_STAGE, None)
    return [child for child in model.children() if child is not vae]


# Kernel and layout choices per device type, taken where the caller leaves them open (None):
# - channels_last: the UNet in channels-last memory format (cuDNN's NHWC fp16 convolutions);
#   off: 1.02x of the contiguous time for a 1024² 50-step sample on an H200, interleaved with
#   the reference kernels (an earlier, non-interleaved run had 0.88x), and 0.94x together with
#   the other two against 0.92x for native norms alone;
# - cudnn_benchmark: cuDNN times its algorithms once per shape, during sampling only (it
#   repeats one shape): 0.98x on the H200;
# - native_norms: the UNet's GroupNorms and LayerNorms in the activations' half dtype (CUDA
#   accumulates in float32 anyway), not through a float32 copy: 0.92x on the H200;
# - cudnn_attention: scaled-dot-product attention tries cuDNN's fused kernel first while
#   sampling (some PyTorch releases try FlashAttention-2 first, cuDNN last): on an H200 the
#   1024² CFG call took 40.4 ms with it, 43.0 ms with FlashAttention only and 40.9 ms with
#   torch 2.11's own order (which already picked cuDNN's kernel there); fp16 error 1.1e-3.
# The CPU keeps the reference kernels (its numbers are the reference ones).
# scripts/benchmark.py --device cuda measures each against the reference kernels.
FAST_PATHS = {
    "cuda": {"channels_last": False, "cudnn_benchmark": True, "native_norms": True,
             "cudnn_attention": True},
}
REFERENCE_PATHS = {"channels_last": False, "cudnn_benchmark": False, "native_norms": False,
                   "cudnn_attention": False}
# The switches that act while sampling only (process-wide state, restored after it).
SAMPLING_SWITCHES = ("cudnn_benchmark", "cudnn_attention")
# How `--compile` compiles the UNet, per device type: the layout to compile (`channels_last`,
# read by fast_paths, so that the model and its recorded kernels agree and an explicit
# --no-channels_last wins) and compile_unet_in_place's other keywords (Inductor `options`,
# `cuda_graphs`, ...); a device type not listed gets the plain compile. Measured on H200s
# (docs/benchmarks.md, runs 4-7), 1024² CFG call, fp16 weights: the plain compile 28.1 ms a
# call, with channels-last conv weights 24.3 ms (cuDNN's NHWC kernels without conversions,
# the norms' copies fused away; run 7, one process), with CUDA graphs on top 23.6 ms. CUDA
# graphs stay off: their private memory pool keeps the UNet's intermediates from the decode
# (the decode budget leaves it out, so a decode gets fewer bytes rather than an out-of-memory
# error), and whether a 4096² run still fits a 24 GB card with it is unmeasured
# (`gpu_check.sh card24`): 0.7 ms a step is not worth that risk.
# `scripts/gpu_speed.py --parts weights` (or `host`, `layouts`) names the entry its rule
# would set here.
COMPILE_MODES = {"cuda": {"channels_last": True}}


def fast_paths(device, compile_unet: bool = False, **chosen):
    """The kernel/layout choices for `device`: FAST_PATHS' defaults (and, when the UNet is
    compiled, the layout its COMPILE_MODES entry asks for), overridden by every choice given as
    True or False (None leaves the default)."""
    kind = torch.device(device).type
    paths = dict(REFERENCE_PATHS, **FAST_PATHS.get(kind, {}))
    if compile_unet:
        paths.update({k: v for k, v in COMPILE_MODES.get(kind, {}).items() if k in paths})
    paths.update({k: v for k, v in chosen.items() if v is not None})
    unknown = set(paths) - set(REFERENCE_PATHS)
    if unknown:
        raise TypeError(f"unknown fast path(s): {', '.join(sorted(unknown))}")
    return paths


@contextmanager
def autotuned(enabled: bool):
    """cuDNN autotuning (process-wide) while the block runs, restored after it: meant around
    sampling, where one shape repeats; a tiled decode's many tile shapes would each pay for
    their own tuning."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def cudnn_first_order():
    """SDPA's backends with cuDNN's first, or None where this torch cannot set a priority order
    (before 2.6: no `set_priority`; before 2.4: no cuDNN backend), which leaves its own."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    except (ImportError, AttributeError):
        return None
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return None
    return order


@contextmanager
def attention_preferred(cudnn_first: bool):
    """While the block runs, SDPA tries cuDNN's fused attention first (where it cannot run,
    e.g. float32 or the CPU, the next backend in PyTorch's own order does); restored after.
    On a torch that cannot reorder its backends this is a no-op."""
    order = cudnn_first_order() if cudnn_first else None
    if order is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(order, set_priority=True):
        yield


@contextmanager
def sampling_kernels(cudnn_benchmark: bool = False, cudnn_attention: bool = False):
    """The kernel switches that act while sampling (see FAST_PATHS)."""
    with autotuned(cudnn_benchmark), attention_preferred(cudnn_attention):
        yield


def prepare_for_inference(model: nn.Module, device, precision: str = "autocast",
                          channels_last=None, compile_unet: bool = False,
                          native_norms=None):
    """Lay the model out for `device`; returns it. Half weights under autocast where
    HALF_WEIGHTS says so (a no-op when the loader gave them already); channels-last and native
    half norms as FAST_PATHS (and, compiling, COMPILE_MODES) say for the device unless given;
    torch.compile only when asked, as COMPILE_MODES says for the device. (cuDNN autotuning is
    no layout: the sampler turns it on, see `autotuned`.)"""
    from ldm.modules.normalization import set_native_norms

    device = torch.device(device)
    half = HALF_WEIGHTS.get(device.type) if precision == "autocast" else None
    if half is not None:
        for child in denoising_modules(model):
            child.to(half)
    paths = fast_paths(device, compile_unet, channels_last=channels_last,
                       native_norms=native_norms)
    if paths["channels_last"]:
        unet_of(model).to(memory_format=torch.channels_last)
    set_native_norms(unet_of(model), paths["native_norms"])
    if compile_unet:  # (the mode's layout is laid out above, or was refused by the caller)
        mode = COMPILE_MODES.get(device.type, {})
        compile_unet_in_place(unet_of(model), **{k: v for k, v in mode.items()
                                                 if k not in REFERENCE_PATHS})
    return model


def compile_unet_in_place(unet: nn.Module, backend="inductor", options=None,
                          cuda_graphs: bool = False, dynamic_batch: bool = True,
                          channels_last: bool = False):
    """torch.compile the UNet's forward, with the 3x3 convs a run re-dilates routed through
    re-dilation's planned-conv op (as its first step overrides them) so that one graph serves
    every re-dilation plan of the run, and the batch dimension dynamic so that the same graph
    serves noise-damped CFG's 3 rows and plain CFG's 2 (every other size stays static).
    `options`: Inductor's settings for this graph (e.g. {"freezing": True}). `cuda_graphs`:
    replay the compiled graph as a CUDA graph (Inductor's "reduce-overhead"), which removes
    the host's kernel launches; each call is then its own step and returns copies, since a
    replay reuses the previous call's output memory (multistep samplers such as PLMS keep
    earlier outputs). `dynamic_batch=False` keeps every size static: each new batch size
    compiles a graph of its own (noise-damped CFG's 3 rows one more); on an H200 it ran no
    faster (run 6: the convs still took NCHW inputs). The planned-conv op is tagged
    cudagraph-unsafe, so a re-dilated run's convs are never replayed with the plan they were
    captured with. `channels_last`: lay the conv weights out channels-last first, so that cuDNN
    answers every conv in NHWC and the graph's own kernels (norms included, unlike eager's)
    take that layout, rather than cuDNN converting each conv's input (3.2 ms of a 1024² call on
    an H200, run 6)."""
    from ldm.scalecrafter.redilation import route_when_overridden

    if cuda_graphs and CUDAGRAPH_UNSAFE is None:
        raise ValueError(f"CUDA graphs need torch >= 2.8 here (this is {torch.__version__}): a "
                         "graph would replay the re-dilation plan it was captured with")
    if getattr(unet.forward, "compiled_in_place", False):  # Dynamo cannot trace this wrapper
        raise ValueError("the UNet is compiled already: compile a fresh copy instead")
    route_when_overridden(unet)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if cuda_graphs:
        options = {**(options or {}), "triton.cudagraphs": True}
    # dynamic=False also keeps a static graph apart from a dynamic one in Dynamo's cache,
    # which another instance of the same class would otherwise reuse
    compiled = torch.compile(unet.forward, backend=backend, options=options,
                             dynamic=None if dynamic_batch else False)

    def forward(*args, **kwargs):
        for value in (*args, *kwargs.values()) if dynamic_batch else ():
            if isinstance(value, torch.Tensor) and value.dim():
                torch._dynamo.maybe_mark_dynamic(value, 0)
        if not cuda_graphs:
            return compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map(
            lambda v: v.clone() if isinstance(v, torch.Tensor) else v, compiled(*args, **kwargs))
    forward.compiled_in_place = True
    unet.forward = forward


def unet_of(model: nn.Module) -> nn.Module:
    return model.unet if hasattr(model, "unet") else model
