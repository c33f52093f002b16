"""The Python API: load a model once, then generate with the same options as the CLI.

    from ldm.pipeline import Pipeline, GenerationOptions
    pipe = Pipeline.load("configs/stable-diffusion/v2-inference.yaml", "checkpoints/v2-1_512-ema-pruned.ckpt", device="cuda")
    result = pipe.generate(["a corgi on a beach"], GenerationOptions(H=1024, W=1024, dilate=2, dilate_tau=20, dilate_skip=4))
    result.images[0].save("corgi.png")
"""
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping, Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ldm.models.diffusion.ddim import TIMESTEP_SPACINGS, generator_device
from ldm.cli import SETTINGS_FILES, parse_tile_size, repository_fallback
from ldm.families import FAMILY_DEFAULTS, label, trained_side
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.precision import (AUTOCAST_DTYPES, HALF_WEIGHTS, REFERENCE_PATHS, SAMPLING_SWITCHES,
                           fast_paths, prepare_for_inference, sampling_kernels,
                           weight_dtype_policy)
from ldm.progress import warn_once
from ldm.scalecrafter.freeu import freeu_applied
from ldm.scalecrafter.guidance import GuidedDenoiser
from ldm.scalecrafter.redilation import MAX_FACTOR
from ldm.scalecrafter.schedule import ScaleCrafterSettings
from ldm.scalecrafter.settings import build_settings
from ldm.scalecrafter.lean_decode import full_decode
from ldm.scalecrafter.memory import available_bytes
from ldm.scalecrafter.presets import (applied_values, read_preset, scale_mismatch,
                                      size_mismatch, steps_mismatch)
from ldm.scalecrafter.tiled_decode import (default_budget, resolve_tile_size, tile_fits,
                                           tiled_decode)
from ldm.util import build_model, load_config, model_part_names

INTEGER_OPTIONS = ("H", "W", "C", "f", "steps", "seed", "dilate_tau", "dilate_skip", "ndcfg_tau",
                   "inflate_tau", "overlap")
REAL_OPTIONS = ("scale", "ddim_eta")
OPTIONAL_REAL_OPTIONS = ("dilate", "decode_budget_gb")  # None: off / from free memory
SWITCH_OPTIONS = ("fixed_code", "progressive_dilate", "tiled_decoding", "sync_gn")
TEXT_OPTIONS = ("negative_prompt", "sampler", "precision", "rng", "timestep_spacing")
# Where noise is drawn: a CPU generator (the same numbers on every device), or the device's
# own, in the published code's order (its images for a seed on CUDA).
RNGS = ("cpu", "device")


def family_defaults(family: Optional[str], sampler: str = "ddim") -> dict:
    """The FAMILY_DEFAULTS (ldm.families) of `family` that `sampler` takes (eta is DDIM's
    alone, the spacing DDIM's and PLMS's)."""
    defaults = dict(FAMILY_DEFAULTS.get(family, {}))
    if sampler in SAMPLERS and not SAMPLERS[sampler].takes_eta:
        defaults.pop("ddim_eta", None)
    if sampler in SAMPLERS and not SAMPLERS[sampler].spaced:
        defaults.pop("timestep_spacing", None)
    return defaults


@dataclass
class GenerationOptions:
    """Every knob of one generation; names and defaults follow the txt2img flags."""
    H: int = 512
    W: int = 512
    C: int = 4
    f: int = 8
    steps: int = 50
    sampler: str = "ddim"
    timestep_spacing: str = "uniform"  # DDIM's and PLMS's: one of TIMESTEP_SPACINGS
    ddim_eta: float = 0.0
    scale: float = 9.0
    negative_prompt: str = ""  # the unconditional prompt of CFG and noise-damped CFG
    seed: int = 42
    rng: str = "cpu"  # one of RNGS
    fixed_code: bool = False  # txt2img's batches share one start noise (generate is one batch)
    precision: str = "autocast"
    # re-dilation, the seed's uniform form
    dilate: Optional[float] = None
    dilate_tau: int = 20
    dilate_skip: int = 4
    progressive_dilate: bool = False
    # the authors' per-layer form and the ultra-resolution features
    dilate_settings: Optional[str] = None
    ndcfg_dilate_settings: Optional[str] = None
    ndcfg_tau: int = 0
    disperse_settings: Optional[str] = None
    disperse_transform: Optional[str] = None
    inflate_tau: int = 0
    # decoding
    tiled_decoding: bool = False
    overlap: int = 24
    sync_gn: bool = False
    # latent pixels a tile side: None: half each side (the seed's); (h, w); "auto": the fewest
    # tiles that fit the budget (Pipeline.decode_tiles resolves it)
    tile_size: Optional[Union[int, Tuple[int, int], str]] = None
    decode_budget_gb: Optional[float] = None  # memory a decode may use; None: from free
    # FreeU (b1, b2, s1, s2), e.g. the authors' SD 2.1 values (1.1, 1.2, 0.9, 0.2)
    freeu: Optional[Tuple[float, float, float, float]] = None

    def validate(self):
        """Raise ValueError with one readable line for any option a run cannot use. Numbers
        and switches of numpy's types become Python's (torch and the tiler take those)."""
        self._check_types()
        self._check_numbers()
        self._check_sampler()
        self._check_features()
        self._check_tiles()

    def _check_types(self):
        for name in INTEGER_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise ValueError(f"--{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in SWITCH_OPTIONS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"--{name} must be True or False, got {value!r}")
            setattr(self, name, bool(value))
        if isinstance(self.tile_size, numbers.Integral) and not isinstance(self.tile_size, bool):
            self.tile_size = int(self.tile_size)
        for name in REAL_OPTIONS + OPTIONAL_REAL_OPTIONS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_REAL_OPTIONS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"--{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        for name in TEXT_OPTIONS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"--{name} must be text, got {getattr(self, name)!r}")
        for name in SETTINGS_FILES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"--{name} must be a file path, got {value!r}")
            if value:  # a relative path not found here is the repository's, as for --config
                setattr(self, name, str(repository_fallback(value)))
        freeu = self.freeu
        if freeu is not None and not (isinstance(freeu, (tuple, list)) and len(freeu) == 4 and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in freeu)):
            raise ValueError("--freeu takes four numbers: B1 B2 S1 S2")
        if freeu is not None:
            self.freeu = tuple(float(v) for v in freeu)

    def _check_numbers(self):
        for name in ("H", "W"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"--{name} must be a positive multiple of 64, got {value}")
        for name in ("steps", "C", "f"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        values = [(name, getattr(self, name)) for name in ("scale", "ddim_eta", "dilate")]
        for name, value in values + [("freeu", value) for value in self.freeu or ()]:
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"--seed must be in 0..{2 ** 32 - 1}, got {self.seed}")
        # beyond 1, DDIM's direction term is the root of a negative number: every latent NaN
        if not 0 <= self.ddim_eta <= 1:
            raise ValueError(f"--ddim_eta must be between 0 and 1, got {self.ddim_eta}")
        if self.dilate is not None and self.dilate < 1:  # (below 1 each conv would upsample)
            raise ValueError(f"--dilate must be at least 1 (1: the trained conv), got "
                             f"{self.dilate:g}")
        if self.dilate is not None and self.dilate > MAX_FACTOR:
            raise ValueError(f"--dilate must be at most {MAX_FACTOR:g}, got {self.dilate:g}")
        for name in ("dilate_tau", "ndcfg_tau", "inflate_tau", "dilate_skip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        if self.precision not in ("full", "autocast"):
            raise ValueError(f"--precision must be 'full' or 'autocast', got {self.precision!r}")

    def _check_sampler(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}")
        if self.rng not in RNGS:
            raise ValueError(f"--rng must be one of {', '.join(RNGS)}, got {self.rng!r}")
        sampler = SAMPLERS[self.sampler]
        if self.steps > sampler.max_steps:
            raise ValueError(f"--steps must be at most {sampler.max_steps} with "
                             f"{self.sampler.upper()}, got {self.steps}")
        if not sampler.takes_eta and self.ddim_eta != 0:
            raise ValueError(f"{sampler.label} is deterministic: use --ddim_eta 0 "
                             f"with --{self.sampler}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, "
                             f"got {self.timestep_spacing!r}")
        if not sampler.spaced and self.timestep_spacing != "uniform":
            raise ValueError(f"{sampler.label} steps through its own time grid: --timestep_spacing "
                             f"applies to DDIM and PLMS")

    def _check_features(self):
        """Options that would do nothing, or that cannot go together. A tau of 0 with its
        settings file is allowed: it is how the published presets (and ablations) switch a
        feature off."""
        if self.dilate is not None and self.dilate_settings:
            raise ValueError("use either --dilate or --dilate_settings, not both")
        if self.progressive_dilate and self.dilate is None and not self.dilate_settings:
            raise ValueError("--progressive_dilate needs --dilate or --dilate_settings")
        if self.ndcfg_tau and not self.ndcfg_dilate_settings:
            raise ValueError("--ndcfg_tau needs --ndcfg_dilate_settings")
        if self.inflate_tau and not self.disperse_settings:
            raise ValueError("--inflate_tau needs --disperse_settings")
        if self.disperse_settings and self.inflate_tau and not self.disperse_transform:
            raise ValueError("--disperse_settings needs --disperse_transform")
        if self.disperse_transform and not self.disperse_settings:
            raise ValueError("--disperse_transform needs --disperse_settings")
        self._check_decode_switches()
        if self.disperse_settings and self.inflate_tau and self.dilate is None \
                and not self.dilate_settings:
            raise ValueError("--disperse_settings disperses re-dilated convs: it needs --dilate "
                             "or --dilate_settings")

    def validate_decoding(self, latent_size: Tuple[int, int]):
        """validate's checks of what a decode reads (types, tiling), for latents of
        `latent_size` (h, w): a saved latent may be decoded with options made for another
        size, and with sampling options that no run could take."""
        self._check_types()
        self._check_decode_switches()
        self._check_tiles(latent_size)

    def _check_decode_switches(self):
        if self.sync_gn and not self.tiled_decoding:
            raise ValueError("--sync_gn needs --tiled_decoding (a full decode normalises over "
                             "the whole image already)")
        if self.tile_size is not None and not self.tiled_decoding:
            raise ValueError("--tile_size needs --tiled_decoding")

    def _check_tiles(self, latent_size=None):
        if isinstance(self.tile_size, np.ndarray):
            self.tile_size = self.tile_size.tolist()
        if isinstance(self.tile_size, str) and self.tile_size != "auto":
            try:  # "HxW", as the metadata writes it
                self.tile_size = parse_tile_size(self.tile_size)
            except ValueError:
                pass  # refused below, with the value as given
        tile = self.tile_size
        sides = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
        is_size = len(sides) in (1, 2) and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sides)
        if tile is not None and tile != "auto" and not is_size:
            raise ValueError(f"--tile_size must be a positive integer, HxW or 'auto', "
                             f"got {tile!r}")
        if isinstance(tile, (tuple, list)):  # (n,) is n, as --tile_size n
            self.tile_size = tuple(int(s) for s in tile) if len(tile) == 2 else int(tile[0])
        if self.decode_budget_gb is not None and not (
                math.isfinite(self.decode_budget_gb) and 0 < self.decode_budget_gb <= 2**20):
            raise ValueError(f"--decode_budget_gb must be a positive number of GiB (at most "
                             f"2^20), got {self.decode_budget_gb:g}")
        if not self.tiled_decoding:
            return
        if self.overlap < 0 or self.overlap % 2:
            raise ValueError(f"--overlap must be even and non-negative, got {self.overlap}")
        if self.tile_size == "auto":
            return  # auto tiles are always wider than the overlap
        tile = self.tile_size or min(latent_size or (self.H // self.f, self.W // self.f)) // 2
        tile = min(tile) if isinstance(tile, tuple) else tile
        if tile <= 0 or self.overlap >= tile:
            raise ValueError(f"--overlap ({self.overlap}) must be smaller than the tile "
                             f"({tile} latent pixels): use --overlap {max(tile - 2, 0) // 2 * 2} "
                             f"or less, or --tile_size auto")


OPTION_NAMES = frozenset(f.name for f in fields(GenerationOptions))


@dataclass
class GenerationResult:
    images: List[Image.Image]
    latents: torch.Tensor  # final latents, (B, C, H/f, W/f), float32 on the CPU
    decoded: torch.Tensor  # decoded images in [-1, 1] before clamping, float32 on the CPU
    unet_batches: List[int] = field(default_factory=list)


def eight_bit(decoded: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (B, 3, H, W) as uint8, truncating as the reference scripts do."""
    return (255.0 * torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)).to(torch.uint8)


def to_pil(decoded: torch.Tensor) -> List[Image.Image]:
    """[-1, 1] images (or their `eight_bit` pixels) to 8-bit PIL images."""
    pixels = decoded if decoded.dtype == torch.uint8 else eight_bit(decoded)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def check_latent_format(opts: GenerationOptions, channels: int, factor: int):
    """--C and --f must be the model's: ValueError with one line where they are not."""
    if (opts.C, opts.f) != (channels, factor):
        raise ValueError(f"--C {opts.C} --f {opts.f} do not fit the model: its latents have "
                         f"{channels} channels at 1/{factor} of the image size")


LAYOUT_OPTIONS = ("channels_last", "native_norms", "compile_unet")  # prepare_for_inference's


def checked_device(device, precision: str, layout) -> torch.device:
    """The device to load onto, once it, the precision and the layout switches are known to
    be usable here; else ValueError with one line."""
    if precision not in ("full", "autocast"):
        raise ValueError(f"precision must be 'full' or 'autocast', got {precision!r}")
    unknown = sorted(set(layout) - set(LAYOUT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown layout option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(LAYOUT_OPTIONS)}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    problem = cuda_device_problem(device) if device.type == "cuda" else None
    if problem:
        raise ValueError(f"device '{device}' was asked for, but {problem}")
    return device


def cuda_device_problem(device: torch.device) -> Optional[str]:
    """Why torch can't use the CUDA device `device` names here, or None where it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return (f"torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1} (after "
                f"CUDA_VISIBLE_DEVICES)")
    return None


def make_current(device: torch.device) -> None:
    """cuda:N becomes the current CUDA device: what streams, CUDA graphs, torch.compile and
    synchronize() use when not told a device (the whole process's choice)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


# A UNet call's working memory is 27-46 times its first feature map (SD 2.1, CPU, fp32, CFG
# batch: 4.58 GB above the weights at latent 256, 1.09 GB at latent 96): refusing below 8 of
# them never refuses a run that would fit.
MIN_UNET_MAPS = 8


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _option_value(name, value):
    """A preset's value as an option: YAML's lists are the options' tuples (FreeU's four
    numbers, a tile's HxW), a number in quotes ('30') is read as txt2img reads it for the
    flag, by the option's type, and a number where text is wanted (`negative_prompt: 5`) is
    that text, as the flag's. Anything else stays as written (validate refuses what is
    wrong)."""
    if isinstance(value, list):
        return tuple(value)
    if name in TEXT_OPTIONS and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    kind = int if name in INTEGER_OPTIONS else float if name in \
        REAL_OPTIONS + OPTIONAL_REAL_OPTIONS else None
    if kind is None or not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        return value


def _check_option_names(given):
    for name in given:
        if name not in OPTION_NAMES:
            close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {name!r}{hint}")


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else \
            type(value).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")


def _check_generator(generator):
    """None is torch's global generator (as for torch.randn)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (pipe.noise_generator(opts) "
                         f"makes the seeded one) or None, got {type(generator).__name__}")


class Pipeline:
    def __init__(self, model, device="cpu", config_path=None, ckpt_path=None):
        self.model, self.device = model, torch.device(device)
        self.config_path, self.ckpt_path = config_path, ckpt_path
        self.vae_path = None  # a standalone VAE file loaded over the model's own (load's)
        self.half_weights = None  # the weight dtype prepare_for_inference chose, if any
        # switches that act while sampling (cuDNN autotuning, cuDNN attention first)
        self.sampling_kernels = {name: False for name in SAMPLING_SWITCHES}
        # every kernel and layout switch in effect (their numbers differ in the last bits)
        self.kernels = dict(REFERENCE_PATHS, compile=False)
        self._warned = set()  # keys of the warnings given in this pipeline's life (warn_once)

    @classmethod
    def load(cls, config_path, ckpt_path, device="cpu", precision="full",
             cudnn_benchmark=None, cudnn_attention=None, staged_load=None, vae_encoder=True,
             vae_path=None, **layout):
        """ckpt_path: a single-file checkpoint, a diffusers pipeline folder, or a model id in
        the Hugging Face cache (ldm.diffusers_layout). precision 'autocast' also stores the
        UNet and text encoder in half precision where ldm.precision says so (CUDA); kernel and layout switches: cudnn_benchmark,
        cudnn_attention, channels_last, native_norms (None: ldm.precision.FAST_PATHS' choice
        for the device), compile_unet (off by default); staged_load: copy the weights while
        the model is built (None: ldm.layouts.STAGED_LOADS' choice); vae_encoder=False: the
        VAE without its encoder (text-to-image never encodes; txt2img loads so); vae_path: a
        standalone VAE file, diffusers VAE folder or model id, whose weights replace the model
        file's own (txt2img's --vae)."""
        from ldm.checkpoint import CheckpointMismatch, load_state_dict
        from ldm.diffusers_layout import (checkpoint_path, is_pipeline_folder,
                                          load_pipeline_folder, vae_file)
        from ldm.layouts import (STAGED_LOADS, VAE_PREFIX, StagedStateDict, unet_weight,
                                 vae_weights, with_vae, without_wrapper_prefix)
        from ldm.models.autoencoder import AutoencoderKL
        from ldm.modules.encoders.common import register_config_dir

        device = checked_device(device, precision, layout)
        make_current(device)  # before the staged load's copy stream
        config_path = repository_fallback(config_path)  # as --config: from any folder
        config = load_config(config_path)
        register_config_dir(Path(config_path).resolve().parent)
        # Weights go straight to their final device and dtype (prepare_for_inference then has
        # no cast left to do), copied while the model is built where STAGED_LOADS says so.
        if vae_path is not None:  # (read first: a file that is no VAE fails at once)
            vae_path = vae_file(vae_path)  # (a diffusers VAE folder's)
            vae_name = f"VAE file {vae_path}"
            vae, vae_family = vae_weights(load_state_dict(vae_path, skip=unet_weight),
                                          vae_name)
        ckpt_path = checkpoint_path(ckpt_path)  # (a model id: the Hugging Face cache's)
        state = load_pipeline_folder(ckpt_path) if is_pipeline_folder(ckpt_path) else \
            load_state_dict(ckpt_path)
        policy = weight_dtype_policy(device, precision)
        state = without_wrapper_prefix(state, model_part_names(config))
        if vae_path is not None:
            state = with_vae(state, vae, vae_family, vae_name)
        if staged_load is None:
            staged_load = STAGED_LOADS.get(torch.device(device).type, False)
        if staged_load:  # (not the encoder's weights, where they are left unread)
            unread = () if vae_encoder else \
                [VAE_PREFIX + k for k in AutoencoderKL.ENCODER_KEYS]
            state = StagedStateDict(state, device, policy, unread)
        try:
            model = build_model(config, device, state, policy, vae_encoder)
        except CheckpointMismatch as err:  # the files named: the user has several
            files = ckpt_path if vae_path is None else f"{ckpt_path} with VAE {vae_path}"
            raise err.named(files, config_path) from None
        pipe = cls.from_model(model, device, precision, cudnn_benchmark, cudnn_attention,
                              **layout)
        pipe.config_path, pipe.ckpt_path, pipe.vae_path = config_path, ckpt_path, vae_path
        return pipe

    @classmethod
    def from_model(cls, model, device="cpu", precision="full", cudnn_benchmark=None,
                   cudnn_attention=None, **layout):
        """A pipeline over a model already built on `device` (weights in place, e.g. the
        benchmark's random ones), laid out and with kernels chosen as `load` does."""
        make_current(torch.device(device))
        paths = fast_paths(device, bool(layout.get("compile_unet")),
                           cudnn_benchmark=cudnn_benchmark, cudnn_attention=cudnn_attention,
                           **{k: layout.get(k) for k in ("channels_last", "native_norms")})
        # the layout as decided here, so that `kernels` is what prepare_for_inference applies
        layout = dict(layout, channels_last=paths["channels_last"],
                      native_norms=paths["native_norms"])
        prepare_for_inference(model, device, precision, **layout)
        pipe = cls(model, device)
        pipe.sampling_kernels = {name: paths[name] for name in SAMPLING_SWITCHES}
        pipe.kernels = dict(paths, compile=bool(layout.get("compile_unet")))
        if pipe.device.type != "cuda":  # cuDNN's switches change nothing elsewhere
            pipe.kernels.update(cudnn_benchmark=False, cudnn_attention=False)
        if precision == "autocast":
            pipe.half_weights = HALF_WEIGHTS.get(pipe.device.type)
        return pipe

    def options(self, preset=None, **given) -> GenerationOptions:
        """GenerationOptions for this model: its family's defaults (ldm.families), then the
        values of `preset` (a name from configs/scalecrafter/presets, or a .yaml path), then
        `given` (e.g. H=2048, W=2048, dilate=2), which set aside the preset values they
        exclude, as txt2img's flags do. ValueError for a preset tuned for another family."""
        _check_option_names(given)
        values = {}
        if preset is not None:
            preset = self._preset(preset)
            values = applied_values(preset, given)
        sampler = given.get("sampler", values.get("sampler", "ddim"))
        opts = GenerationOptions(**{**family_defaults(self.model.family, sampler), **values,
                                    **given})
        if preset is None:
            return opts
        mismatch = steps_mismatch(preset.name, preset.steps, opts, given, f"steps={opts.steps}")
        if mismatch:
            warn_once(self._warned, (preset.path, opts.steps), mismatch)
        mismatch = scale_mismatch(preset, opts, given, f"W={opts.W}, H={opts.H}")
        if mismatch:
            warn_once(self._warned, (preset.path, opts.W, opts.H), mismatch)
        return opts

    def _preset(self, name):
        """The preset `name`, if this model can take it."""
        preset, family = read_preset(name), self.model.family
        if preset.family is not None and preset.family != family:
            raise ValueError(f"preset {preset.name} is made for {label(preset.family)} "
                             f"models; this model is {label(family)}")
        unknown = sorted(set(preset.values) - OPTION_NAMES)
        if unknown:
            raise ValueError(f"preset {preset.path} sets {', '.join(unknown)}: not options of "
                             f"a generation (txt2img's own flags)")
        mismatch = size_mismatch(preset, self.trained_side())
        if mismatch:
            warn_once(self._warned, ("preset size", preset.path), mismatch)
        return replace(preset, values={name: _option_value(name, value)
                                       for name, value in preset.values.items()})

    def trained_side(self) -> Optional[int]:
        """The image side the model is trained at (its config's, else its family's)."""
        return trained_side(self.model.family, getattr(self.model, "image_size", None),
                            self.latent_format()[1])

    def settings_for(self, opts: GenerationOptions) -> ScaleCrafterSettings:
        return build_settings(self.model.unet, opts)

    def _autocast(self, opts):
        if opts.precision != "autocast":
            if self.half_weights is not None:
                raise ValueError("this pipeline holds half-precision weights: load it with "
                                 "precision='full' for --precision full")
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.device.type])

    def noise_generator(self, opts: GenerationOptions) -> torch.Generator:
        """The generator seeded with opts.seed on opts.rng's device: the CPU (the same start on
        every device), or this pipeline's device (the published code's stream there)."""
        device = "cpu" if opts.rng == "cpu" else self.device
        return torch.Generator(device=device).manual_seed(opts.seed)

    def initial_noise(self, opts, batch, generator):
        """x_T for `batch` images, drawn on the generator's device and moved to this one."""
        shape = (batch, opts.C, opts.H // opts.f, opts.W // opts.f)
        return torch.randn(shape, generator=generator,
                           device=generator_device(generator)).to(self.device)

    def check(self, prompts, opts: GenerationOptions, x_T=None) -> List[str]:
        """The prompts as a list (a single string is one prompt), once they and the options
        are known to fit this model; else ValueError with one line."""
        opts.validate()
        if isinstance(prompts, str):
            prompts = [prompts]
        # (bytes are not text; a mapping's or a set's order is not the caller's)
        if isinstance(prompts, (bytes, bytearray, Mapping, AbstractSet)) or \
                not isinstance(prompts, Iterable):
            raise ValueError(f"prompts must be a string or a sequence of strings, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        check_latent_format(opts, *self.latent_format())
        shape = (len(prompts), opts.C, opts.H // opts.f, opts.W // opts.f)
        if x_T is not None:
            _check_tensor("x_T", x_T)
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, the options want {shape}")
        self._check_memory(len(prompts), opts)
        if opts.negative_prompt and opts.scale == 1.0:  # (still recorded: it was asked for)
            warn_once(self._warned, "unused negative prompt", "--negative_prompt is unused at "
                      "--scale 1 (no unconditional branch runs)")
        return prompts

    def _check_memory(self, batch: int, opts: GenerationOptions):
        """Refuse a size whose UNet call cannot fit the memory free now, by a floor on its
        working memory (MIN_UNET_MAPS of its first feature map, for the CFG batch): such a run
        could only end in an out-of-memory error or, on the CPU, the kernel killing it."""
        rows = batch * (1 if opts.scale == 1.0 else 2)
        dtype = AUTOCAST_DTYPES[self.device.type] if opts.precision == "autocast" \
            else torch.float32
        one_map = rows * self.model.unet.model_channels * (opts.H // opts.f) * \
            (opts.W // opts.f) * torch.finfo(dtype).bits // 8
        need, free = MIN_UNET_MAPS * one_map, available_bytes(self.device)
        if need > free:
            raise ValueError(f"{opts.W}x{opts.H} with {batch} image(s) a batch does not fit: a "
                             f"UNet call needs more than {_size(need)}, and {_size(free)} are "
                             f"free on {self.device.type}")

    def latent_format(self) -> Tuple[int, int]:
        """(channels, downsampling factor) of the model's latents: the UNet's input channels,
        and 2 for each of the VAE decoder's upsamplings."""
        unet_input = self.model.unet.input_blocks[0][0]
        return unet_input.in_channels, 2 ** self.model.first_stage_model.decoder.upsamplings

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], opts: GenerationOptions, generator, x_T=None,
               settings=None, progress=True):
        """(latents, batch size of each UNet call) for one batch of prompts, one image each."""
        _check_generator(generator)
        return self._sample(self.check(prompts, opts, x_T), opts, generator, x_T, settings,
                            progress)

    def _sample(self, prompts: List[str], opts: GenerationOptions, generator, x_T, settings,
                progress):
        """`sample` for prompts and options already checked."""
        model = self.model
        settings = settings if settings is not None else self.settings_for(opts)
        with self._autocast(opts), freeu_applied(model.unet, opts.freeu), \
                sampling_kernels(**self.sampling_kernels):
            size = (opts.H, opts.W)
            cond = model.get_conditioning(prompts, size)
            uncond = (model.get_unconditional_conditioning([opts.negative_prompt] * len(prompts),
                                                           size)
                      if opts.scale != 1.0 else None)
            denoiser = GuidedDenoiser(model, cond, uncond, opts.scale, settings)
            x = (x_T.to(self.device, torch.float32) if x_T is not None else
                 self.initial_noise(opts, len(prompts), generator))
            z = SAMPLERS[opts.sampler].run(denoiser, x, model.alphas_cumprod, opts.steps,
                                           opts.ddim_eta, generator, progress,
                                           opts.timestep_spacing)
        if not torch.isfinite(z).all():  # else the images come out black, without a word
            half = (", or half precision overflowed (try --precision full)"
                    if opts.precision == "autocast" else "")
            raise ValueError(f"sampling produced NaN or infinite latents: --scale {opts.scale} "
                             f"may be too large{half}")
        return z.float(), denoiser.unet_batches

    def decode_budget(self, z, opts) -> int:
        """Bytes a decode of z may use: --decode_budget_gb, else a share of the memory free now
        (so it can differ between runs: resolve it once and pass it to decode_tiles and
        decode; a budget tight enough to make layers recompute can move the last bits)."""
        if opts.decode_budget_gb is None:
            return default_budget(self.device)
        return int(opts.decode_budget_gb * 2**30)

    def decode_tiles(self, z, opts: GenerationOptions, budget=None) -> Optional[Tuple[int, int]]:
        """(h, w) latent pixels a tile of opts' tiled decode of z, 'auto' chosen against the
        budget (default: decode_budget's), so it can differ between runs: pass it to decode,
        and record it; None when opts decode whole."""
        return self._tiles(self._checked_latents(z, opts), opts, budget)

    def _tiles(self, z, opts: GenerationOptions, budget=None) -> Optional[Tuple[int, int]]:
        """decode_tiles for latents and options already checked."""
        if not opts.tiled_decoding:
            return None
        budget = self.decode_budget(z, opts) if budget is None else budget
        decoder = self.model.first_stage_model.decoder
        tiles = resolve_tile_size(self.model.first_stage_model, z, opts.tile_size, opts.overlap,
                                  budget)
        decoded = (min(tiles[0], z.shape[2]), min(tiles[1], z.shape[3]))  # what a tile holds
        if opts.tile_size == "auto" and not tile_fits(decoder, *decoded, budget, z.shape[0]):
            warn_once(self._warned, ("auto tiles", tiles), (
                f"no tile of a batch of {z.shape[0]} fits half the decode budget of "
                f"{_size(budget)}: decoding in the smallest tiles, {decoded[0]}x{decoded[1]}, "
                f"beyond it (fewer --n_samples, or more free memory, would fit)"))
        return tiles

    @torch.no_grad()
    def decode(self, z, opts: GenerationOptions, progress=True, tiles=None, budget=None):
        """Latents to images in [-1, 1]; the VAE always runs in float32 (fp16 decodes overflow).
        tiles, budget: decode_tiles' and decode_budget's answers, to decode as recorded
        (default: resolved now)."""
        z = self._checked_latents(z, opts)
        if tiles is not None and not opts.tiled_decoding:
            raise ValueError(f"tiles {tiles} given for a whole decode: the options' "
                             f"tiled_decoding is off")
        budget = self.decode_budget(z, opts) if budget is None else budget
        z = z / self.model.scale_factor
        vae = self.model.first_stage_model
        if opts.tiled_decoding:
            tiles = tiles or self._tiles(z, opts, budget)
            images = tiled_decode(vae, z, opts.overlap, opts.sync_gn, tiles,
                                  budget_bytes=budget, progress=progress)
        else:  # banded, whatever the budget (which only decides what it recomputes)
            images = full_decode(vae, z, budget, progress=progress)
        if not torch.isfinite(images).all():
            raise ValueError(f"decoding produced NaN or infinite pixels: the latents are out of "
                             f"range (is --scale {opts.scale} too large?)")
        return images

    def _checked_latents(self, z, opts: GenerationOptions) -> torch.Tensor:
        """z as the decoder takes it (float32, on this device), once it and the options are
        known to fit; else ValueError with one line."""
        _check_tensor("the latents", z)
        channels, _factor = self.latent_format()
        if z.dim() != 4 or z.shape[0] == 0 or z.shape[1] != channels or 0 in z.shape[2:]:
            raise ValueError(f"the latents must be a (batch, {channels}, h, w) tensor, got "
                             f"shape {tuple(z.shape)}")
        opts.validate_decoding(tuple(z.shape[2:]))
        return z.to(self.device, torch.float32)

    def generate(self, prompts: Sequence[str], opts: GenerationOptions, generator=None,
                 x_T=None, progress=True) -> GenerationResult:
        _check_generator(generator)
        prompts = self.check(prompts, opts, x_T)
        if generator is None:
            generator = self.noise_generator(opts)
        with torch.no_grad():
            z, batches = self._sample(prompts, opts, generator, x_T, None, progress)
        decoded = self.decode(z, opts, progress).float().cpu()
        return GenerationResult(to_pil(decoded), z.cpu(), decoded, batches)
