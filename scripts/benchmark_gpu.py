"""The GPU rows of scripts/benchmark.py (`--device cuda`): issue 11's table, measured on one card.

Each row is a case run in its own process (scripts/benchmark.py runs them); the UNet runs with
fp16 weights under autocast, as `--precision autocast` does, the VAE in fp32. Weights are random:
their values change neither time nor memory."""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "tiny-sd21.yaml"  # for the CPU smoke test
GB = 1024 ** 3
SEED_COMMAND = ["--prompt", "A corgi sits on a beach chair on a beautiful beach, with palm trees "
                "behind, high details", "--ddim_eta", "1", "--scale", "9", "--seed", "51",
                "--H", "1024", "--W", "1024", "--dilate", "2", "--dilate_tau", "20",
                "--dilate_skip", "4", "--n_iter", "1", "--n_samples", "1", "--tiled_decoding",
                "--sync_gn"]


def log(message):
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


class _Denoising:
    """What GuidedDenoiser needs of a LatentDiffusion, for a bare UNet (eps prediction)."""

    def __init__(self, unet):
        self.unet = unet

    def apply_model(self, x, t, cond):
        from ldm.modules.encoders.conditioning import as_conditioning

        cond = as_conditioning(cond)
        return self.unet(x, t, context=cond.context, y=cond.vector)

    def split_prediction(self, x, output, alpha_bar):
        from ldm.models.diffusion.ddpm import Prediction

        return Prediction.split("eps", x, output, alpha_bar)


def _config(p):
    if p.get("config"):
        return REPO_ROOT / p["config"]
    return TINY_CONFIG if p.get("tiny") else FULL_CONFIG


def _half(device):
    from ldm.precision import AUTOCAST_DTYPES

    return AUTOCAST_DTYPES[device.type]


def _unet_and_schedule(device, layout, config=FULL_CONFIG):
    """The config's UNet (default: full-size SD 2.1; random, fp16 weights on CUDA, layout
    options applied) and its alphas_cumprod."""
    import torch
    from torch import nn

    from ldm.models.diffusion.ddpm import schedule_buffers
    from ldm.precision import prepare_for_inference
    from ldm.util import get_obj_from_str, instantiate_from_config, load_config, part_configs

    config = load_config(config)
    unet_config, _ = part_configs(config)
    with torch.device(device):
        holder = nn.Module()
        holder.unet = instantiate_from_config(unet_config).eval()
    prepare_for_inference(holder, device, "autocast", **layout)
    model_class = get_obj_from_str(config.model.target)
    schedule = model_class.schedule_arguments(config.model.get("params") or {})
    return holder.unet, schedule_buffers(**schedule)["alphas_cumprod"], \
        unet_config.params.context_dim


def _options(p):
    """GenerationOptions of the case: a preset file's values, or the seed's uniform dilation."""
    from ldm.pipeline import GenerationOptions
    from ldm.scalecrafter.presets import read_preset

    if p.get("preset"):
        values = dict(read_preset(p["preset"]).values)
        for key, value in values.items():
            if key.endswith("_tau") and p.get("scale_taus"):  # the same share of the steps
                values[key] = int(value * p["steps"] / values["steps"])
        values.update(steps=p["steps"], H=8 * p["side"], W=8 * p["side"])
        return GenerationOptions(**values)
    if p.get("dilate_tau"):
        return GenerationOptions(steps=p["steps"], dilate=2, dilate_tau=p["dilate_tau"],
                                 dilate_skip=4, H=8 * p["side"], W=8 * p["side"])
    return GenerationOptions(steps=p["steps"], H=8 * p["side"], W=8 * p["side"])


# Kernel switches a variant of a sample case may set (cuDNN autotuning while sampling, the
# UNet's GroupNorm dtype, cuDNN attention first); a variant that sets none runs with the
# device's defaults (ldm.precision.FAST_PATHS), as txt2img does.
KERNEL_SWITCHES = ("cudnn_benchmark", "native_norms", "cudnn_attention")
REFERENCE_KERNELS = {"cudnn_benchmark": False, "native_norms": False, "cudnn_attention": False}


def _kernels(device, variant):
    from ldm.precision import fast_paths

    paths = fast_paths(device, **{k: variant.get(k) for k in KERNEL_SWITCHES})
    return {k: paths[k] for k in KERNEL_SWITCHES}


def case_sample(p, meter):
    """DDIM runs (eta 1, CFG 9) of the fp16 UNet: variants (re-dilation, kernel switches)
    interleaved round by round."""
    import torch

    from ldm.models.diffusion.ddim import sample_ddim
    from ldm.modules.normalization import set_native_norms
    from ldm.precision import sampling_kernels
    from ldm.scalecrafter.guidance import GuidedDenoiser
    from ldm.scalecrafter.settings import build_settings

    _as_card(meter.device, p)
    layout = {"channels_last": p.get("channels_last"),  # None: the device's default (txt2img's)
              "compile_unet": p.get("compile", False)}
    if layout["channels_last"] is None:  # (compiled: as --compile lays it out, COMPILE_MODES)
        layout["channels_last"] = _default_layout(meter.device, layout["compile_unet"])
    unet, acp, ctx_dim = _unet_and_schedule(meter.device, layout, _config(p))
    baseline = meter.current_bytes()
    gen = torch.Generator().manual_seed(0)
    cond, uncond = (_random_conditioning(unet, ctx_dim, gen, meter.device) for _ in range(2))
    x = torch.randn(1, 4, p["side"], p["side"], generator=gen).to(meter.device)
    variants = p.get("variants", {"run": {}})
    options = {k: {n: x for n, x in v.items() if n not in KERNEL_SWITCHES}
               for k, v in variants.items()}
    settings = {k: build_settings(unet, _options({**p, **v})) for k, v in options.items()}
    kernels = {k: _kernels(meter.device, v) for k, v in variants.items()}

    def run(key, steps=None):
        set_native_norms(unet, kernels[key]["native_norms"])
        denoiser = GuidedDenoiser(_Denoising(unet), cond, uncond, 9.0, settings[key])
        with torch.autocast(meter.device.type, dtype=_half(meter.device)), \
                sampling_kernels(kernels[key]["cudnn_benchmark"],
                                 kernels[key]["cudnn_attention"]):
            return sample_ddim(denoiser, x, acp, steps or p["steps"], 1.0,
                               torch.Generator().manual_seed(1), progress=False)
    times, warmup = {k: [] for k in variants}, {}
    with torch.no_grad():
        run(next(iter(variants)), 1)  # the process's one-off CUDA set-up, in no variant's time
        for key in variants if p.get("warmup_steps", 2) else ():
            log(f"  sample {key}: warm-up ({p.get('warmup_steps', 2)} steps)")
            # its time shows what one-off work (cuDNN autotuning) costs a single run
            warmup[key], _ = meter.timed(lambda: run(key, p.get("warmup_steps", 2)))
        for r in range(p.get("repeats", 1)):
            for key in variants:
                wall, _ = meter.timed(lambda: run(key))
                times[key].append(wall)
                log(f"  sample {key}: {r + 1}: {wall:.2f}s")
        result = {"seconds": {k: statistics.median(v) for k, v in times.items()},
                  "warmup_seconds": warmup,
                  "all_seconds": times, "sample_peak_gb": meter.peak_bytes() / GB,
                  **_pool_figures(meter.device)}
    result.update(side=p["side"], steps=p["steps"], baseline_gb=baseline / GB,
                  peak_gb=meter.peak_bytes() / GB, kernels=kernels,
                  channels_last=layout["channels_last"], card_gb=p.get("card_gb"),
                  compile_modes=p.get("compile_modes"),
                  dilated_steps=variants.get("dilated", {}).get("dilate_tau"))
    if meter.cuda:
        result["reserved_peak_gb"] = torch.cuda.max_memory_reserved(meter.device) / GB
    return result


def _default_layout(device, compile_unet=False):
    from ldm.precision import fast_paths

    return fast_paths(device, compile_unet)["channels_last"]


def _as_card(device, p):
    """A case's device set-up: `card_gb` caps this process's memory as a card of that size
    would (`set_per_process_memory_fraction`), `compile_modes` is how `--compile` compiles
    (as if set in COMPILE_MODES)."""
    import torch

    from ldm import precision

    if p.get("card_gb") and device.type == "cuda":
        from ldm.scalecrafter.memory import cuda_index

        index = cuda_index(device)  # ("cuda" alone is refused there; run 7)
        total = torch.cuda.mem_get_info(index)[1]
        torch.cuda.set_per_process_memory_fraction(min(p["card_gb"] * GB / total, 1.0), index)
    if p.get("compile") and p.get("compile_modes") is not None:
        precision.COMPILE_MODES[device.type] = dict(p["compile_modes"])


def _pool_figures(device):
    """What the CUDA graphs' private pools hold, all and unused: memory a decode cannot use."""
    import torch

    from ldm.scalecrafter.memory import in_default_pool, unused_bytes

    if device.type != "cuda":
        return {}
    private = [s for s in torch.cuda.memory_snapshot() if not in_default_pool(s)]
    return {"graph_pool_gb": sum(s["total_size"] for s in private) / GB,
            "graph_pool_unused_gb": unused_bytes(private) / GB}


def _random_conditioning(unet, ctx_dim, gen, device):
    """Random text context, plus a vector where the UNet takes one (SDXL's label_emb)."""
    import torch

    from ldm.modules.encoders.conditioning import Conditioning

    context = torch.randn(1, 77, ctx_dim, generator=gen).to(device)
    label = getattr(unet, "label_emb", None)
    vector = None if label is None else \
        torch.randn(1, label[0][0].in_features, generator=gen).to(device)
    return Conditioning(context, vector)


def case_whole(p, meter):
    """A preset's whole run as txt2img makes it, on a random full-size model built on the card:
    text encoder(s) and UNet in fp16, the VAE in fp32, all held through the run; the prompt
    encoded, the preset's steps sampled (after one set-up step, or `warmup_steps`), and its
    tiled decode on the default budget (or `budget_gb`). For the whole run's peak."""
    import dataclasses

    import torch

    from ldm.pipeline import Pipeline
    from ldm.scalecrafter.memory import default_budget
    from ldm.scalecrafter.tiled_decode import plan_axis

    _as_card(meter.device, p)
    pipe = Pipeline.from_model(_random_model(meter.device, _config(p)), meter.device,
                               "autocast", compile_unet=p.get("compile", False))
    weights = _weights_gb(pipe.model)
    if meter.cuda:  # the float32 weights before halving are no part of a run's peak
        torch.cuda.reset_peak_memory_stats(meter.device)
    baseline = meter.current_bytes()
    opts = _options(p)
    prompt = [SEED_COMMAND[1]]

    def sample(steps):
        return pipe.sample(prompt, dataclasses.replace(opts, steps=steps),
                           torch.Generator().manual_seed(1), progress=False)[0]
    sample(p.get("warmup_steps") or 1)  # the one-off CUDA set-up (and compile), in no figure
    latents = []
    wall, _ = meter.timed(lambda: latents.append(sample(opts.steps)))
    result = {"seconds": {"run": wall}, "sample_peak_gb": meter.peak_bytes() / GB,
              **_pool_figures(meter.device)}
    # the budget txt2img's decode would take now, given to it (exact: GB is a power of two),
    # so that the tiles reported are the tiles decoded
    z = latents[0] / pipe.model.scale_factor
    budget = (int(p["budget_gb"] * GB) if p.get("budget_gb")
              else default_budget(meter.device))
    opts = dataclasses.replace(opts, decode_budget_gb=budget / GB)
    sides = pipe.decode_tiles(z, opts)  # None: a whole decode
    tiles = 1 if sides is None else len(plan_axis(z.shape[2], sides[0], opts.overlap)) * len(
        plan_axis(z.shape[3], sides[1], opts.overlap))
    decode_wall, _ = meter.timed(lambda: pipe.decode(latents[0], opts, progress=False,
                                                     tiles=sides))
    result.update(decode_seconds=decode_wall, decode_budget_gb=budget / GB, decode_tiles=tiles,
                  side=p["side"], steps=p["steps"], baseline_gb=baseline / GB,
                  weights_gb=weights, peak_gb=meter.peak_bytes() / GB,
                  kernels=dict(pipe.sampling_kernels),
                  channels_last=pipe.kernels["channels_last"], card_gb=p.get("card_gb"),
                  compile_modes=p.get("compile_modes"))
    if meter.cuda:
        result["reserved_peak_gb"] = torch.cuda.max_memory_reserved(meter.device) / GB
    return result


# the text encoders' child names: LDM's (SD 1.x / 2.x), Stability's (SDXL)
TEXT_ENCODER_CHILDREN = ("cond_stage_model", "conditioner")


def _random_model(device, config):
    """The config's whole model with random float32 weights, initialised on `device` (fast on
    a card); `prepare_for_inference` then halves what `--precision autocast` halves."""
    import torch

    from ldm.modules.encoders.common import register_config_dir
    from ldm.util import instantiate_from_config, load_config

    register_config_dir(Path(config).resolve().parent)
    with torch.device(device):
        return instantiate_from_config(load_config(config).model).eval()


def _weights_gb(model):
    """GB of parameters and buffers per child of the model (UNet, text encoder(s), VAE)."""
    sizes = {}
    for name, child in model.named_children():
        tensors = [*child.parameters(), *child.buffers()]
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors) / GB
    return sizes


def write_random_checkpoint(path, device, config=FULL_CONFIG):
    """A checkpoint of the config's model (default: full-size SD 2.1) with random weights
    (initialised on `device`, which is fast), saved as the published .ckpt is:
    {"state_dict": ...}, float32."""
    import torch

    model = _random_model(device, config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    torch.save({"state_dict": state}, path)


def case_cli(p, meter):
    """Wall time of the seed's 1024² command (load + sample + decode), each run a fresh
    process: `runs` times (default 2) with the same checkpoint. The last run is the figure;
    the first one, whose libraries and files may come from a cold disk, is reported beside."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:  # the SD 2.x text encoder
        return {"skipped": "open_clip_torch is not installed"}
    runs = []
    with tempfile.TemporaryDirectory(dir=p.get("workdir")) as tmp:
        ckpt = Path(tmp) / "sd21-random.ckpt"
        start = time.perf_counter()
        write_random_checkpoint(ckpt, meter.device, _config(p))
        log(f"  cli: random checkpoint written in {time.perf_counter() - start:.0f}s "
            f"({ckpt.stat().st_size / GB:.1f} GB)")
        cmd = [sys.executable, str(REPO_ROOT / "scripts" / "txt2img.py"), *SEED_COMMAND,
               "--ckpt", str(ckpt), "--config", str(_config(p)), "--device", meter.device.type,
               "--outdir", str(Path(tmp) / "out"), "--timings", *p.get("extra", [])]
        for _ in range(p.get("runs", 2)):
            runs.append(_timed_command(cmd))
            if "error" in runs[-1]:
                return runs[-1]
    return {**runs[-1], "first_run": runs[0] if len(runs) > 1 else None,
            "command": "txt2img.py " + " ".join(SEED_COMMAND + p.get("extra", []))}


def _timed_command(cmd):
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"txt2img exited {proc.returncode}: {tail[0]}", "seconds": wall}
    return {"seconds": wall, "phases": _phases(proc.stderr)}


def _phases(stderr):
    """{phase: seconds} from txt2img's --timings line ("timings (s): startup 2.40, load 3.10,
    sample ..., total 9.80"); the wall time beyond "total" is the interpreter's exit."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("timings (s):"):
            pairs = (part.split() for part in line.split(":", 1)[1].split(","))
            return {name: float(value) for name, value in pairs}
    return {}


CASES = {"sample": case_sample, "whole": case_whole, "cli": case_cli}
ITEMS = ("decode", "sample", "cli")
TABLE_ITEMS = ITEMS + ("sdxl",)  # the table's row groups (sdxl: benchmark.py's own case)
# Asked for by name only (`--only card24`), never by default: two 4096² whole runs
OPT_IN_ITEMS = ("card24", "compiled")
CARD_GB = 24  # the common researcher card issue 11 must serve


# Where the seed's half-side tiling is measured beside the auto tiles (2048² dropped: the
# same ratio at 1024² says it, and the run must stay within ~4 minutes).
SEED_TILING_SIDES = (128,)
SWITCH_VARIANTS = {
    "reference": REFERENCE_KERNELS,
    "cudnn_benchmark": {**REFERENCE_KERNELS, "cudnn_benchmark": True},
    "native_norms": {**REFERENCE_KERNELS, "native_norms": True},
    "cudnn_attention": {**REFERENCE_KERNELS, "cudnn_attention": True},
}


def plan(args):
    """The GPU cases: (key, case name, params)."""
    cases, budget = [], args.decode_budget_gb or 10.0
    if "decode" in args.only:
        for side in (128, 256, 512):
            # "full": banded where the plain decoder's peak would exceed the budget (2048² and
            # 4096² at 10 GB; txt2img always bands); "plain" forces the plain decoder, at 2048²
            modes = ([("full", None), ("auto", "auto")]
                     + ([("seed", None)] if side in SEED_TILING_SIDES else [])
                     + ([("plain", None)] if side == 256 else []))
            for mode, tile in modes:
                cases.append((f"decode_{side}_{mode}", "decode", {
                    "tiny": False, "side": side,
                    "mode": mode if mode in ("full", "plain") else "tiled",
                    "overlap": 16 if side > 128 else 8, "tile_size": tile,
                    "repeats": 1 if side == 512 else 2, "budget_gb": budget}))
    if "sample" in args.only:
        steps, tau = args.sample_steps, round(args.sample_steps * 20 / 50)
        # In txt2img's layout: the reference kernels, each kernel switch alone, and txt2img's
        # defaults (every switch on), plain and re-dilated ...
        cases.append(("sample_1024", "sample", {
            "side": 128, "steps": steps, "repeats": 2,
            "variants": {**SWITCH_VARIANTS, "plain": {}, "dilated": {"dilate_tau": tau}}}))
        # ... then channels-last (off by default since run 2): alone and with every switch on
        cases.append(("sample_1024_channels_last", "sample", {
            "side": 128, "steps": steps, "repeats": 2, "channels_last": True,
            "variants": {"channels_last": REFERENCE_KERNELS, "all_channels_last": {}}}))
        if args.compile:
            cases.append(compiled_sample_case(steps))
        # whole runs as txt2img makes them (runs 1-2 ran channels-last, runs 1-6 held no text
        # encoder): the SD 2.1 experimental preset, then SDXL, the authors' 4096² headline
        cases.append(("sample_4096_preset", "whole", {
            "side": 512, "steps": args.preset_steps, "preset": "sd2.1_4096x4096_experimental",
            "warmup_steps": 1, "budget_gb": budget}))
        cases.append(("sample_sdxl_4096_preset", "whole", {
            "side": 512, "steps": args.preset_steps, "preset": "sdxl_4096x4096",
            "config": "configs/stable-diffusion/sd_xl_base.yaml", "warmup_steps": 1,
            "budget_gb": budget}))
    if "cli" in args.only:
        cases.append(("cli_1024", "cli", {"workdir": args.workdir}))
    if "card24" in args.only:
        cases += card_cases()
    if "compiled" in args.only and "sample" not in args.only:  # (--compile adds it there)
        cases.append(compiled_sample_case(args.sample_steps))
    return cases


def compiled_sample_case(steps):
    """The plain 1024² sample, the whole sampling loop, with the UNet compiled as `--compile`
    compiles it on the device (COMPILE_MODES); its first steps (the compile) are not timed."""
    return ("sample_1024_compile", "sample", {
        "side": 128, "steps": steps, "variants": {"plain": {}}, "repeats": 2,
        "compile": True, "warmup_steps": 3})


def card_cases(steps=3):
    """The 4096² experimental preset within a 24 GB per-process limit, the decode on its default
    budget: eager as txt2img runs it, then compiled as `--compile` compiles on CUDA plus CUDA
    graphs, whose private pool holds the UNet's memory through the decode. Its taus keep their
    share of the steps (2 of 3 dilated, as 40 of 50), so both the dilated steps' graphs and a
    plain one's are made."""
    from ldm.precision import COMPILE_MODES

    preset = {"side": 512, "steps": steps, "scale_taus": True,
              "preset": "sd2.1_4096x4096_experimental", "card_gb": CARD_GB}
    graphs = dict(COMPILE_MODES.get("cuda", {}), cuda_graphs=True)
    return [("card24_4096", "whole", preset),
            ("card24_4096_graphs", "whole", {**preset, "compile": True,
                                             "compile_modes": graphs})]


def _get(results, key, *path):
    value = results.get(key, {})
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _ratio(a, b):
    return a / b if a is not None and b else None


def _why(results, key):
    r = results.get(key, {})
    return r.get("error") or r.get("skipped")


def rows(results, items=TABLE_ITEMS):
    """Issue 11's table: (measure, value text, target, number or None, note), from the case
    results, for the items asked (`--only`; rows of items not run would only show dashes)."""
    parts = {"decode": _decode_rows, "sample": _sample_rows, "cli": _cli_rows,
             "sdxl": _sdxl_rows, "card24": _card_rows, "compiled": _compiled_rows}
    return [row for item in parts if item in items for row in parts[item](results)]


def _decode_rows(results):
    out = []
    for side, image in ((128, "1024²"), (256, "2048²")):
        # against the plain decoder where it ran beside the banded one (the faster of the two)
        full = (_get(results, f"decode_{side}_plain", "seconds")
                or _get(results, f"decode_{side}_full", "seconds"))
        for mode, label in (("seed", "seed's tiling"), ("auto", "auto tiles")):
            key = f"decode_{side}_{mode}"
            if mode == "seed" and side not in SEED_TILING_SIDES:
                continue
            tiled = _get(results, key, "seconds")
            tiles = _get(results, key, "tiles")
            out.append((f"tiled SyncGN / full decode, {image} ({label}, {tiles} tiles)",
                        _pair(tiled, full, "s"), "≤ 1.3x", _ratio(tiled, full),
                        _why(results, key) or _why(results, f"decode_{side}_full")))
    r = results.get("decode_256_full", {})
    out.append((f"full decode 2048², time / peak ({r.get('path')} decoder)", _time_peak(r),
                "≤ 12 GB", r.get("peak_gb"), _why(results, "decode_256_full")))
    plain = results.get("decode_256_plain", {})
    out.append(("full decode 2048², plain decoder, time / peak (for comparison)",
                _time_peak(plain), "–", plain.get("peak_gb"), _why(results, "decode_256_plain")))
    out.append(("full decode 2048², banded / plain decoder, time",
                _pair(r.get("seconds"), plain.get("seconds"), "s"), "≤ 1.1x: then banded always",
                _ratio(r.get("seconds"), plain.get("seconds")),
                _why(results, "decode_256_full") or _why(results, "decode_256_plain")))
    r = results.get("decode_512_full", {})
    out.append((f"full decode 4096², time / peak ({r.get('path')} decoder, budget "
                f"{_fmt(r.get('budget_gb'), '.0f')} GB)", _time_peak(r), "runs, ≤ 16 GB",
                r.get("peak_gb"), _why(results, "decode_512_full")))
    r = results.get("decode_512_auto", {})
    out.append((f"tiled SyncGN decode 4096², time / peak ({r.get('tiles')} tiles, budget "
                f"{_fmt(r.get('budget_gb'), '.0f')} GB)", _time_peak(r), "≤ 15 s / ≤ 12 GB",
                r.get("peak_gb"), _why(results, "decode_512_auto")))
    return out


def _preset_rows(results):
    out = []
    for key, name in (("sample_4096_preset", "4096² experimental preset"),
                      ("sample_sdxl_4096_preset", "SDXL sdxl_4096x4096 preset")):
        if key == "sample_sdxl_4096_preset" and key not in results:
            continue  # not planned (CPU smoke runs)
        r = results.get(key, {})
        step = (r.get("seconds") or {}).get("run")
        out.append((f"{name}, whole-run peak ({r.get('steps')} steps + tiled decode; "
                    f"{_fmt(step, '.1f')} s sampling, {_fmt(r.get('decode_seconds'), '.1f')} s "
                    f"decode; {_weights(r)})", _gb(r.get("peak_gb")), "≤ 24 GB",
                    r.get("peak_gb"), _why(results, key)))
    return out


def _card_rows(results):
    out = []
    for key, name in (("card24_4096", "eager"), ("card24_4096_graphs", "compiled, CUDA graphs")):
        r = results.get(key, {})
        out.append((f"4096² experimental preset within {CARD_GB} GB, {name}: peak reserved / "
                    f"allocated ({r.get('steps')} steps; {_weights(r)}; graph pool "
                    f"{_gb(r.get('graph_pool_gb'))}, {_gb(r.get('graph_pool_unused_gb'))} of it "
                    f"unused; decode {r.get('decode_tiles')} tiles, "
                    f"{_fmt(r.get('decode_seconds'), '.1f')} s, budget "
                    f"{_gb(r.get('decode_budget_gb'))})",
                    f"{_gb(r.get('reserved_peak_gb'))} / {_gb(r.get('peak_gb'))}",
                    "runs", r.get("reserved_peak_gb"), _why(results, key)))
    return out


def _weights(r):
    """"weights 2.6 GB, 0.7 of them text encoder(s)": what a whole run holds throughout."""
    sizes = r.get("weights_gb") or {}
    encoders = sum(gb for name, gb in sizes.items() if name in TEXT_ENCODER_CHILDREN)
    return (f"weights {_gb(sum(sizes.values()) if sizes else None)}, "
            f"{_fmt(encoders if sizes else None, '.1f')} of them text encoder(s)")


def _cli_rows(results):
    r = results.get("cli_1024", {})
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in (r.get("phases") or {}).items())
    first = (r.get("first_run") or {}).get("seconds")
    return [("CLI wall time, the seed's 1024² command (random full-size .ckpt"
             + (", the second run; the first took " + _fmt(first, ".1f") + " s" if first
                else "") + ")",
             _fmt(r.get("seconds"), ".1f") + " s" + (f" ({phases})" if phases else ""),
             "≤ 20 s", r.get("seconds"), _why(results, "cli_1024"))]


def _sdxl_rows(results):
    out = []
    for side, image in ((128, "1024²"), (256, "2048²")):  # only asked for: a 10 GB model
        key = f"sdxl_unet_{side}"
        if key in results:
            r = results[key]
            out.append((f"SDXL UNet CFG call, {image} (fp16 weights under autocast)",
                        _time_peak(r), "–", r.get("seconds"), _why(results, key)))
    return out


def _sample_rows(results):
    """The presets' whole-run peaks, then the 1024² sample rows: re-dilated / plain and the
    plain time with the device's defaults (txt2img's kernels and layout), then each switch,
    channels-last, all together (the defaults) and with channels-last or `--compile`, against
    the reference kernels."""
    fast = results.get("sample_1024", {})
    layout = results.get("sample_1024_channels_last", {})
    steps = fast.get("steps") or layout.get("steps")
    plain, dilated = _get(fast, "seconds", "plain"), _get(fast, "seconds", "dilated")
    why = _why(results, "sample_1024")
    # (figures written before the tau was recorded ran 20 of every 50 steps dilated)
    dilated_steps = fast.get("dilated_steps", steps and round(steps * 20 / 50))
    out = _preset_rows(results) + [(f"re-dilated / plain 1024² run ({dilated_steps} of {steps} "
            f"steps dilated)", _pair(dilated, plain, "s"), "≤ 1.05x", _ratio(dilated, plain),
            why),
           (f"plain 1024² {steps}-step sample (default kernels: {_kernel_text(fast)})",
            _fmt(plain, ".2f") + " s", "≤ 1.3 s (50 steps)", plain, why)]
    reference = _get(fast, "seconds", "reference")
    layout_why = _why(results, "sample_1024_channels_last")
    measured = [(name.replace("_", "-"), _get(fast, "seconds", name), why)
                for name in SWITCH_VARIANTS if name != "reference"]
    measured += [("channels-last", _get(layout, "seconds", "channels_last"), layout_why),
                 ("all together", plain, why),
                 ("all + channels-last", _get(layout, "seconds", "all_channels_last"),
                  layout_why)]
    if "sample_1024_compile" in results:
        measured.append(("all + torch.compile",
                         _get(results, "sample_1024_compile", "seconds", "plain"),
                         _why(results, "sample_1024_compile")))
    for name, t, note in measured:
        text = _pair(t, reference, "s") + (_warmup_note(fast) if name == "cudnn-benchmark"
                                           else "")
        out.append((f"plain 1024² {steps}-step sample, {name} / reference kernels", text,
                    "< 1x (kept where faster)", _ratio(t, reference), note))
    return out


def _compiled_rows(results):
    """The sample target's row for `--compile` (`--only compiled`): the whole loop timed, not
    only its UNet calls as gpu_speed.py times them."""
    key = "sample_1024_compile"
    t, steps = _get(results, key, "seconds", "plain"), results.get(key, {}).get("steps")
    return [(f"plain 1024² {steps}-step sample with --compile (the whole loop; the compile "
             "not counted)", _fmt(t, ".2f") + " s", "≤ 1.3 s (50 steps)", t, _why(results, key))]


def _warmup_note(result):
    """cuDNN autotuning is paid once per run, in its first steps (a single image pays it in
    full): the warm-up's time beside the reference kernels' warm-up."""
    tuned, plain = (_get(result, "warmup_seconds", k) for k in ("cudnn_benchmark", "reference"))
    if tuned is None or plain is None:
        return ""
    return f" (warm-up steps: {tuned:.2f} s / {plain:.2f} s)"


def _kernel_text(result):
    on = [k.replace("_", "-") for k, v in (result.get("kernels", {}).get("plain") or {}).items()
          if v]
    return ", ".join((["channels-last"] if result.get("channels_last") else []) + on) or "none"


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def _gb(value):
    return _fmt(value, ".2f") + " GB"


def _pair(a, b, unit):
    if a is None or b is None:
        return "–"
    return f"{a:.2f} {unit} / {b:.2f} {unit} = {a / b:.2f}x"


def _time_peak(r):
    return f"{_fmt(r.get('seconds'), '.2f')} s / {_gb(r.get('peak_gb'))}"


def markdown(results, card, items=TABLE_ITEMS):
    lines = [f"GPU: {card}", "", "| measured | value | target |", "| --- | --- | --- |"]
    for label, text, target, _, why in rows(results, items):
        lines.append(f"| {label} | {text}{f' ({why})' if why else ''} | {target} |")
    return "\n".join(lines)


def summary(results, items=TABLE_ITEMS):
    """JSON-friendly rows: {measure: {"value": number or None, "text", "target", "note"}}."""
    return {label: {"value": value, "text": text, "target": target, "note": why}
            for label, text, target, value, why in rows(results, items)}


def card_name(results):
    """The card, as the cases saw it (the parent process never opens a CUDA context)."""
    names = {r["card"] for r in results.values() if isinstance(r, dict) and "card" in r}
    return ", ".join(sorted(names)) or "unknown card"


def saved_table(path):
    """The table of a saved `--json` report, for the items it ran."""
    report = json.loads(Path(path).read_text())
    return markdown(report["details"], report.get("card", "?"),
                    tuple(report.get("items", TABLE_ITEMS)))


def main(argv=None):
    """A quick look at a saved report: python scripts/benchmark_gpu.py bench.json"""
    import argparse

    parser = argparse.ArgumentParser(description="The table of a saved `benchmark.py --device cuda "
                                       "--json` report.")
    parser.add_argument("report", help="the report's JSON file")
    path = Path(parser.parse_args(argv).report)
    try:
        print(saved_table(path))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot read the report {path}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
