"""Text-to-image with ScaleCrafter: a thin command line over ldm.pipeline.

Bad input is refused with one line on stderr and a non-zero exit (`--debug` shows the
traceback): flags, sizes, files, settings and the output folder before the checkpoint is read,
a checkpoint that is no checkpoint (or unsafe) before the model is built, one that does not fit
the config (missing weights, wrong shapes) before the model is used. Exit status: 0 done,
1 refused or failed, 2 bad flags, 130 interrupted (Ctrl-C; 143 for SIGTERM: the finished
images are kept, nothing partial is left)."""
import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
MIN_PYTHON = (3, 9)  # argparse.BooleanOptionalAction; the seed's setup named 3.8


def python_too_old(version=sys.version_info) -> str:
    """The one-line refusal for a Python older than MIN_PYTHON ('' when new enough)."""
    if tuple(version[:2]) >= MIN_PYTHON:
        return ""
    return (f"error: txt2img needs Python {'.'.join(map(str, MIN_PYTHON))} or newer, this is "
            f"{version[0]}.{version[1]} (see README: Manual setup)")


if python_too_old():
    sys.exit(python_too_old())

from ldm.cli import (SETTINGS_FILES, OneLineParser, UsageError,  # noqa: E402  (torch-free)
                     device_arg, device_type, remove_if_empty, repository_fallback,
                     tile_size_arg)
from ldm.families import family_values_text  # noqa: E402  (torch-free)
from ldm.scalecrafter.presets import list_presets  # noqa: E402  (torch-free)


class HelpWithDefaults(argparse.HelpFormatter):
    """--help names each flag's default, where it has one and its text does not already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS \
                or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def name_family_defaults(parser):
    """Each flag's help names its default and the families' own (ldm.families), if any."""
    for action in parser._actions:
        own = family_values_text(action.dest)
        if own:
            action.help = f"{action.help} (default: {action.default}; {own})"


def build_parser(suppress_defaults=False):
    p = OneLineParser(
        formatter_class=HelpWithDefaults,
        description="Generate images with Stable Diffusion, at higher resolutions with "
                    "ScaleCrafter (re-dilation, dispersion, noise-damped CFG, tiled decoding).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    add = p.add_argument
    add("--prompt", type=str, default=d("a professional photograph of an astronaut riding a "
                                        "triceratops"), help="the prompt to render")
    add("--from-file", type=str, help="read prompts from this file, one a line")
    add("--outdir", type=str, default=d("outputs/txt2img-samples"), help="where samples go")
    add("--steps", type=int, default=d(50), help="number of sampling steps")
    sampler = p.add_mutually_exclusive_group()
    sampler.add_argument("--ddim", action="store_true",
                         help="use DDIM sampling (the default; sets aside a preset's sampler)")
    sampler.add_argument("--plms", action="store_true", help="use PLMS sampling (default: DDIM)")
    sampler.add_argument("--dpm", action="store_true", help="use DPM-Solver++ (2M) sampling")
    add("--fixed_code", action="store_true", help="the same starting noise for every batch")
    add("--ddim_eta", type=float, default=d(0.0), help="DDIM eta (0 = deterministic DDIM)")
    add("--timestep_spacing", choices=["uniform", "leading", "trailing"], default=d("uniform"),
        help="DDIM's and PLMS's timesteps: uniform (LDM's, the seed's: 31 steps for --steps 30) "
             "or leading (diffusers', the authors' SD 1.5 and SDXL scripts: exactly --steps), "
             "the same where --steps divides 1000; trailing (diffusers') starts at t = 999, for "
             "few-step models such as SD-Turbo")
    add("--n_iter", type=int, default=d(3), help="sample this often")
    add("--H", type=int, default=d(512), help="image height, pixels (a multiple of 64)")
    add("--W", type=int, default=d(512), help="image width, pixels (a multiple of 64)")
    add("--C", type=int, default=d(4), help="latent channels")
    add("--f", type=int, default=d(8), help="downsampling factor (8 for SD)")
    add("--n_samples", type=int, default=d(3), help="images per prompt per iteration (batch)")
    add("--n_rows", type=int, default=d(0), help="images in each grid row (default: n_samples)")
    add("--scale", type=float, default=d(9.0), help="classifier-free guidance scale")
    add("--negative_prompt", type=str, default=d(""),
        help="the unconditional prompt of classifier-free guidance (default: empty)")
    add("--config", type=str, default=d("configs/stable-diffusion/v2-inference.yaml"),
        help="model config (standard LDM yaml); a relative path not found here is looked "
             "up in the repository")
    add("--ckpt", type=str, help="model checkpoint (.ckpt or .safetensors), a diffusers "
                                 "pipeline folder (unet/, vae/, text_encoder/, ...), or the "
                                 "model id of one in the Hugging Face cache (org/name)")
    add("--vae", type=str, default=None,
        help="a standalone VAE file (.ckpt or .safetensors, e.g. "
             "vae-ft-mse-840000-ema-pruned), diffusers VAE folder or its model id in the "
             "Hugging Face cache, whose weights replace the checkpoint's own VAE")
    add("--seed", type=int, default=d(42), help="seed for reproducible sampling")
    add("--rng", choices=["cpu", "device"], default=d("cpu"),
        help="where noise is drawn: cpu (a seed gives the same image on every device) or "
             "device (the --device's generator, as the seed's code draws: its image for a "
             "seed on CUDA)")
    add("--precision", type=str, choices=["full", "autocast"], default=d("autocast"),
        help="full: float32; autocast: UNet in fp16 on CUDA, bf16 on the CPU")
    add("--repeat", type=int, default=d(1), help="repeat each prompt of --from-file this often")
    add("--device", type=device_arg, default=d("cpu"),
        help="cpu, cuda (the first GPU torch sees), cuda:N (GPU N) or auto (CUDA where torch "
             "sees it, else the CPU)")
    add("--compile", action="store_true",
        help="torch.compile the UNet: compiled once, in the first step, whatever the "
             "re-dilation plan and batch size")
    add("--channels_last", action=argparse.BooleanOptionalAction,
        help="UNet in channels-last memory format (default: ldm/precision.py's choice for "
             "the device: off, as measured on CUDA; on with --compile on CUDA)")
    add("--fast_kernels", action=argparse.BooleanOptionalAction,
        help="CUDA: cuDNN autotuning and the UNet's norms in the activations' dtype "
             "(default: on with CUDA; --no-fast_kernels for the reference kernels)")
    add("--cudnn_attention", action=argparse.BooleanOptionalAction,
        help="while sampling, attention tries cuDNN's fused kernel before FlashAttention "
             "(default: ldm/precision.py's choice for the device: on with CUDA)")
    g = p.add_argument_group("ScaleCrafter: re-dilation")
    g.add_argument("--dilate", type=float, help="dilation factor for the UNet's 3x3 convs")
    g.add_argument("--dilate_tau", type=int, default=d(20),
                   help="re-dilate during this many of the noisiest steps")
    g.add_argument("--dilate_skip", type=int, default=d(4),
                   help="keep the first/last K input/output blocks undilated")
    g.add_argument("--progressive_dilate", action=argparse.BooleanOptionalAction,
                   default=d(False),
                   help="factor max(ceil(D*(tau-i)/tau), 2) at step i")
    g.add_argument("--dilate_settings", type=str, help="per-layer dilation file (name:factor)")
    g = p.add_argument_group("ScaleCrafter: ultra resolution")
    g.add_argument("--ndcfg_dilate_settings", type=str,
                   help="dilation of the noise-damped unconditional pass")
    g.add_argument("--ndcfg_tau", type=int, default=d(0), help="steps with noise-damped CFG")
    g.add_argument("--disperse_settings", type=str, help="convs whose kernels are dispersed")
    g.add_argument("--disperse_transform", type=str, help="dispersion transform (.npy or .mat)")
    g.add_argument("--inflate_tau", type=int, default=d(0), help="steps with dispersed kernels")
    g.add_argument("--preset", type=str,
                   help=f"a resolution preset ({', '.join(list_presets())}); flags override it")
    g.add_argument("--freeu", type=float, nargs=4, metavar=("B1", "B2", "S1", "S2"),
                   help="FreeU backbone/skip factors; the authors': SD 1.5 1.2 1.4 0.9 0.2, "
                        "SD 2.1 1.1 1.2 0.9 0.2, SDXL 1.1 1.2 0.6 0.4")
    g = p.add_argument_group("tiled VAE decoding")
    g.add_argument("--tiled_decoding", action=argparse.BooleanOptionalAction, default=d(False),
                   help="decode in overlapping tiles (--no-tiled_decoding undoes a preset's)")
    g.add_argument("--overlap", type=int, default=d(24),
                   help="tile overlap, latent pixels (even, smaller than the tile)")
    g.add_argument("--sync_gn", action=argparse.BooleanOptionalAction, default=d(False),
                   help="the decoder's ResNet and output GroupNorms take their statistics "
                        "over all tiles (attention's stays per tile, as in the seed)")
    g.add_argument("--tile_size", type=tile_size_arg,
                   help="tile side in latent pixels, HxW (an image's `Tiles`), or 'auto': the "
                        "fewest tiles that fit half of --decode_budget_gb (default: half the "
                        "side, the seed's tiling)")
    g.add_argument("--decode_budget_gb", type=float,
                   help="device memory a decode may use, GiB (default: 80%% of what is free); "
                        "beyond it the decode recomputes rather than stores")
    g = p.add_argument_group("outputs")
    g.add_argument("--save_latent", action="store_true",
                   help="also write each final latent as NNNNN.npy (float32)")
    g.add_argument("--metadata", choices=["png", "json"], default=d("png"),
                   help="png: parameters in the PNG; json: also a sidecar NNNNN.json")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--timings", action="store_true",
                   help="print the seconds spent starting up, loading, sampling, decoding and "
                        "writing, and the process's total")
    if not suppress_defaults:
        name_family_defaults(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    if args.from_file and "prompt" in explicit:
        raise UsageError("--prompt and --from-file exclude each other")
    if "repeat" in explicit and not args.from_file:
        raise UsageError("--repeat repeats the prompts of --from-file: give one")
    given = set(explicit)
    if args.preset:  # the preset yields to the flags given on the command line
        given |= apply_preset(args, args.preset, explicit, parser)
    if str(args.config).strip():  # (an empty one is refused by name later: Path("") is ".")
        args.config = str(repository_fallback(args.config))
    for name in SETTINGS_FILES:  # as the config: relative paths not found here are the repo's
        if getattr(args, name):
            setattr(args, name, str(repository_fallback(getattr(args, name))))
    args.given = given  # what the model family's defaults must not replace
    args.explicit = explicit
    args.created_dirs = []  # output folders this run creates (removed if it makes nothing)
    return args


def sampler_name(args) -> str:
    """The sampler the switches choose (both given is refused with the other options)."""
    return "dpm" if args.dpm else "plms" if args.plms else "ddim"


def apply_family_defaults(args, config):
    """The model family's defaults (ldm.families) for the options no flag and no preset set
    (args.given). Returns the note line that says so ('' if none), for once the inputs pass:
    a refused run says one line, its error."""
    from ldm.families import label
    from ldm.pipeline import family_defaults
    from ldm.util import config_family

    family = config_family(config)
    applied = {name: value for name, value in family_defaults(family, sampler_name(args)).items()
               if name not in args.given and getattr(args, name) != value}
    for name, value in applied.items():
        setattr(args, name, value)
    if not applied:
        return ""
    flags = " ".join(f"--{name} {value:g}" if isinstance(value, float) else
                     f"--{name} {value}" for name, value in applied.items())
    return f"note: {label(family)} model: {flags} (its authors' defaults; flags override)"


def preset_steps_warning(args, opts) -> str:
    """One line when a preset's taus are run with other --steps (presets.steps_mismatch), one
    more when its factors are run at another size (presets.scale_mismatch)."""
    from ldm.scalecrafter.presets import scale_mismatch, steps_mismatch

    given = getattr(args, "explicit", ())
    texts = [steps_mismatch(getattr(args, "preset", None), getattr(args, "preset_steps", None),
                            opts, given, f"--steps {opts.steps}")]
    preset = getattr(args, "preset_object", None)
    if preset is not None:
        texts.append(scale_mismatch(preset, opts, given, f"--W {opts.W} --H {opts.H}"))
    return "\n".join(f"warning: {text}" for text in texts if text)


def apply_preset(args, name, explicit, parser=None):
    """Preset values replace defaults; flags given on the command line win, and set aside the
    preset values they exclude (ldm.scalecrafter.presets.applied_values). Each value is
    checked as its flag's would be (with `parser`'s options). Returns the names it set."""
    from ldm.scalecrafter.presets import applied_values, read_preset

    try:
        preset = read_preset(name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    # Which models the preset is made for: checked against the config, not flags.
    args.preset_family, args.preset_steps = preset.family, preset.steps
    args.preset_object = preset
    if parser is not None and preset.steps is not None:
        args.preset_steps = preset_value(parser, "steps", preset.steps, preset.path)
    for key in preset.values:
        if not hasattr(args, key) and key != "sampler":
            raise UsageError(f"preset {preset.path} sets unknown option {key!r}")
    given = {key: getattr(args, key) for key in explicit}
    if args.ddim or args.plms or args.dpm:
        given["sampler"] = sampler_name(args)
    applied = applied_values(preset, given)
    for key, value in applied.items():
        if key == "sampler":  # (the preset's choice, in the switches' terms)
            args.plms, args.dpm = value == "plms", value == "dpm"
            continue
        if parser is not None:
            value = preset_value(parser, key, value, preset.path)
        setattr(args, key, value)
    return set(applied)


def preset_value(parser, key, value, path):
    """A preset's value as its flag would take it: a bool for a switch, the flag's type
    (a number, a choice, a tile size, ...) for a value, a list of the right length for a flag
    of several; UsageError naming the preset and option otherwise."""
    action = next(a for a in parser._actions if a.dest == key)

    def bad(expected):
        return UsageError(f"preset {path}: {key} must be {expected}, got {value!r}")

    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value is None:
        if action.default is not None:
            raise bad("set (the flag has no 'off')")
        return value
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            raise bad(f"a list of {action.nargs}")
        return [one_value(action, v, lambda each: bad(f"a list of {action.nargs}, each {each}"))
                for v in value]
    if action.type is tile_size_arg and isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = "x".join(map(str, value))  # [h, w], as the API's (h, w) tuple: HxW
    return one_value(action, value, bad)


TYPE_NAMES = {int: "an integer", float: "a number", str: "text"}


def one_value(action, value, bad):
    """One preset value through its flag's type and choices."""
    kind = TYPE_NAMES.get(action.type, "a value its flag takes")
    if isinstance(value, (bool, list, dict)):
        raise bad(kind)
    try:
        value = action.type(str(value)) if action.type else value
    except ValueError:
        raise bad(kind) from None
    except argparse.ArgumentTypeError as err:  # the flag's own parser says what it takes
        raise bad(str(err).split(", got")[0].replace("expected ", "")) from None
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return value


def options_from_args(args):
    from ldm.pipeline import GenerationOptions

    sampler = sampler_name(args)
    if args.plms and args.dpm:
        raise UsageError("choose one of --plms and --dpm")
    # every option is the flag of its name, but for the sampler (two switches) and FreeU's tuple
    given = {f.name: getattr(args, f.name) for f in fields(GenerationOptions)
             if hasattr(args, f.name)}
    return GenerationOptions(**{**given, "sampler": sampler,
                                "freeu": tuple(args.freeu) if args.freeu else None})


def check_counts(args):
    for name in ("n_iter", "n_samples", "repeat"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")


def read_prompts(args):
    """Batches of prompts, as the LDM scripts chunk them (n_samples per batch); a file's blank
    lines are skipped."""
    check_counts(args)
    if args.from_file:
        path = Path(args.from_file)
        if not path.exists():
            raise UsageError(f"prompt file {path} does not exist")
        if not path.is_file():
            raise UsageError(f"prompt file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise UsageError(f"cannot read prompt file {path}: it is not UTF-8 text "
                             f"(byte {err.start})") from None
        except OSError as err:
            raise UsageError(f"cannot read prompt file {path}: {err.strerror or err}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"prompt file {path} has no prompts")
        prompts = [p for p in lines for _ in range(args.repeat)]
        return [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    # an empty prompt is allowed, as in the seed: a sample conditioned on no text
    return [[args.prompt or ""] * args.n_samples]


def check_not_a_missing_model_id(given, what):
    """A model id (org/name) that is neither a path here nor in the Hugging Face cache."""
    from ldm.diffusers_layout import REPO_ID, hub_cache
    if REPO_ID.fullmatch(given) and not Path(given).exists():
        raise UsageError(f"{what} {given} does not exist, as a file or as a model in the "
                         f"Hugging Face cache ({hub_cache()}; this tool downloads nothing)")


def check_readable_file(path, what, folder_hint=""):
    """A file that exists, is a file, and can be opened; else a UsageError naming `what`."""
    if not str(path).strip():  # Path("") is ".", the current folder
        raise UsageError(f"{what}: an empty path was given")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file{folder_hint}")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror or err}") from None
    return path, first


def check_config(path):
    """The config must be an LDM config: a `model` section whose `target` can be imported."""
    from omegaconf import DictConfig

    from ldm.util import get_obj_from_str, load_config

    check_readable_file(path, "config file")
    config = load_config(path)
    model = config.get("model") if isinstance(config, DictConfig) else None
    if not isinstance(model, DictConfig) or not isinstance(model.get("target"), str):
        raise UsageError(f"config file {path} is not an LDM model config: it has no "
                         "'model.target' (e.g. ldm.models.diffusion.ddpm.LatentDiffusion)")
    params = model.get("params")
    if params is not None and not isinstance(params, DictConfig):
        raise UsageError(f"config file {path}: 'model.params' is not a mapping")
    get_obj_from_str(model.target)  # ConfigError with one line if it cannot be imported
    check_config_parts(path, config)
    return config


# Numbers of a model config's params that are used only late (the VAE's scale at decode time)
CONFIG_NUMBERS = ("scale_factor", "linear_start", "linear_end", "timesteps")


def check_config_parts(path, config):
    """The UNet and VAE sections a model needs, and its schedule and scale numbers, checked
    before anything is built."""
    from omegaconf import DictConfig

    from ldm.util import get_obj_from_str, part_configs

    params = config.model.get("params") or {}
    unet_key = getattr(get_obj_from_str(config.model.target), "unet_config_key", "unet_config")
    for node, key in zip(part_configs(config), (unet_key, "first_stage_config")):
        if not isinstance(node, DictConfig) or not isinstance(node.get("target"), str):
            raise UsageError(f"config file {path} has no 'model.params.{key}' with a target")
    for key in CONFIG_NUMBERS:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"config file {path}: 'model.params.{key}' must be a number, got "
                             f"{value!r}")


def check_preset_family(args, config):
    """A preset is tuned for one model family: refuse it with a model of another."""
    from ldm.util import config_family

    wanted = getattr(args, "preset_family", None)
    if wanted is None:
        return
    family = config_family(config)
    if family != wanted:
        raise UsageError(f"preset {args.preset} is made for {wanted} models; the config "
                         f"{args.config} is for {family or 'unknown-family'} models")


def preset_size_warning(args, config) -> str:
    """One line when the preset is tuned for models trained at another size than the
    config's (presets.size_mismatch), else ''."""
    from ldm.families import trained_side
    from ldm.scalecrafter.presets import size_mismatch
    from ldm.util import config_family, part_configs

    preset = getattr(args, "preset_object", None)
    if preset is None:
        return ""
    levels = _param(part_configs(config)[1], "ddconfig", "ch_mult")
    side = trained_side(config_family(config), (config.model.get("params") or {}).get(
        "image_size"), 2 ** (len(levels) - 1) if levels else args.f)
    text = size_mismatch(preset, side)
    return f"warning: {text}" if text else ""


def _param(node, *keys):
    """node.params[keys...], or None where the config does not say."""
    value = node.get("params") if hasattr(node, "get") else None
    for key in keys:
        value = value.get(key) if hasattr(value, "get") else None
    return value


def check_latent_shape(config, opts):
    """--C and --f must be the model's, as far as its config says them: the UNet's input
    channels, and 2 for each VAE level after the first."""
    from ldm.pipeline import check_latent_format
    from ldm.util import part_configs

    unet_config, vae_config = part_configs(config)
    levels = _param(vae_config, "ddconfig", "ch_mult")
    takes, gives = _param(unet_config, "in_channels"), _param(unet_config, "out_channels")
    if takes and gives and takes != gives:  # the latent plus an image's channels
        raise UsageError(f"the config's UNet takes {takes} channels and gives {gives}: a model "
                         f"conditioned on an image (inpainting, depth, InstructPix2Pix), which "
                         f"txt2img cannot run")
    check_latent_format(opts, gives or takes or opts.C,
                        2 ** (len(levels) - 1) if levels else opts.f)


def check_settings_files(config, opts):
    """Settings files name UNet convs: check them against the config's UNet, built on the meta
    device (no memory, no weights), so that a typo costs no checkpoint load. Returns the
    settings (names and factors only, valid for the loaded model too), or None."""
    if not (opts.dilate_settings or opts.ndcfg_dilate_settings or opts.disperse_settings):
        return None
    from omegaconf import DictConfig

    from ldm.compat import meta_device
    from ldm.scalecrafter.settings import build_settings
    from ldm.util import instantiate_from_config, part_configs

    unet_config, _ = part_configs(config)
    if not isinstance(unet_config, DictConfig):
        return None  # not the usual layout: the settings are checked once the model is loaded
    with meta_device():
        unet = instantiate_from_config(unet_config)
    return build_settings(unet, opts)


def check_numbers(args):
    """The numbers GenerationOptions.validate does not see: counts, grid rows, and the overlap
    even where it would do nothing (without --tiled_decoding)."""
    check_counts(args)
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must not be negative, got {args.n_rows}")
    if args.overlap < 0 or args.overlap % 2:
        raise UsageError(f"--overlap must be even and non-negative, got {args.overlap}")
    if not str(args.outdir).strip():
        raise UsageError("--outdir must not be empty")
    explicit = getattr(args, "explicit", ())
    # (their defaults are always set: only a value given for nothing is refused)
    if "dilate_skip" in explicit and args.dilate is None:
        raise UsageError("--dilate_skip applies to --dilate's uniform re-dilation (a settings "
                         "file names its convs itself)")
    if "dilate_tau" in explicit and args.dilate is None and not args.dilate_settings:
        raise UsageError("--dilate_tau counts the steps of a re-dilation, and there is none: "
                         "give --dilate, --dilate_settings or a preset")
    for settings, tau in (("ndcfg_dilate_settings", "ndcfg_tau"),
                          ("disperse_settings", "inflate_tau")):
        if settings in explicit and getattr(args, settings) and getattr(args, tau) == 0:
            raise UsageError(f"--{settings} acts for --{tau} steps, and --{tau} is 0: give "
                             f"--{tau} N")


def check_device(device: str) -> None:
    """--device cuda or cuda:N: one that torch sees here."""
    import torch

    from ldm.pipeline import cuda_device_problem

    problem = cuda_device_problem(torch.device(device))
    if problem:
        raise UsageError(f"--device {device} was asked for, but {problem}")


def check_inputs(args, opts, config):
    """Everything that can be checked without loading the checkpoint, cheapest first (the
    config, `check_config`'s, was read already). Returns the ScaleCrafter settings when they
    could be read already (else None)."""
    check_numbers(args)
    opts.validate()
    if args.device != "cpu":  # auto is decided here, where torch is imported anyway
        import torch
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            check_device(args.device)
    if not args.ckpt:
        raise UsageError("--ckpt is required (see README: Checkpoints)")
    from ldm.diffusers_layout import checkpoint_path, is_pipeline_folder
    args.ckpt = str(checkpoint_path(args.ckpt))  # (a model id: the Hugging Face cache's)
    check_not_a_missing_model_id(args.ckpt, "checkpoint")
    part, folder = Path(args.ckpt).parent.name, Path(args.ckpt).parent.parent
    if part in ("unet", "vae", "text_encoder", "text_encoder_2") and is_pipeline_folder(folder):
        raise UsageError(f"checkpoint {args.ckpt} is the {part} of the diffusers pipeline "
                         f"folder {folder}: give that folder as --ckpt")
    first = is_pipeline_folder(args.ckpt) or check_readable_file(
        args.ckpt, "checkpoint file", " (a diffusers pipeline folder holds unet/, vae/ and "
        "text_encoder/; else give a single-file .ckpt / .safetensors)")[1]
    if not first:
        raise UsageError(f"checkpoint {args.ckpt} is empty (0 bytes)")
    if args.vae is not None:
        from ldm.diffusers_layout import vae_file
        if str(args.vae).strip():  # (a folder: its file, which the images then name)
            args.vae = str(vae_file(args.vae))
        check_not_a_missing_model_id(args.vae, "--vae")
        check_readable_file(args.vae, "--vae file")
    check_preset_family(args, config)
    check_latent_shape(config, opts)
    for name in SETTINGS_FILES:
        value = getattr(args, name)
        if value:
            check_readable_file(value, f"--{name} file")
    settings = check_settings_files(config, opts)
    from ldm.outputs import ensure_writable_dir
    # the one check that creates something (undone if the run is interrupted before an image)
    ensure_writable_dir(Path(args.outdir) / "samples", args.created_dirs)
    return settings


def seed_everything(seed):
    """What lightning's seed_everything(seed, workers=False) does, without importing lightning
    (3.7 s): the global RNGs of Python, numpy and torch (CUDA included), and the environment
    variables it leaves for subprocesses."""
    import os
    import random

    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    os.environ["PL_SEED_WORKERS"] = "0"
    return seed


def process_seconds():
    """Seconds since this process started (Linux: /proc, at the kernel clock tick), else None."""
    import os

    try:
        with open("/proc/self/stat") as f:  # field 22 (starttime), after the ")" of the name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class PhaseTimer:
    """Seconds spent per phase (load, sample, decode, write), for --timings, after the start-up
    (interpreter, imports, input checks) and up to the report (total). A phase ends when the
    device has finished its work, so queued kernels are charged to the phase that queued
    them."""

    def __init__(self, device, enabled):
        self.device, self.enabled, self.seconds = device, enabled, {}
        self.startup = process_seconds() if enabled else None

    @contextmanager
    def phase(self, name):
        import time

        start = time.perf_counter()
        yield
        if self.enabled and device_type(self.device) == "cuda":
            import torch
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def report(self):
        if not self.enabled:
            return
        parts = dict(self.seconds)
        total = process_seconds()
        if self.startup is not None and total is not None:
            parts = {"startup": self.startup, **parts, "total": total}
        text = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"timings (s): {text}", file=sys.stderr, flush=True)


def use_fast_pinned_memory():
    """Tiles a tiled decode keeps in host memory are pinned: let torch pin them with threads
    (see ldm.scalecrafter.memory.fast_pinned_allocator_conf)."""
    import os

    import torch

    from ldm.scalecrafter.memory import fast_pinned_allocator_conf
    conf = fast_pinned_allocator_conf(os.environ, torch.__version__, os.cpu_count() or 1)
    if conf is not None:
        os.environ[conf[0]] = conf[1]


def run(args):
    from ldm.hashing import BackgroundShortHash
    from ldm.outputs import OutputWriter, WriteError, input_file_hashes

    config = check_config(args.config)  # its family's defaults come before the options
    notes = [apply_family_defaults(args, config)]
    opts = options_from_args(args)
    batches = read_prompts(args)
    settings = check_inputs(args, opts, config)  # settings files read once (one warning at most)
    if device_type(args.device) == "cuda":  # (auto is decided by now) before CUDA starts
        use_fast_pinned_memory()
    ckpt_hash = BackgroundShortHash(args.ckpt)  # for the metadata; overlaps loading and sampling
    file_hashes = input_file_hashes(args)  # the other files, as just read (not after the load)
    timer = PhaseTimer(args.device, args.timings)
    pipe = load_pipeline(args, timer)
    if settings is None:
        settings = pipe.settings_for(opts)  # reads settings files: fails before sampling starts
    notes += [preset_size_warning(args, config), preset_steps_warning(args, opts)]
    for note in filter(None, notes):  # once the model loaded: a refused run says one line
        print(note, file=sys.stderr)
    if args.compile:  # else the first step sits at 0% for a minute or more, unexplained
        print("note: --compile: the first step compiles the UNet (minutes the first time; "
              "torch's on-disk cache makes later runs faster)", file=sys.stderr, flush=True)
    writer = OutputWriter(args.outdir, args, opts, ckpt_hash, pipe.kernels, file_hashes)
    try:
        make_images(args, pipe, opts, settings, batches, writer, timer)
        timer.report()
    except WriteError as err:  # a full disk: what was kept matters as much as what failed
        writer.discard_partial_files()
        if args.debug:
            raise
        if writer.count == 0:
            remove_if_empty(args.created_dirs)
        kept = (f"; kept {writer.count} finished image(s) in {writer.outdir}: "
                f"{writer.summary()}" if writer.count else "; no image was kept")
        print(f"error: {err.strerror}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        writer.discard_partial_files()
        if args.debug:
            raise
        try:
            writer.save_grid(grid_rows(args))  # of the images kept, if any
        except (OSError, KeyboardInterrupt):  # the grid is a courtesy: the exit stays 130/143
            writer.discard_partial_files()
        if writer.count == 0:
            remove_if_empty(args.created_dirs)
            print("interrupted: no image was made", file=sys.stderr)
        else:
            print(f"interrupted: kept {writer.count} finished image(s) in {writer.outdir}: "
                  f"{writer.summary()}", file=sys.stderr)
        return interrupted_status(stop)
    print(f"Your samples are ready and waiting for you here:\n{writer.outdir}\nEnjoy.")
    print(f"This run wrote {writer.summary()}.")
    return 0


def load_pipeline(args, timer):
    """The model on its device, laid out as the flags say. A full-size load takes seconds to
    minutes, so it says what it loads (on stdout: stderr is for warnings and errors)."""
    from ldm.diffusers_layout import is_pipeline_folder, pipeline_files
    from ldm.pipeline import Pipeline

    files = [f for part in pipeline_files(args.ckpt).values() for f in part] \
        if is_pipeline_folder(args.ckpt) else [args.ckpt]
    nbytes = sum(os.path.getsize(f) for f in files)
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
    print(f"Loading {args.ckpt} ({size}) with {args.config} on {args.device}", flush=True)
    with timer.phase("load"):
        return Pipeline.load(args.config, args.ckpt, device=args.device,
                             precision=args.precision, channels_last=args.channels_last,
                             compile_unet=args.compile, cudnn_benchmark=args.fast_kernels,
                             native_norms=args.fast_kernels,
                             cudnn_attention=args.cudnn_attention, vae_encoder=False,
                             vae_path=args.vae)


def grid_rows(args) -> int:
    """Images per row of the grid: --n_rows, or one batch a row."""
    return args.n_rows or args.n_samples


def make_images(args, pipe, opts, settings, batches, writer, timer):
    """n_iter rounds over the prompt batches, from one seeded noise stream: sample, decode and
    write each batch; the grid goes with the last one."""
    from ldm.progress import progress_bar

    seed_everything(args.seed)
    generator = pipe.noise_generator(opts)
    x_T = pipe.initial_noise(opts, args.n_samples, generator) if args.fixed_code else None
    left = args.n_iter * len(batches)
    # (a bar over one round or one batch only adds lines)
    for _ in progress_bar(range(args.n_iter), desc="Sampling", leave=True,
                          disable=args.n_iter == 1):
        for prompts in progress_bar(batches, desc="data", disable=len(batches) == 1):
            start = x_T[:len(prompts)] if x_T is not None else None
            with timer.phase("sample"):
                z, _ = pipe.sample(prompts, opts, generator, start, settings)
            with timer.phase("decode"):  # budget and tiling resolved once (the tiling recorded)
                budget = pipe.decode_budget(z, opts)
                tiles = pipe.decode_tiles(z, opts, budget)
                decoded = pipe.decode(z, opts, tiles=tiles, budget=budget).float().cpu()
            left -= 1
            # the grid goes with the last batch (encoded beside its images, written last)
            rows = grid_rows(args) if left == 0 else None
            with timer.phase("write"):  # waits for the checkpoint hash, if still running
                writer.save_batch(prompts, decoded, z.cpu(), grid_rows=rows, tiles=tiles)


def main(argv=None):
    """Exit status: 0 done, 1 refused or failed (one line on stderr), 2 bad flags, 130 Ctrl-C,
    143 SIGTERM (once `stop_on_signals` is installed, as a command-line run does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, args = "--debug" in argv, None
    try:
        args = parse_args(argv)
        debug = args.debug
        return run(args)
    except SystemExit:
        raise
    except KeyboardInterrupt as stop:  # before sampling started (run handles it while sampling)
        if debug:
            raise
        if args is not None:
            remove_if_empty(args.created_dirs)
        print("interrupted: no image was made", file=sys.stderr)
        return interrupted_status(stop)
    except Exception as err:  # one readable line unless --debug
        if args is not None:  # output folders this run created and left empty go with it
            remove_if_empty(args.created_dirs)
        if debug:
            raise
        print(f"error: {describe(err, args)}", file=sys.stderr)
        return 1


def describe(err, args=None):
    """One line for the user: the message alone for errors meant for users, else with its type."""
    try:
        from ldm.checkpoint import CheckpointError
        from ldm.util import ConfigError
    except Exception:  # describing must not fail
        CheckpointError = ConfigError = UsageError

    inner = getattr(err, "inner_exception", None)  # torch.compile's backend failures wrap it
    if inner is not None:
        return f"torch.compile failed ({describe(inner)}); run without --compile"
    text = str(err).strip()
    message = " ".join(text.splitlines()[0].split()) if text else type(err).__name__
    if isinstance(err, (UsageError, CheckpointError, ConfigError, ValueError, ImportError)):
        return message  # (ImportError: a missing package, or ldm.compat's torch floor)
    if _is_out_of_memory(err, text):
        return out_of_memory_line(text)
    if isinstance(err, OSError):
        if err.filename:
            return f"{err.strerror or message}: {err.filename}"
        return err.strerror or message
    return f"{type(err).__name__}: {message}"


def _is_out_of_memory(err, text) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError) or \
        "can't allocate memory" in text


def out_of_memory_line(text) -> str:
    """torch's CUDA and CPU allocation failures, as one line with what to change."""
    import re

    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    host = re.search(r"you tried to allocate (\d+) bytes", text)
    size = cuda.group(1) if cuda else f"{int(host.group(1)) / 2**30:.1f} GiB" if host else None
    on_gpu = cuda is not None or "CUDA" in text
    return (f"out of {'GPU' if on_gpu else 'host'} memory"
            + (f" (tried to allocate {size})" if size else "")
            + ": try a smaller --H/--W or --n_samples, --precision autocast, or "
              "--tiled_decoding --tile_size auto")


def exit_now(code: int):
    """Leave without the interpreter's teardown: once torch, torchvision and open_clip are
    loaded, freeing every module object takes over a second (1.2 s measured on the CPU) and
    serves nothing. Outputs are complete by now; streams are flushed and the atexit handlers
    (logging, torch's) run as in a normal exit."""
    import atexit
    import signal

    for name in ("SIGINT", "SIGTERM"):  # leaving already: a signal now only leaves sooner
        signal.signal(getattr(signal, name), lambda *_: os._exit(code))
    flush_streams()
    atexit._run_exitfuncs()  # what a normal exit runs first (CPython's own hook for it)
    os._exit(code)


def flush_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            pass


def leave_at_once(code: int):
    """No atexit handlers either: what hangs the first stop could hang them too."""
    flush_streams()
    os._exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a batch system's or `docker stop`'s end of a job), handled as
    Ctrl-C is: the finished images kept with their grid, the exit status 143."""


class SignalStop:
    """The handler of SIGINT and SIGTERM. The first stops the run by raising (KeyboardInterrupt,
    or Terminated for SIGTERM), so that the finished images are kept with their grid. One that
    comes while that is under way leaves at once, with one line and the first's exit status:
    a second Ctrl-C means "now", and raising again would only cut the first one's handling
    short with a traceback."""

    def __init__(self, leave=None):
        self.first = None
        self.leave = leave or leave_at_once

    def __call__(self, signum, frame):
        import signal

        if self.first is None:
            self.first = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
            raise self.first
        outputs = sys.modules.get("ldm.outputs")  # (not imported yet: nothing written yet)
        if outputs is not None:
            outputs.discard_partial_files()  # a write cut short leaves no temp file
        try:
            print("interrupted again: leaving at once (the images already written are kept)",
                  file=sys.stderr)
        except (OSError, ValueError):  # a stderr gone (`2>&1 | head`): leave all the same
            pass
        self.leave(interrupted_status(self.first))


def stop_on_signals():
    import signal

    handler = SignalStop()
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), handler)


def interrupted_status(stop: BaseException) -> int:
    return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    stop_on_signals()
    exit_now(main())
