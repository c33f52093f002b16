"""Correctness of the CUDA paths against the tiny reference model's arrays, fp32 with TF32 off:
one line per check (PASS / FAIL / SKIP, with the error measured), exit status = failures.

    SCALECRAFTER_REF=shared_ref NVIDIA_TF32_OVERRIDE=0 python3 scripts/gpu_check.py

SCALECRAFTER_REF is a folder laid out as ../shared/reference (it needs tiny/). Checks that need
open_clip_torch (the text encoder) are skipped, with the reason, where it is missing."""
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REF = Path(os.environ.get("SCALECRAFTER_REF") or REPO.parent / "shared" / "reference")
TINY = REF / "tiny"
TOL = 1e-4  # the CPU tests' bound against the reference arrays

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))
CHECKS = []


class Skip(Exception):
    pass


def check(fn):
    CHECKS.append(fn)
    return fn


def rel_err(ours, ref):
    ours = ours.detach().float().cpu().numpy() if torch.is_tensor(ours) else np.asarray(ours)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def expect(name, err, bound):
    """Raise with the numbers when err is above bound; else the text for the PASS line."""
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.2e} > {bound:.0e}")
    return f"{name} {err:.1e}"


def tiny_parts():
    """The tiny model's UNet and VAE with the reference weights (no text encoder needed)."""
    from ldm.checkpoint import load_state_dict
    from ldm.util import instantiate_from_config, load_config

    params = load_config(TINY / "tiny-sd21.yaml").model.params
    state = load_state_dict(TINY / "tiny-sd21.ckpt")
    parts = {}
    for name, node, prefix in (("unet", params.unet_config, "model.diffusion_model."),
                               ("vae", params.first_stage_config, "first_stage_model.")):
        module = instantiate_from_config(node)
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                if k.startswith(prefix)})
        parts[name] = module.to(DEVICE).float().eval()
    return parts["unet"], parts["vae"], params.scale_factor


@check
def polyphase_redilation():
    from ldm.scalecrafter.redilation import dilated_conv, polyphase_conv, use_polyphase

    gen, worst = torch.Generator().manual_seed(0), 0.0
    for d in range(2, 9):
        w, b = torch.randn(8, 6, 3, 3, generator=gen), torch.randn(8, generator=gen)
        for h, wd in ((32, 32), (29, 18)):
            x = torch.randn(2, 6, h, wd, generator=gen)
            ref = F.conv2d(x.double(), w.double(), b.double(), 1, d, d)
            xd, wdv, bd = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
            worst = max(worst, rel_err(polyphase_conv(xd, wdv, bd, d), ref))
            for stride in (1, 2):
                ref_s = F.conv2d(x.double(), w.double(), b.double(), stride, d, d)
                worst = max(worst, rel_err(dilated_conv(xd, wdv, bd, (stride, stride), d), ref_s))
    return expect(f"polyphase (policy on {DEVICE.type}: {use_polyphase(DEVICE)})", worst, 1e-5)


@check
def device_noise_stream():
    """--rng device draws what the seed's code draws after seeding: torch.randn on the device's
    default generator, the start noise first, then one tensor per DDIM update."""
    from ldm.models.diffusion.ddim import draw_noise
    from ldm.pipeline import GenerationOptions, Pipeline

    opts = GenerationOptions(H=256, W=192, seed=51, rng="device")
    pipe = Pipeline(None, DEVICE)
    generator = pipe.noise_generator(opts)
    ours = [pipe.initial_noise(opts, 2, generator)]
    ours.append(draw_noise(generator, ours[0]))
    torch.manual_seed(opts.seed)  # as the seed's seed_everything
    theirs = [torch.randn(ours[0].shape, device=DEVICE) for _ in ours]
    if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
        raise AssertionError("--rng device: the noise is not the device generator's stream")
    return f"--rng device: start noise and a step's noise equal the {DEVICE.type} stream"


@check
def vae_attention():
    from ldm.modules.diffusionmodules import model

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4096, 512, generator=gen) for _ in range(3))
    scores = (q.double() @ k.double().transpose(-1, -2)) / 512 ** 0.5
    ref = scores.softmax(-1) @ v.double()
    qd, kd, vd = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    fused = model.attention(qd, kd, vd)
    path = "fused" if model._FUSED_OK.get((DEVICE.type, torch.float32, 512)) else "chunked"
    chunked = model.attention(qd, kd, vd, chunk_bytes=4096 * 4 * 300) if path == "fused" else fused
    if path == "fused":  # the chunked fallback too, forced
        model._FUSED_OK[(DEVICE.type, torch.float32, 512)] = False
        chunked = model.attention(qd, kd, vd, chunk_bytes=4096 * 4 * 300)
        model._FUSED_OK[(DEVICE.type, torch.float32, 512)] = True
    return (expect(f"attention head 512 fp32 ({path})", rel_err(fused, ref), 1e-5) + ", "
            + expect("chunked", rel_err(chunked, ref), 1e-5))


@check
def unet_calls():
    from ldm.scalecrafter.redilation import ConvOverride, overridden_convs, uniform_dilation_map

    unet, _, _ = tiny_parts()
    out = []
    for name, dilate, skip in (("vanilla", None, None), ("dilate2-skip1", 2, 1)):
        data = np.load(TINY / f"tiny-sd21-unet-{name}.npz")
        x, t, ctx = (torch.from_numpy(data[k]).to(DEVICE) for k in ("x", "t", "context"))
        plan = uniform_dilation_map(unet, dilate, skip) if dilate else {}
        with torch.no_grad(), overridden_convs(unet, {k: ConvOverride(v) for k, v in plan.items()}):
            got = unet(x, t, context=ctx)
        out.append(expect(name, rel_err(got, data["out"]), TOL))
    return ", ".join(out)


@check
def half_weights_unet():
    from torch import nn

    from ldm.precision import prepare_for_inference, sampling_kernels

    unet, _, _ = tiny_parts()
    holder = nn.Module()
    holder.unet = unet
    data = np.load(TINY / "tiny-sd21-unet-vanilla.npz")
    x, t, ctx = (torch.from_numpy(data[k]).to(DEVICE) for k in ("x", "t", "context"))
    out = []
    # the reference kernels, then the device's default fast paths (channels-last, native half
    # GroupNorm) on the same UNet (this order: channels-last is not undone), with and without
    # cuDNN's fused attention tried first (the default on CUDA)
    for label, paths, cudnn_attention in (
            ("reference kernels", {"channels_last": False, "native_norms": False}, False),
            ("default paths but PyTorch's attention order", {}, False),
            ("default paths (cuDNN attention first)", {}, True)):
        prepare_for_inference(holder, DEVICE, "autocast", **paths)
        dtypes = {p.dtype for p in unet.parameters()}
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16), \
                sampling_kernels(cudnn_attention=cudnn_attention):
            got = unet(x, t, context=ctx)
        out.append(expect(f"fp16 weights {sorted(map(str, dtypes))} under autocast, {label}",
                          rel_err(got, data["out"]), 2e-2))
    return ", ".join(out)


@check
def decodes():
    from ldm.scalecrafter.lean_decode import lean_decode
    from ldm.scalecrafter.tiled_decode import tiled_decode

    _, vae, scale = tiny_parts()
    ref = np.load(TINY / "tiny-sd21-sample-ddim-eta1-dilate2.npz")
    z = torch.from_numpy(ref["latent"]).to(DEVICE) / scale
    out = []
    with torch.no_grad():
        out.append(expect("full", rel_err(vae.decode(z), ref["image_full"]), TOL))
    # the banded full decode: small bands, and a budget that makes every layer recompute
    for budget in (None, 0):
        out.append(expect(f"banded budget {budget}", rel_err(
            lean_decode(vae, z, budget, band_bytes=4096), ref["image_full"]), TOL))
    for overlap in (0, 8):
        for sync in (0, 1):
            on_device = tiled_decode(vae, z, overlap, bool(sync), offload=False)
            host = tiled_decode(vae, z, overlap, bool(sync), offload=True)
            if not torch.equal(on_device, host):
                raise AssertionError(f"ov{overlap} sync{sync}: tiles through pinned host memory "
                                     f"differ from tiles kept on the device")
            out.append(expect(f"tiled ov{overlap} sync{sync}",
                              rel_err(on_device, ref[f"image_tiled_ov{overlap}_sync{sync}"]), TOL))
            # no budget: every layer recomputes and every waiting tile goes through pinned
            # host memory
            out.append(expect(f"recomputed ov{overlap} sync{sync}", rel_err(
                tiled_decode(vae, z, overlap, bool(sync), budget_bytes=0),
                ref[f"image_tiled_ov{overlap}_sync{sync}"]), TOL))
    auto = tiled_decode(vae, z, 8, True, tile_size="auto", budget_bytes=2 ** 20, offload=None)
    return ", ".join(out) + f"; auto tiles at 1 MiB ran, finite: {bool(torch.isfinite(auto).all())}"


@check
def decode_budget():
    """The decode budget leaves out a CUDA graph's private pool, and keeps within the
    per-process memory limit: the allocator must grant what it promises."""
    from ldm.scalecrafter.memory import (available_bytes, cuda_index, in_default_pool,
                                         unused_bytes)

    if DEVICE.type != "cuda":
        raise Skip("CUDA only")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    x = torch.ones(2 ** 26, device=DEVICE)  # 256 MiB
    side = torch.cuda.Stream()  # warm-up off the capture stream, as CUDA graphs require
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (x * 2).sum()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = available_bytes(DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = (x * 2).sum()  # its 256 MiB intermediate stays in the graph's pool
    torch.cuda.synchronize()
    pool = unused_bytes(s for s in torch.cuda.memory_snapshot() if not in_default_pool(s))
    drop = before - available_bytes(DEVICE)
    if pool < 2 ** 28 or drop < 0.9 * pool:
        raise AssertionError(f"graph pool holds {pool / 2**20:.0f} MiB unused, the budget fell "
                             f"by {drop / 2**20:.0f} MiB")
    text = f"graph pool {pool / 2**20:.0f} MiB unused: budget {drop / 2**20:.0f} MiB lower"
    torch.cuda.empty_cache()  # the default pool's cache goes; the graph's pool stays
    index = cuda_index(DEVICE)
    total = torch.cuda.mem_get_info(index)[1]  # (these want an index: "cuda" alone is refused)
    limit = torch.cuda.memory_reserved(index) + 2 * 2 ** 30
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    try:
        promised = available_bytes(DEVICE)
        if not 1.9 * 2 ** 30 <= promised <= 2.1 * 2 ** 30:
            raise AssertionError(f"2 GiB left under the limit, the budget says "
                                 f"{promised / 2**30:.2f} GiB")
        granted = torch.empty(int(0.95 * promised), dtype=torch.uint8, device=DEVICE)
        del granted
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    del graph, y
    return text + f"; 2 GiB under a per-process limit: {promised / 2**30:.2f} GiB, 95% granted"


@check
def bf16_vae_error():
    """Informational: the decode error of a bf16 VAE (is it exact enough to keep?)."""
    _, vae, scale = tiny_parts()
    ref = np.load(TINY / "tiny-sd21-sample-ddim-eta1-dilate2.npz")
    z = torch.from_numpy(ref["latent"]).to(DEVICE) / scale
    with torch.no_grad():
        got = vae.to(torch.bfloat16).decode(z.to(torch.bfloat16)).float()
    return f"bf16 VAE decode: relative error {rel_err(got, ref['image_full']):.1e} (not a gate)"


def _txt2img(tmp, *extra, device=DEVICE.type):
    import json

    sample = json.loads((TINY / "cases.json").read_text())["models"][0]["sample"][0]
    sys.path.insert(0, str(REPO / "scripts"))
    import txt2img

    argv = ["--prompt", sample["prompt"], "--config", str(TINY / "tiny-sd21.yaml"),
            "--ckpt", str(TINY / "tiny-sd21.ckpt"), "--H", str(sample["H"]),
            "--W", str(sample["W"]), "--steps", str(sample["steps"]),
            "--ddim_eta", str(sample["eta"]), "--scale", str(sample["scale"]),
            "--seed", str(sample["seed"]), "--dilate", str(sample["dilate"]),
            "--dilate_tau", str(sample["dilate_tau"]), "--dilate_skip", str(sample["dilate_skip"]),
            "--n_iter", "1", "--n_samples", "1", "--device", device, "--outdir", str(tmp),
            "--save_latent", "--debug", *extra]
    if txt2img.main(argv) != 0:
        raise AssertionError("txt2img failed")
    return np.load(Path(tmp) / "samples" / "00000.npy")


@check
def sample_through_the_cli():
    import tempfile

    try:
        import open_clip  # noqa: F401
    except ImportError as err:
        raise Skip(f"open_clip_torch is not installed ({err})")
    ref = np.load(TINY / "tiny-sd21-sample-ddim-eta1-dilate2.npz")
    with tempfile.TemporaryDirectory() as tmp:
        full = _txt2img(tmp + "/full", "--precision", "full", "--tiled_decoding", "--sync_gn",
                        "--overlap", "8")
        # (on CUDA, as cuda:0: the --device cuda:N path, which makes its GPU the current one)
        half = _txt2img(tmp + "/half", "--precision", "autocast", "--tile_size", "auto",
                        "--tiled_decoding", "--sync_gn", "--overlap", "8",
                        device="cuda:0" if DEVICE.type == "cuda" else DEVICE.type)
    return (expect("fp32 latent", rel_err(full[None], ref["latent"]), 1e-3)
            + f"; fp16-weights latent error {rel_err(half[None], ref['latent']):.1e} (not a gate)")


def main(argv=None):
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.
                            RawDescriptionHelpFormatter).parse_args(argv)  # only --help
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device visible to torch", torch.__version__)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not (TINY / "tiny-sd21.ckpt").is_file():
        print(f"FAIL reference data missing: {TINY}/tiny-sd21.ckpt (set SCALECRAFTER_REF)")
        return 1
    name = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, reference {REF}", flush=True)
    failures = 0
    for fn in CHECKS:
        start = time.perf_counter()
        try:
            text = fn()
            status = "PASS"
        except Skip as why:
            status, text = "SKIP", str(why)
        except Exception as err:  # one check failing must not stop the others
            status, text = "FAIL", f"{type(err).__name__}: {err}"
            failures += 1
            traceback.print_exc(file=sys.stderr)
        print(f"{status} {fn.__name__} ({time.perf_counter() - start:.1f}s): {text}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
