"""Where the GPU time goes: the diagnosis behind issue 11's two missed targets (the plain 1024²
50-step sample, the seed's CLI command) and the cold 4096² decode.

Each part runs in its own process (so each is cold where it should be) under its own timeout:

- `profile`: one 1024² CFG call of the full-size SD 2.1 UNet (fp16 weights, the device's
  default kernels): wall per call, FLOPs and the TFLOP/s they make, GPU kernel time by kind
  (attention, conv, GEMM, norm, elementwise, copy) and the top kernels, then the same call
  with each candidate switch (cuDNN attention first, FlashAttention only, channels-last),
  interleaved.
- `cli`: a fresh process loading a random full-size SD 2.1 `.ckpt` as txt2img does, with every
  step of the load timed apart (imports, CUDA start, meta build, file read, weights to the
  device), then the first sampling steps cold and warm, with and without cuDNN autotuning and
  cuDNN attention; then `Pipeline.load` from a fresh interpreter, staged and sequential.
- `cold_decode`, `cold_decode_hostalloc`, `cold_decode_stored`, `cold_decode_stored_hostreg`:
  the 4096² tiled SyncGN decode (`--tile_size auto`, 10 GB budget) cold, then warm, with the
  host-side ops that take the cold call's time and the pinned memory it made: as txt2img runs
  it (layers beyond the budget recompute; pinned memory registered on threads), the same with
  torch's default pinned allocations (one cudaHostAlloc each), storing every layer's tiles
  (default pinned allocations), and storing them with pinned memory registered on threads.
- `compile`: `--compile` as txt2img does it (the default mode): a plain run's graph, and a
  re-dilated run's, whose re-dilated 3x3 convs are routed through the planned-conv op so that
  one graph serves every plan: compile times, then plain and re-dilated calls interleaved with
  an uncompiled copy, and how far their outputs are from eager's; the compiled plain call's
  GPU kernels by kind.
- `compile_frozen`, `compile_cudagraphs`: the plain run's graph compiled with Inductor's
  freezing (weights as constants), or replayed as CUDA graphs, against an uncompiled copy.
- `compile_layouts`: in one process, beside one uncompiled copy, the plain graph as
  `--compile` builds it, frozen with Inductor's layout optimization forced (channels-last
  convs), and that replayed as CUDA graphs.
- `eager_layouts`: the eager call as it runs (NCHW up to the first SpatialTransformer, whose
  output is a channels-last view that the convs after it answer in), NCHW throughout, and with
  channels-last conv weights, interleaved, each with its GPU kernels and how many of its
  conv inputs are channels-last.
- `compile_weights`: in one process, beside one uncompiled copy, the plain graph as
  `--compile` builds it, with its conv weights channels-last (no freezing), and that replayed
  as CUDA graphs, each with its GPU busy time.
- `compile_host`: in one process, beside one uncompiled copy, the plain graph as `--compile`
  builds it (batch size dynamic), with every size static (run 6: its convs still took NCHW
  inputs), that replayed as CUDA graphs, the dynamic one replayed as CUDA graphs, and with
  Inductor's C++ wrapper (kernels launched from C++ rather than Python);
  each variant's GPU busy time beside its wall time. Variants that no longer fit the part's
  time are skipped, so that the ones compiled are still timed.
- `compile_autotune`: in one process, beside one uncompiled copy, run 6's fastest call (static
  sizes, CUDA graphs), then the same with Inductor's coordinate-descent tuning of its own
  kernels, and with max-autotune (GEMM and conv templates tuned; minutes of compiling).

    python scripts/gpu_speed.py --json speed.json            # the `speed` set, at most 505 s
    python scripts/gpu_speed.py --parts stored --json stored.json   # at most 195 s
    python scripts/gpu_speed.py --parts verify --json verify.json   # at most 310 s
    python scripts/gpu_speed.py --parts graphs --json graphs.json   # at most 200 s
    python scripts/gpu_speed.py --parts layouts --json layouts.json # at most 450 s
    python scripts/gpu_speed.py --parts host --json host.json       # at most 500 s
    python scripts/gpu_speed.py --parts eager --json eager.json     # at most 90 s
    python scripts/gpu_speed.py --parts weights --json weights.json # at most 360 s
    python scripts/gpu_speed.py --parts autotune --json autotune.json   # at most 500 s
    python scripts/gpu_speed.py --parts profile,cli --json s.json
    python scripts/gpu_speed.py --tiny --device cpu --parts speed,stored   # CPU smoke run
    python scripts/gpu_speed.py --summarize speed.json stored.json   # saved runs' report

Prints a markdown summary; the JSON is rewritten after each part. Weights are random: their
values change neither time nor memory."""
import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import benchmark_gpu as bg  # noqa: E402  (scripts/ is not a package)
from benchmark import Meter  # noqa: E402

COLD_DECODES = ("cold_decode", "cold_decode_hostalloc", "cold_decode_stored",
                "cold_decode_stored_hostreg")
# Parts that compile the plain graph in other ways: {part: {label: compile_unet_in_place
# keywords}}. `compile_layouts` (after run 4): the compiled call's GPU time had 3.2 ms of cuDNN
# converting NCHW inputs, and its wall time 5 ms of host gaps (30.0 ms a call, 24.9 busy).
NHWC = {"freezing": True, "force_layout_optimization": True}
STATIC_GRAPHS = {"dynamic_batch": False, "cuda_graphs": True}  # run 6's fastest call
COMPILE_VARIANTS = {
    "compile_frozen": {"compiled_frozen": {"options": {"freezing": True}}},
    "compile_cudagraphs": {"compiled_cudagraphs": {"cuda_graphs": True}},
    "compile_layouts": {"compiled": {}, "compiled_nhwc": {"options": NHWC},
                        "compiled_nhwc_cudagraphs": {"options": NHWC, "cuda_graphs": True}},
    # after run 5: the compiled call still spends 6.3 ms a call beyond its 22.6 ms of GPU
    # time, and CUDA graphs came out at 0.67-0.70x of eager against the plain compile's
    # 0.62-0.63x (runs 3-5). Static sizes were to suit both layouts and CUDA graphs;
    # launching from C++ is the other way to cut host time. In order of interest: the last
    # ones are skipped first when compiling runs long.
    "compile_host": {"compiled": {},
                     "compiled_static": {"dynamic_batch": False},
                     "compiled_static_cudagraphs": {"dynamic_batch": False, "cuda_graphs": True},
                     "compiled_cudagraphs": {"cuda_graphs": True},
                     "compiled_cpp_wrapper": {"options": {"cpp_wrapper": True}}},
    # after run 6: every variant spent 3.2 ms of its 24.9 ms of GPU time in cuDNN converting
    # NCHW inputs. Eager channels-last weights removed those (conv 8.8 -> 5.2 ms) but eager's
    # NCHW-only GroupNorms then copied (2.6 -> 5.3 ms); a graph's own norms take any layout.
    # With CUDA graphs' 2.3 ms of host time on top (run 6) that would make the 1.3 s target;
    # that pair is last, so a long compile skips it first.
    "compile_weights": {"compiled": {}, "compiled_cl_weights": {"channels_last": True},
                        "compiled_cl_weights_cudagraphs": {"channels_last": True,
                                                           "cuda_graphs": True}},
    # after run 6: the best call (static sizes, CUDA graphs: 27.2 ms) is 1.2 ms a step short
    # of the 1.3 s target. Inductor's own tuning is the lever left: coordinate-descent tuning
    # of its generated kernels (cheap), then max-autotune's GEMM/conv templates (minutes of
    # compiling, so last: skipped first when the part runs long).
    "compile_autotune": {"compiled_static_cudagraphs": STATIC_GRAPHS,
                         "compiled_static_cudagraphs_cdt": {
                             **STATIC_GRAPHS, "options": {"coordinate_descent_tuning": True}},
                         "compiled_static_cudagraphs_autotune": {
                             **STATIC_GRAPHS, "options": {"max_autotune": True}}},
}
# Pairs judged within one compile-variant part: {part: {switch: (on label, off label)}}.
COMPILE_PAIRS = {
    "compile_layouts": {"compile_nhwc": ("compiled_nhwc", "compiled"),
                        "cuda_graphs": ("compiled_nhwc_cudagraphs", "compiled_nhwc")},
    "compile_host": {"static_batch": ("compiled_static", "compiled"),
                     "cuda_graphs_static": ("compiled_static_cudagraphs", "compiled_static"),
                     "cuda_graphs_dynamic": ("compiled_cudagraphs", "compiled"),
                     "cpp_wrapper": ("compiled_cpp_wrapper", "compiled")},
    "compile_weights": {"cl_weights": ("compiled_cl_weights", "compiled"),
                        "cuda_graphs_cl_weights": ("compiled_cl_weights_cudagraphs",
                                                   "compiled_cl_weights")},
    "compile_autotune": {"coordinate_descent": ("compiled_static_cudagraphs_cdt",
                                                "compiled_static_cudagraphs"),
                         "max_autotune": ("compiled_static_cudagraphs_autotune",
                                          "compiled_static_cudagraphs")},
}
VARIANT_TEXT = {"compiled_frozen": "with freezing", "compiled_cudagraphs": "with CUDA graphs",
                "compiled": "as --compile", "compiled_nhwc": "frozen, channels-last",
                "compiled_nhwc_cudagraphs": "frozen, channels-last, CUDA graphs",
                "compiled_cpp_wrapper": "with the C++ wrapper",
                "compiled_static": "with static sizes",
                "compiled_static_cudagraphs": "with static sizes, CUDA graphs",
                "compiled_static_cudagraphs_cdt": "with static sizes, CUDA graphs, "
                                                  "coordinate-descent tuning",
                "compiled_static_cudagraphs_autotune": "with static sizes, CUDA graphs, "
                                                       "max-autotune",
                "compiled_cl_weights": "with channels-last weights",
                "compiled_cl_weights_cudagraphs": "with channels-last weights, CUDA graphs"}
PARTS = ("profile", "eager_layouts", "cli", *COLD_DECODES, "compile",
         *COMPILE_VARIANTS)
# The part sets gpu_check.sh runs, one device command each: each set's timeouts add up to at
# most gpu_check.sh's 530 s, which leaves a 600 s command room for installing wheels and
# starting up. `speed` first: the sampling and CLI targets, and the decode as txt2img runs it.
PART_SETS = {"speed": ("profile", "cli", "cold_decode", "compile"),
             "stored": ("cold_decode_hostalloc", "cold_decode_stored",
                        "cold_decode_stored_hostreg"),
             # after run 3: the decode with and without threaded pinning, and freezing
             "verify": ("cold_decode", "cold_decode_hostalloc", "compile_frozen"),
             # after run 4: the compiled call's host gaps (30.0 ms a call, 24.9 ms GPU busy)
             "graphs": ("compile_cudagraphs",),
             # after run 4, in one process: channels-last convs, then CUDA graphs on top
             "layouts": ("compile_layouts",),
             # after run 5: the compiled call's host time (static sizes, CUDA graphs, C++)
             "host": ("compile_host",),
             # after run 6: the eager call's mixed layouts; the compiled call's conversions
             "eager": ("eager_layouts",),
             "weights": ("compile_weights",),
             # after run 6: Inductor's kernel tuning on the fastest call
             "autotune": ("compile_autotune",)}
# seconds per part
TIMEOUTS = {"profile": 60, "eager_layouts": 90, "cli": 140, "cold_decode": 65,
            "cold_decode_hostalloc": 65, "cold_decode_stored": 65, "cold_decode_stored_hostreg": 65,
            "compile": 240, "compile_frozen": 180, "compile_cudagraphs": 200,
            "compile_layouts": 450, "compile_host": 500, "compile_weights": 360,
            "compile_autotune": 500}
# The cold 4096² decode under a 10 GB budget: as txt2img runs it (layers recompute rather than
# store tiles beyond the budget; pinned memory registered on threads), and against it with
# torch's default pinned allocations, storing every layer's tiles (the decode the H200 took
# 33-37 s for, cold), and storing them with threaded registration.
PART_PARAMS = {"cold_decode_stored": {"recompute": False},
               "cold_decode_stored_hostreg": {"recompute": False},
               # a compile-variant part stops compiling 80 s before its timeout: building the
               # model before and the timed and profiled calls after fit in that
               **{name: {"variants": v, "compile_budget_s": TIMEOUTS[name] - 80}
                  for name, v in COMPILE_VARIANTS.items()}}
DEFAULT_PINNED = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"}


def _threaded_pinned():
    """The allocator setting txt2img makes on CUDA (nothing where torch has no such option)."""
    import importlib.metadata
    import os

    from ldm.scalecrafter.memory import fast_pinned_allocator_conf
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return {}
    conf = fast_pinned_allocator_conf({}, version, os.cpu_count() or 1)
    return dict([conf]) if conf else {}


PART_ENV = {"cold_decode": _threaded_pinned, "cold_decode_hostalloc": lambda: DEFAULT_PINNED,
            "cold_decode_stored": lambda: DEFAULT_PINNED,
            "cold_decode_stored_hostreg": _threaded_pinned}
DECODE_BUDGET_GB = 10.0  # a 24 GB card's share beside fp16 weights, as benchmark.py uses
# GPU kernels by kind, from their names (first match wins). Inductor's generated kernels
# (a compiled call) are one kind of their own: their names list every op they fuse.
KERNEL_KINDS = (
    ("triton", r"^triton_"),
    ("attention", r"flash|fmha|attention|sdpa|mha"),
    ("norm", r"norm|moments"),
    ("conv", r"conv|fprop|implicit|winograd|dgrad|nchw|nhwc"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|xmma"),
    ("copy", r"copy|transpose|permute|cat|pad"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|gelu|silu|upsample"),
)


def log(message):
    print(f"[gpu_speed] {message}", file=sys.stderr, flush=True)


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def _wall(fn, device):
    return Meter(device).timed(fn)[0]


def _interleaved(calls, device, rounds):
    """Median seconds of each named call, run round by round so drift hits all alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(_wall(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _unet_call(p, device):
    """(call, unet): one CFG UNet call (batch 2) at latent side p['side'], fp16 under autocast
    on CUDA (bf16 on the CPU), with the device's default kernels and layout."""
    import torch

    from ldm.precision import fast_paths, sampling_kernels

    config = bg.TINY_CONFIG if p.get("tiny") else bg.FULL_CONFIG
    unet, _, ctx_dim = bg._unet_and_schedule(device, {}, config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, p["side"], p["side"], generator=gen).to(device)
    t = torch.full((2,), 981, device=device)
    context = torch.randn(2, 77, ctx_dim, generator=gen).to(device)
    paths = fast_paths(device)

    def call(cudnn_attention=None, net=None):
        attention = paths["cudnn_attention"] if cudnn_attention is None else cudnn_attention
        with torch.no_grad(), torch.autocast(device.type, dtype=bg._half(device)), \
                sampling_kernels(paths["cudnn_benchmark"], attention):
            return (unet if net is None else net)(x, t, context=context)
    return call, unet


def _kernel_table(prof, calls):
    """GPU kernel milliseconds per call, by kind and the top 12 by name."""
    from torch.autograd import DeviceType

    by_kind, by_name = {}, {}
    for evt in prof.key_averages():
        if evt.device_type != DeviceType.CUDA:
            continue
        ms = getattr(evt, "self_device_time_total", None)
        ms = (evt.self_cuda_time_total if ms is None else ms) / 1e3 / calls
        by_kind[kind_of(evt.key)] = by_kind.get(kind_of(evt.key), 0.0) + ms
        by_name[evt.key[:100]] = by_name.get(evt.key[:100], 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}, \
        [[name, round(ms, 3)] for name, ms in top]


def _flops(call):
    """(total FLOPs of one call, FLOPs by kernel kind) from PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    by_kind = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        # batched matmuls only come from attention run the composite way (Linear is addmm/mm)
        name = str(op)
        kind = ("attention" if "attention" in name or "bmm" in name
                else "conv" if "conv" in name else "gemm")
        by_kind[kind] = by_kind.get(kind, 0) + flops
    return counter.get_total_flops(), by_kind


def kind_tflops(flops_by_kind, kernel_ms):
    """TFLOP/s each kind of kernel reaches: its FLOPs over its GPU time."""
    return {kind: round(flops / (kernel_ms[kind] / 1e3) / 1e12, 1)
            for kind, flops in flops_by_kind.items() if kernel_ms.get(kind)}


def part_profile(p, device):
    import torch

    call, unet = _unet_call(p, device)
    for _ in range(3):
        call()
    flops, flops_by_kind = _flops(call)
    result = {"side": p["side"], "flops_per_call": flops, "flops_by_kind": flops_by_kind}
    walls = [_wall(call, device) for _ in range(5)]
    result["seconds_per_call"] = statistics.median(walls)
    result["tflops"] = result["flops_per_call"] / result["seconds_per_call"] / 1e12
    if device.type == "cuda":
        for attention in (False, True):
            tag = "cudnn_attention" if attention else "default"
            kernels = _kernels_of(lambda: call(attention), device, tag)
            result.update(kernels)
            result[f"tflops_by_kind_{tag}"] = kind_tflops(flops_by_kind,
                                                          kernels[f"kernel_ms_{tag}"])
    result["variants_seconds"] = _interleaved(
        {"default": call, "cudnn_attention": lambda: call(True),
         "flash_only": lambda: _flash_only(call)}, device, p.get("rounds", 5))
    unet.to(memory_format=torch.channels_last)
    for _ in range(2):
        call()
    result["variants_seconds"]["channels_last"] = statistics.median(
        [_wall(call, device) for _ in range(p.get("rounds", 5))])
    result["peak_gb"] = (torch.cuda.max_memory_allocated(device) / bg.GB
                         if device.type == "cuda" else None)
    return result


def _flash_only(call):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # MATH: where flash cannot run
    with sdpa_kernel(backends):
        return call(False)


# after run 6: a SpatialTransformer returns a channels-last view (its tokens are (b, h*w, c)),
# which the convs after it answer in, so the eager call runs NCHW up to the first transformer
# and mixed after it (on CUDA the GroupNorms hand back NCHW: 19 of 66 conv inputs stay
# channels-last). Its layouts: as it runs, NCHW throughout (each transformer's output made
# contiguous), and channels-last conv weights (the `channels_last` switch).
EAGER_LAYOUTS = ("as_run", "nchw", "channels_last")


def _eager_layout_nets(unet):
    """{layout: a copy of `unet` laid out that way} (the first is `unet` itself)."""
    import copy

    import torch

    from ldm.modules.attention import SpatialTransformer

    nchw, channels_last = copy.deepcopy(unet), copy.deepcopy(unet)
    for module in nchw.modules():
        if isinstance(module, SpatialTransformer):
            module.register_forward_hook(lambda _module, _args, out: out.contiguous())
    return {"as_run": unet, "nchw": nchw,
            "channels_last": channels_last.to(memory_format=torch.channels_last)}


def _conv_inputs_channels_last(call, net):
    """How many of one call's conv inputs are (non-trivially) channels-last, and how many convs."""
    import torch

    seen = []

    def note(_module, args):
        x = args[0]
        seen.append(not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
    hooks = [m.register_forward_pre_hook(note) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]
    try:
        call(net=net)
    finally:
        for hook in hooks:
            hook.remove()
    return {"channels_last": sum(seen), "convs": len(seen)}


def part_eager_layouts(p, device):
    """The eager CFG call in each of EAGER_LAYOUTS, interleaved in one process: ms per call,
    how many conv inputs are channels-last, the output's difference from the call as it runs,
    and (CUDA) the GPU kernels of each."""
    call, unet = _unet_call(p, device)
    nets = _eager_layout_nets(unet)
    result = {"conv_inputs": {name: _conv_inputs_channels_last(call, net)
                              for name, net in nets.items()}}
    calls = {name: (lambda net=net: call(net=net)) for name, net in nets.items()}
    as_run = calls["as_run"]().float()
    result["rel_err_vs_as_run"] = {name: _rel_err(fn().float(), as_run)
                                   for name, fn in calls.items() if name != "as_run"}
    for fn in calls.values():  # cuDNN's autotuning of each layout's shapes (after one call)
        fn()
    result["seconds"] = _interleaved(calls, device, p.get("rounds", 5))
    report_so_far(result)
    for name, fn in calls.items() if device.type == "cuda" else ():
        result.update(_kernels_of(fn, device, name))
    return result


def report_so_far(result):
    """A part's results so far, as the line `run_part` keeps if the part meets its timeout."""
    print(json.dumps(result), flush=True)


def part_compile(p, device):
    """`--compile` as txt2img does it: a plain run compiles the plain UNet; a re-dilated run
    routes the convs it overrides through the planned-conv op in its first step, so one graph
    serves every plan of the run. Compile times, then calls interleaved with an uncompiled
    copy: plain (the plain run's graph), and a re-dilated run's plain and re-dilated steps
    (its routed graph)."""
    import copy

    from ldm.precision import compile_unet_in_place
    from ldm.scalecrafter.redilation import ConvOverride, overridden_convs, uniform_dilation_map

    call, unet = _unet_call(p, device)
    eager_unet, routed_unet = copy.deepcopy(unet), copy.deepcopy(unet)
    dilated = {k: ConvOverride(2) for k in uniform_dilation_map(unet, 2, 1)}

    def redilated(net):
        with overridden_convs(net, dilated):
            return call(net=net)

    for net in (unet, routed_unet):
        compile_unet_in_place(net, backend=p.get("backend", "inductor"))
    result = _compiled_by_first_call(call, lambda: call(net=eager_unet), device)
    out, result["routed_compile_seconds"] = _first_call(lambda: redilated(routed_unet), device)
    result["redilated_rel_err_vs_eager"] = _rel_err(out, redilated(eager_unet).float())
    # the routed graph's plain steps: no new compile
    _, result["first_routed_plain_call_seconds"] = _first_call(
        lambda: call(net=routed_unet), device)
    report_so_far(result)
    result["seconds"] = _interleaved({
        "eager": lambda: call(net=eager_unet), "compiled": call,
        "compiled_routed": lambda: call(net=routed_unet),
        "eager_redilated": lambda: redilated(eager_unet),
        "compiled_redilated": lambda: redilated(routed_unet),
    }, device, p.get("rounds", 5))
    if device.type == "cuda":  # what is left of the compiled plain call: kernels, or the host?
        result.update(_kernels_of(call, device, "compiled"))
    return result


def part_compile_variant(p, device):
    """The plain run's graph compiled with each of `p["variants"]` ({label:
    `compile_unet_in_place` keywords}): compile times, then ms per call interleaved with an
    uncompiled copy, and the GPU kernels of the fastest. Inductor's freezing makes the weights
    constants of the graph (pre-laid-out conv weights, fused epilogues); forcing its layout
    optimization runs the convs channels-last (without it, cuDNN converts every input, static
    sizes or not); CUDA graphs replay the call without the host's launches."""
    import copy

    from torch._dynamo.utils import counters

    from ldm.precision import compile_unet_in_place

    call, unet = _unet_call(p, device)
    eager_unet = copy.deepcopy(unet)
    calls, result = {"eager": lambda: call(net=eager_unet)}, {"variants": {}}
    start, longest = time.perf_counter(), 0.0
    for i, (label, keywords) in enumerate(p["variants"].items()):
        left = p.get("compile_budget_s", float("inf")) - (time.perf_counter() - start)
        if left < longest:  # the timings need every compiled variant: leave them the time
            result.setdefault("skipped", {})[label] = (
                f"{left:.0f} s of the compile budget left, the longest compile took "
                f"{longest:.0f} s")
            continue
        net = unet if i == len(p["variants"]) - 1 else copy.deepcopy(unet)
        calls[label] = lambda net=net: call(net=net)
        began, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
        try:  # one variant failing to compile leaves the others' figures
            compile_unet_in_place(net, backend=p.get("backend", "inductor"), **keywords)
            result["variants"][label] = _compiled_by_first_call(calls[label], calls["eager"],
                                                                device)
            # Dynamo hands an instance of the same class a graph compiled for equal settings
            result["variants"][label]["graphs"] = counters["stats"]["unique_graphs"] - graphs
        except Exception as err:
            result.setdefault("errors", {})[label] = _one_line(err)
            del calls[label]
        longest = max(longest, time.perf_counter() - began)
        report_so_far(result)
    result["seconds"] = _interleaved(calls, device, p.get("rounds", 5))
    if device.type == "cuda" and result["variants"]:
        fastest = min(result["variants"], key=result["seconds"].get)
        result.update(_kernels_of(calls[fastest], device, "compiled"), profiled=fastest)
        # wall minus busy is host time (launches, gaps): what CUDA graphs or C++ launches cut
        result["gpu_busy_ms"] = {fastest: result["gpu_busy_ms_compiled"]}
        for label in set(result["variants"]) - {fastest}:
            try:  # the profiler may not see into a replayed graph: keep the timings anyway
                result["gpu_busy_ms"][label] = _kernels_of(calls[label], device,
                                                           "")["gpu_busy_ms_"]
            except Exception as err:
                result.setdefault("profile_errors", {})[label] = _one_line(err)
    return result


def _one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _compiled_by_first_call(call, eager_call, device):
    """Compile a compiled `call` by calling it once: {compile_seconds, rel_err_vs_eager},
    also reported at once (the part may meet its timeout later)."""
    plain, result = eager_call().float(), {}
    out, result["compile_seconds"] = _first_call(call, device)
    result["rel_err_vs_eager"] = _rel_err(out, plain)
    report_so_far(result)
    return result


def _first_call(fn, device):
    """(fn's output in float32, seconds of the call): a compiled function's compile time."""
    start = time.perf_counter()
    out = fn().float()
    Meter(device).sync()
    return out, time.perf_counter() - start


def _rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def _kernels_of(call, device, tag):
    """GPU kernel ms per call by kind, the top kernels, and how busy the GPU was (for a
    compiled call: busy well below its wall time would leave room for CUDA graphs), keyed
    kernel_ms_TAG, top_kernels_TAG, gpu_busy_ms_TAG."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            call()
        Meter(device).sync()
    kinds, top = _kernel_table(prof, 3)
    return {f"kernel_ms_{tag}": kinds, f"top_kernels_{tag}": top,
            f"gpu_busy_ms_{tag}": round(sum(kinds.values()), 3)}


def part_cold_decode(p, device):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ldm.scalecrafter.tiled_decode import tiled_decode
    from ldm.util import instantiate_from_config, load_config

    params = load_config(bg.TINY_CONFIG if p.get("tiny") else bg.FULL_CONFIG).model.params
    with torch.device(device):
        vae = instantiate_from_config(params.first_stage_config).eval()
    vae.drop_encoder()
    z = torch.randn(1, 4, p["side"], p["side"]).to(device)

    budget = int(p.get("budget_gb", DECODE_BUDGET_GB) * bg.GB)

    def decode():
        with torch.no_grad():
            return tiled_decode(vae, z, p.get("overlap", 16), True, "auto",
                                budget_bytes=budget, progress=False,
                                recompute=p.get("recompute", True))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        cold = _wall(decode, device)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    conv_shapes = [e for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::convolution"]
    pinned = _pinned_stats(device)
    warm = _wall(decode, device)
    return {"side": p["side"], "cold_seconds": cold, "warm_seconds": warm, "pinned": pinned,
            "conv_calls": sum(e.count for e in conv_shapes), "conv_shapes": len(conv_shapes),
            "top_host_ops_cold_ms": [[e.key, round(e.self_cpu_time_total / 1e3, 1), e.count]
                                     for e in ops],
            "peak_gb": (torch.cuda.max_memory_allocated(device) / bg.GB
                        if device.type == "cuda" else None)}


def _pinned_stats(device):
    """Pinned host memory so far: peak GB, blocks made, seconds spent making them."""
    import torch

    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None  # (the CPU; torch before 2.6)
    stats = torch.cuda.host_memory_stats()
    return {"peak_gb": stats.get("allocated_bytes.peak", 0) / bg.GB,
            "blocks": stats.get("num_host_alloc", 0),
            "alloc_seconds": stats.get("host_alloc_time.total", 0) / 1e6}


@contextlib.contextmanager
def _probe_command(p, device):
    """(the probe's command line, seconds to write its checkpoint): a random full-size
    checkpoint (the tiny one with `tiny`) written to a temporary folder for the block."""
    with tempfile.TemporaryDirectory(dir=p.get("workdir")) as tmp:
        ckpt = Path(tmp) / "sd21-random.ckpt"
        config = bg.TINY_CONFIG if p.get("tiny") else bg.FULL_CONFIG
        start = time.perf_counter()
        bg.write_random_checkpoint(ckpt, device, config)
        written = time.perf_counter() - start
        yield ([sys.executable, str(Path(__file__).resolve()), "--load-probe", str(ckpt),
                "--config", str(config), "--device", device.type, "--side", str(p["side"])],
               written)


def part_cli(p, device):
    """The full-size checkpoint is written here; the load runs in a fresh process."""
    with _probe_command(p, device) as (probe, written):
        result = _probe(probe, 80) or {"error": "load probe failed or took over 80 s"}
        # Pipeline.load as txt2img runs it, from a fresh interpreter's start, with the weights
        # copied while the model is built (staged) and after it (sequential), twice each
        loads = {"staged": [], "sequential": []}
        for _ in range(p.get("load_rounds", 2)):
            for mode in loads:
                out = _probe(probe + ["--load-only", mode], 25)
                if out:
                    loads[mode].append(out["load"])
    result["pipeline_load_seconds"] = {m: min(t) if t else None for m, t in loads.items()}
    result["checkpoint_write_seconds"] = written
    return result


def _probe(cmd, timeout):
    """The JSON line a probe process prints, or None (failed, or over `timeout` seconds)."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def load_only(ckpt, config, device_type, staged: bool):
    """Runs in a fresh interpreter: seconds from here to a loaded Pipeline (imports included).
    Prints one JSON line."""
    start = time.perf_counter()
    import torch

    from ldm.pipeline import Pipeline
    Pipeline.load(config, ckpt, device=device_type, precision="autocast", staged_load=staged)
    if device_type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"load": time.perf_counter() - start}))


def load_probe(ckpt, config, device_type, side):
    """Runs in a fresh interpreter: each step of txt2img's load timed apart, then sampling
    steps cold and warm. Prints one JSON line."""
    marks, last = {}, [time.perf_counter()]

    def mark(name):
        now = time.perf_counter()
        marks[name] = round(now - last[0], 3)
        last[0] = now
    import torch
    mark("import_torch")
    if device_type == "cuda":
        torch.zeros(1, device="cuda")
    mark("cuda_start")
    from ldm.modules.encoders.common import import_open_clip
    import_open_clip()  # what the SD 2.x text encoder costs to import
    mark("import_open_clip")
    from ldm.checkpoint import load_state_dict
    from ldm.layouts import fit_state_dict, without_wrapper_prefix
    from ldm.modules.encoders.common import register_config_dir
    from ldm.pipeline import GenerationOptions, Pipeline
    from ldm.precision import prepare_for_inference, weight_dtype_policy
    from ldm.util import instantiate_from_config, load_config, model_part_names
    mark("import_ldm")
    cfg = load_config(config)
    register_config_dir(Path(config).resolve().parent)
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    mark("meta_build")
    state = without_wrapper_prefix(load_state_dict(ckpt), model_part_names(cfg))
    mark("read_checkpoint")
    fitted = fit_state_dict(model, state, weight_dtype_policy(device_type, "autocast"),
                            device_type)
    if device_type == "cuda":
        torch.cuda.synchronize()
    mark("weights_to_device")
    model.load_state_dict(fitted, strict=True, assign=True)
    prepare_for_inference(model.eval(), device_type, "autocast")
    mark("assign_and_layout")
    pipe = Pipeline(model, device_type)
    pipe.sampling_kernels = {"cudnn_benchmark": False, "cudnn_attention": False}
    opts = GenerationOptions(H=8 * side, W=8 * side, steps=2, precision="autocast")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast(device_type, dtype=bg._half(torch.device(device_type))):
        pipe.model.get_conditioning(["a corgi"], (opts.H, opts.W))
    if device_type == "cuda":
        torch.cuda.synchronize()
    mark("first_text_encode")

    def steps(tuned, cudnn_attention):
        pipe.sampling_kernels = {"cudnn_benchmark": tuned, "cudnn_attention": cudnn_attention}
        pipe.sample(["a corgi"], opts, gen, progress=False)
        if device_type == "cuda":
            torch.cuda.synchronize()
    # what a single run pays once: the first steps, cuDNN autotuning's first pass, cuDNN
    # attention's first graphs (it builds one per shape), each beside its warm time
    for name, tuned, attention in (
            ("2_steps_cold", False, False), ("2_steps_autotune_first", True, False),
            ("2_steps_autotuned_warm", True, False), ("2_steps_plain_warm", False, False),
            ("2_steps_cudnn_attention_first", False, True),
            ("2_steps_cudnn_attention_warm", False, True)):
        steps(tuned, attention)
        mark(name)
    print(json.dumps({"seconds": marks, "side": side}))


def run_part(name, params, device, timeout):
    import os

    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name,
           "--params", json.dumps(params), "--device", device]
    env = dict(os.environ, **PART_ENV.get(name, dict)())
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as stopped:
        return {**_reported(stopped.stdout), "error": f"stopped at its {timeout} s timeout"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:  # what it reported before failing is kept
        return {**_reported(proc.stdout), "error": f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


def _reported(out) -> dict:
    """What a part stopped by its timeout reported before (`report_so_far`), if anything."""
    out = out.decode() if isinstance(out, bytes) else (out or "")
    for line in reversed(out.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


PART_FUNCTIONS = {"profile": part_profile, "eager_layouts": part_eager_layouts,
                  "cli": part_cli, "compile": part_compile,
                  **{name: part_compile_variant for name in COMPILE_VARIANTS},
                  **{name: part_cold_decode for name in COLD_DECODES}}


def parts_of(spec: str):
    """The parts a comma list of parts and part sets names, in order, each once (sets share
    parts)."""
    return list(dict.fromkeys(q for p in spec.split(",") if p for q in PART_SETS.get(p, (p,))))


def part_params(name, tiny):
    unet_parts = ("profile", "eager_layouts", "compile", *COMPILE_VARIANTS)
    side = 128 if name in unet_parts or name == "cli" else 512
    if tiny:
        side = 8 if name == "cli" else 16
    return {"side": side, "tiny": tiny, "rounds": 2 if tiny else 5, **PART_PARAMS.get(name, {})}


def _seconds(value):
    return "–" if value is None else f"{value:.2f}"


def summary(results):
    """Markdown lines for the parts that ran."""
    lines = []
    prof = results.get("profile", {})
    if "seconds_per_call" in prof:
        lines.append(f"- {prof['side'] * 8}² CFG UNet call: {prof['seconds_per_call'] * 1e3:.1f} ms, "
                     f"{prof['flops_per_call'] / 1e12:.2f} TFLOP, {prof['tflops']:.0f} TFLOP/s")
        for tag in ("default", "cudnn_attention"):
            if f"kernel_ms_{tag}" in prof:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in prof[f"kernel_ms_{tag}"].items())
                lines.append(f"- GPU ms per call by kind ({tag}): {kinds} "
                             f"(busy {prof[f'gpu_busy_ms_{tag}']:.1f})")
                lines.append("  - TFLOP/s by kind: " + ", ".join(
                    f"{k} {v}" for k, v in prof[f"tflops_by_kind_{tag}"].items()))
                lines += [f"  - {ms:.2f} ms {name}" for name, ms in prof[f"top_kernels_{tag}"][:8]]
        lines.append("- variants, per call: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" for k, v in prof["variants_seconds"].items()))
    lines += _eager_layout_lines(results.get("eager_layouts", {}))
    for name in PARTS:
        r = results.get(name, {})
        if "error" in r:
            lines.append(f"- {name}: {r['error']}")
    cli = results.get("cli", {})
    if "seconds" in cli:
        lines.append("- CLI load probe, s: " + ", ".join(f"{k} {v}"
                                                         for k, v in cli["seconds"].items()))
        lines.append("- Pipeline.load from a fresh interpreter, s (best of 2): " + ", ".join(
            f"{k} {_seconds(v)}" for k, v in cli.get("pipeline_load_seconds", {}).items()))
    for name in COLD_DECODES:
        cold = results.get(name, {})
        if "cold_seconds" not in cold:
            continue
        pinned = cold.get("pinned") or {}
        pinned_text = (f", pinned {pinned['peak_gb']:.1f} GB in {pinned['blocks']} blocks made in "
                       f"{pinned['alloc_seconds']:.1f} s" if pinned else "")
        lines.append(f"- {cold['side'] * 8}² tiled decode ({name}): cold "
                     f"{cold['cold_seconds']:.1f} s, warm {cold['warm_seconds']:.1f} s{pinned_text}, "
                     f"{cold['conv_calls']} convs of {cold['conv_shapes']} shapes; cold host ops "
                     "(ms, calls): " + "; ".join(f"{k} {ms} x{n}"
                                                 for k, ms, n in cold["top_host_ops_cold_ms"][:6]))
    comp = results.get("compile", {})
    if "compile_seconds" in comp and "seconds" not in comp:  # stopped at its timeout
        lines.append("- torch.compile, seconds to compile: " + ", ".join(
            f"{k} {comp[k]:.0f}" for k in ("compile_seconds", "routed_compile_seconds")
            if k in comp))
    if "seconds" in comp:
        s = comp["seconds"]
        lines.append(f"- torch.compile, plain run: {comp['compile_seconds']:.0f} s to compile, "
                     f"{s['compiled'] * 1e3:.1f} ms vs eager {s['eager'] * 1e3:.1f} ms per call, "
                     f"rel. err {comp['rel_err_vs_eager']:.1e}")
        lines.append(f"- torch.compile, re-dilated run (convs routed): "
                     f"{comp['routed_compile_seconds']:.0f} s to compile; re-dilated steps "
                     f"{s['compiled_redilated'] * 1e3:.1f} ms vs eager "
                     f"{s['eager_redilated'] * 1e3:.1f} ms (rel. err "
                     f"{comp['redilated_rel_err_vs_eager']:.1e}), plain steps "
                     f"{s['compiled_routed'] * 1e3:.1f} ms (first "
                     f"{comp['first_routed_plain_call_seconds']:.1f} s)")
    lines += _compiled_kernel_lines(comp, "compiled plain call")
    for name in COMPILE_VARIANTS:
        got = results.get(name, {})
        for label, info in _variants_of(got).items():
            line = (f"- torch.compile {VARIANT_TEXT[label]}, plain run: "
                    f"{info['compile_seconds']:.0f} s to compile")
            if label in got.get("seconds", {}):
                ms, eager = got["seconds"][label], got["seconds"]["eager"]
                line += (f", {ms * 1e3:.1f} ms vs eager {eager * 1e3:.1f} ms per call "
                         f"({ms / eager:.2f}x)")
            if label in got.get("gpu_busy_ms", {}):
                line += f", GPU busy {got['gpu_busy_ms'][label]:.1f} ms"
            if info.get("graphs") == 0:
                line += " (compiled no graph of its own: an earlier variant's ran)"
            lines.append(f"{line}, rel. err {info['rel_err_vs_eager']:.1e}")
        lines += [f"- torch.compile {VARIANT_TEXT[label]}: failed ({why})"
                  for label, why in got.get("errors", {}).items()]
        lines += [f"- torch.compile {VARIANT_TEXT[label]}: not profiled ({why})"
                  for label, why in got.get("profile_errors", {}).items()]
        lines += [f"- torch.compile {VARIANT_TEXT[label]}: skipped ({why})"
                  for label, why in got.get("skipped", {}).items()]
        what = VARIANT_TEXT.get(got.get("profiled") or next(iter(COMPILE_VARIANTS[name])))
        lines += _compiled_kernel_lines(got, f"compiled call ({what})")
    return lines


def _eager_layout_lines(part):
    """The eager layouts' ms per call, channels-last conv inputs and GPU kernels."""
    lines = []
    for name in EAGER_LAYOUTS:
        if name not in part.get("seconds", {}):
            continue
        inputs = part["conv_inputs"][name]
        line = (f"- eager call, layout {name}: {part['seconds'][name] * 1e3:.1f} ms, "
                f"{inputs['channels_last']} of {inputs['convs']} conv inputs channels-last")
        if f"kernel_ms_{name}" in part:
            kinds = part[f"kernel_ms_{name}"]
            line += (f"; GPU busy {part[f'gpu_busy_ms_{name}']:.1f} ms (" +
                     ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()) + "), layout "
                     f"conversions {_conversion_ms(part[f'top_kernels_{name}']):.2f} ms")
        lines.append(line)
    return lines


def _conversion_ms(top_kernels):
    """GPU ms of cuDNN's NCHW<->NHWC conversion kernels among the top kernels."""
    return sum(ms for name, ms in top_kernels if re.search(r"nchwtonhwc|nhwctonchw", name.lower()))


def _variants_of(got):
    """{label: {compile_seconds, rel_err_vs_eager}} of a compile-variant part's results (run 4's
    single-variant parts kept them at the top level)."""
    if "variants" in got:
        return got["variants"]
    label = next((k for k in got.get("seconds", {}) if k != "eager"), None)
    return {label: got} if label and "compile_seconds" in got else {}


def _compiled_kernel_lines(part, what):
    if "kernel_ms_compiled" not in part:
        return []
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in part["kernel_ms_compiled"].items())
    return [f"- GPU ms per {what} by kind: {kinds} (busy {part['gpu_busy_ms_compiled']:.1f})",
            *[f"  - {ms:.2f} ms {name}" for name, ms in part["top_kernels_compiled"][:6]]]


STEPS = 50  # a run's steps, the seed's default: what a one-off cost must pay back within


# `--compile` is for long sessions (one process, many images): one compile mode is preferred
# to another only if its extra compile time pays back within this many steps, 40 runs of 50.
COMPILE_SESSION_STEPS = 2000
# What the per-call rule cannot see, said beside an entry that has it (docs/benchmarks.md, run 6)
HELD_BACK = {"cuda_graphs": "first run `gpu_check.sh card24`: the graphs' private pool keeps "
                            "the UNet's memory from a 4096² decode on a 24 GB card"}


def _pays_back(once, per_step_gain, steps=STEPS):
    return per_step_gain > 0 and once < steps * per_step_gain


def _compile_seconds(part, label):
    return part["variants"][label].get("compile_seconds", 0.0)


def _better_compile(part, on, off):
    """Whether variant `on` beats `off` of one compile-variant part: faster per call, and its
    extra compile time paid back within COMPILE_SESSION_STEPS calls. (Compile times alone do
    not decide: a later variant finds kernels an earlier one compiled in the on-disk cache.)"""
    extra = _compile_seconds(part, on) - _compile_seconds(part, off)
    return _pays_back(extra, part["seconds"][off] - part["seconds"][on], COMPILE_SESSION_STEPS)


def _compile_mode(name, part):
    """The COMPILE_MODES entry a compile-variant part decides: of the variants that beat its
    first (the plain compile), the cheapest long session (compile time and the calls)."""
    timed = [label for label in COMPILE_VARIANTS[name] if label in part.get("seconds", {})]
    base = next(iter(COMPILE_VARIANTS[name]))
    if base not in timed:
        return None
    better = [base] + [label for label in timed if _better_compile(part, label, base)]
    return COMPILE_VARIANTS[name][min(better, key=lambda label: _compile_seconds(
        part, label) + COMPILE_SESSION_STEPS * part["seconds"][label])]


def _cold(results, part):
    """A cold decode's seconds and their text; a part stopped by its timeout took longer
    than the timeout (a lower bound, "> 65 s"); (None, None) where it did not run."""
    got = results.get(part, {})
    if got.get("cold_seconds") is not None:
        return got["cold_seconds"], f"{got['cold_seconds']:.1f} s"
    if "timeout" in got.get("error", ""):
        return TIMEOUTS[part], f"> {TIMEOUTS[part]} s"
    return None, None


def decisions(results):
    """{switch: (on, why)} by docs/benchmarks.md's rules, for the switches whose figures ran:
    per-call figures are 1024² CFG calls, i.e. one sampling step each."""
    out = {}
    variants = results.get("profile", {}).get("variants_seconds", {})
    probe = results.get("cli", {}).get("seconds", {})
    if "cudnn_attention" in variants and "2_steps_cudnn_attention_first" in probe:
        gain = variants["default"] - variants["cudnn_attention"]
        once = probe["2_steps_cudnn_attention_first"] - probe["2_steps_plain_warm"]
        out["cudnn_attention"] = (_pays_back(once, gain),
                                  f"{gain * 1e3:+.2f} ms a step, first pass {once:.2f} s")
    if "channels_last" in variants:
        gain = variants["default"] - variants["channels_last"]
        out["channels_last"] = (gain > 0, f"{gain * 1e3:+.2f} ms a step")
    if "2_steps_autotune_first" in probe:
        gain = (probe["2_steps_plain_warm"] - probe["2_steps_autotuned_warm"]) / 2
        once = probe["2_steps_autotune_first"] - probe["2_steps_plain_warm"]
        out["cudnn_benchmark"] = (_pays_back(once, gain),
                                  f"{gain * 1e3:+.2f} ms a step, first pass {once:.2f} s")
    loads = results.get("cli", {}).get("pipeline_load_seconds", {})
    if loads.get("staged") and loads.get("sequential"):
        out["staged_loads"] = (loads["staged"] < loads["sequential"],
                               f"staged {loads['staged']:.2f} s, sequential "
                               f"{loads['sequential']:.2f} s")
    # each pair differs in one thing: recomputing or storing (default pinned allocations),
    # pinned memory registered on threads or not (recomputing, as txt2img decodes)
    pairs = {"recompute": ("cold_decode_hostalloc", "cold_decode_stored"),
             "pinned_register_threads": ("cold_decode", "cold_decode_hostalloc")}
    for switch, (on, off) in pairs.items():
        (on_s, on_text), (off_s, off_text) = _cold(results, on), _cold(results, off)
        if on_s is not None and off_s is not None and not (on_text[0] == off_text[0] == ">"):
            out[switch] = (on_s < off_s, f"{on} {on_text}, {off} {off_text}, cold")
    eager = results.get("eager_layouts", {})
    if "nchw" in eager.get("seconds", {}):
        # the eager call's wall time moved by 3 ms between two runs on one machine (run 6),
        # its GPU time by 0.05 ms: a layout must shorten both
        gain = eager["seconds"]["as_run"] - eager["seconds"]["nchw"]
        busy = [eager.get(f"gpu_busy_ms_{name}") for name in ("as_run", "nchw")]
        busy_gain = busy[0] - busy[1] if None not in busy else None
        out["nchw_transformer_outputs"] = (
            gain > 0 and (busy_gain is None or busy_gain > 0),
            f"{gain * 1e3:+.2f} ms a step"
            + ("" if busy_gain is None else f", GPU busy {busy_gain:+.2f} ms"))
    comp = results.get("compile", {})
    if "seconds" in comp:
        gain = comp["seconds"]["eager"] - comp["seconds"]["compiled"]
        out["compile"] = (_pays_back(comp["compile_seconds"], gain),
                          f"{gain * 1e3:+.2f} ms a step, {comp['compile_seconds']:.0f} s to compile")
    for label, switch in (("compiled_frozen", "freezing"), ("compiled_cudagraphs", "cuda_graphs")):
        got = results.get(label.replace("compiled_", "compile_"), {}).get("seconds")
        if "seconds" in comp and got and label in got:  # (its compile may have failed)
            plain_ratio = comp["seconds"]["compiled"] / comp["seconds"]["eager"]
            ratio = got[label] / got["eager"]
            out[switch] = (ratio < plain_ratio, f"{ratio:.2f}x of eager {VARIANT_TEXT[label]}, "
                                                f"{plain_ratio:.2f}x without")
    for name, pairs in COMPILE_PAIRS.items():  # in one process: these win
        part = results.get(name, {})
        timed = part.get("seconds", {})
        for switch, (on, off) in pairs.items():
            if on in timed and off in timed:
                extra = _compile_seconds(part, on) - _compile_seconds(part, off)
                out[switch] = (_better_compile(part, on, off),
                               f"{timed[on] * 1e3:.1f} ms {VARIANT_TEXT[on]}, "
                               f"{timed[off] * 1e3:.1f} ms {VARIANT_TEXT[off]}; "
                               f"{extra:+.0f} s to compile")
    return out


def decision_lines(results):
    lines = [f"- {name}: {'on' if on else 'off'} ({why})"
             for name, (on, why) in decisions(results).items()]
    variants = results.get("profile", {}).get("variants_seconds", {})
    if variants:
        best = min(variants, key=variants.get)
        lines.append(f"- plain {STEPS}-step sample at the best variant ({best}): "
                     f"{STEPS * variants[best]:.2f} s of UNet calls")
    compiled = {label: ms for part in ("compile", *COMPILE_VARIANTS)
                for label, ms in results.get(part, {}).get("seconds", {}).items()
                if label.startswith("compiled") and "redilated" not in label
                and "routed" not in label}
    if compiled:
        best = min(compiled, key=compiled.get)
        lines.append(f"- plain {STEPS}-step sample compiled ({best}): "
                     f"{STEPS * compiled[best]:.2f} s of UNet calls, after compiling")
    for name in COMPILE_PAIRS:  # one process each
        mode = _compile_mode(name, results.get(name, {}))
        if mode is not None:
            lines.append(f"- --compile on this device type: COMPILE_MODES entry "
                         f"(ldm/precision.py) {mode}"
                         + ("" if name == "compile_layouts" else f" (by {name})")
                         + "".join(f"; {why}" for key, why in HELD_BACK.items() if mode.get(key)))
    return ["", "Decisions (docs/benchmarks.md):"] + lines if lines else []


def report(results):
    return "\n".join([f"## gpu_speed on {results['device']} (torch {results['torch']})",
                      *summary(results), *decision_lines(results)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="speed",
                    help=f"comma list of parts ({', '.join(PARTS)}) or part sets "
                         f"({', '.join(PART_SETS)}); default: speed")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke run)")
    ap.add_argument("--json", help="write the results here (rewritten after each part)")
    ap.add_argument("--summarize", metavar="JSON", nargs="+",
                    help="print the summary and decisions of saved results files (one per part "
                         "set), run nothing")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--load-probe", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--load-only", choices=["staged", "sequential"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.summarize:
        results = {}
        for path in args.summarize:
            results.update(json.loads(Path(path).read_text()))
        print(report(results))
        return 0
    if args.load_probe and args.load_only:
        return load_only(args.load_probe, args.config, args.device, args.load_only == "staged")
    if args.load_probe:
        return load_probe(args.load_probe, args.config, args.device, args.side)
    import torch

    if args.part:
        result = PART_FUNCTIONS[args.part](json.loads(args.params), torch.device(args.device))
        print(json.dumps(result))
        return 0
    parts = parts_of(args.parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s): {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch (--device cpu --tiny for a smoke run)",
              file=sys.stderr)
        return 1
    results = {"device": (torch.cuda.get_device_name() if args.device == "cuda"
                          else "cpu"), "torch": torch.__version__}
    for name in parts:
        log(f"part {name} (at most {TIMEOUTS[name]} s)")
        start = time.perf_counter()
        results[name] = run_part(name, part_params(name, args.tiny), args.device,
                                 TIMEOUTS[name])
        results[name]["part_seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results))
    return 0 if all("error" not in results[p] for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
