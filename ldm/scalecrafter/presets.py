"""Resolution presets (configs/scalecrafter/presets/*.yaml): the options of one run, named as
txt2img's flags and GenerationOptions' fields, and the model family they are tuned for.

txt2img's --preset and `Pipeline.options(preset=...)` read them here, so both apply the same
values under the same rules. Torch-free: txt2img reads its flags before it imports torch."""
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ldm.cli import REPO_ROOT, SETTINGS_FILES
from ldm.families import FAMILY_LABELS

PRESET_DIR = REPO_ROOT / "configs" / "scalecrafter" / "presets"

# An option given by the caller also sets aside the preset values it cannot go with: the
# uniform and the per-layer dilation exclude each other, and so do txt2img's prompt and
# prompt file.
DILATION = ("dilate", "dilate_settings")
EXCLUDES = {"dilate": ("dilate_settings",), "dilate_settings": ("dilate",),
            "prompt": ("from_file", "repeat"), "from_file": ("prompt",)}
# txt2img's switches for the samplers other than DDIM, named as GenerationOptions' `sampler`
SAMPLER_SWITCHES = ("plms", "dpm")
# What a sampler other than the presets' DDIM does not take: eta is DDIM's alone, and
# DPM-Solver++ keeps its own time grid (ldm.models.diffusion.samplers says so too: tested).
SAMPLER_EXCLUDES = {"plms": ("ddim_eta",), "dpm": ("ddim_eta", "timestep_spacing")}
# Preset values that only qualify a feature: turned off by the caller (given a false value:
# False, None, ""), they go with it. Dispersion acts on re-dilated convs only.
DISPERSION = ("disperse_settings", "disperse_transform", "inflate_tau")
QUALIFIERS = {"tiled_decoding": ("sync_gn", "tile_size"),
              "dilation": ("progressive_dilate",) + DISPERSION,
              "ndcfg_dilate_settings": ("ndcfg_tau",),
              "disperse_settings": DISPERSION[1:]}


@dataclass(frozen=True)
class Preset:
    path: Path
    family: Optional[str]     # the model family it is tuned for (ldm.families' names)
    values: Dict[str, Any]    # its options; relative settings files resolved
    trained_size: Optional[int] = None  # the training side of the models it is tuned for

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def steps(self) -> Optional[int]:
        """The step count its taus are counted for."""
        return self.values.get("steps")


def list_presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def preset_path(name) -> Path:
    """A shipped preset's name, or the path of a .yaml (.yml) file of one's own."""
    name = str(name)
    return Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"


def read_preset(name) -> Preset:
    """The preset `name`; ValueError (one line) if there is none or it is not a mapping."""
    from omegaconf import OmegaConf

    path = preset_path(name)
    if not path.is_file():
        raise ValueError(f"unknown preset {str(name)!r}; known: {', '.join(list_presets())}")
    try:
        loaded = OmegaConf.load(path)
    except OSError:
        raise
    except Exception as err:  # yaml's errors come in many classes
        raise ValueError(f"preset {path} is not valid YAML: {_first_line(err)}") from None
    try:
        values = OmegaConf.to_container(loaded, resolve=True)
    except Exception as err:  # an interpolation (${...}) that names nothing
        raise ValueError(f"preset {path}: {_first_line(err)}") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ValueError(f"preset {path} is not a mapping of options")
    _sampler_from_switches(values, path)
    family = values.pop("family", None)
    if family is not None and (not isinstance(family, str) or family not in FAMILY_LABELS):
        raise ValueError(f"preset {path}: family must be one of {', '.join(FAMILY_LABELS)}, "
                         f"got {family!r}")
    trained = values.pop("trained_size", None)
    if trained is not None and (isinstance(trained, bool) or not isinstance(trained, int)
                                or trained <= 0):
        raise ValueError(f"preset {path}: trained_size must be a positive integer (pixels), "
                         f"got {trained!r}")
    for key in SETTINGS_FILES:
        if isinstance(values.get(key), str):
            values[key] = str(settings_file(path, values[key]))
    return Preset(path, family, values, trained)


def _first_line(err) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _sampler_from_switches(values: dict, path):
    """txt2img's sampler switches (`plms: true`, `dpm: true`) as the option `sampler`, the
    name GenerationOptions uses; a preset may say either."""
    names = ("ddim",) + SAMPLER_SWITCHES
    if values.get("sampler", "ddim") not in names:
        raise ValueError(f"preset {path}: sampler must be one of {', '.join(names)}, got "
                         f"{values['sampler']!r}")
    switches = {name: values.pop(name) for name in SAMPLER_SWITCHES if name in values}
    for name, on in switches.items():
        if not isinstance(on, bool):
            raise ValueError(f"preset {path}: {name} must be true or false, got {on!r}")
    chosen = {name for name, on in switches.items() if on} | (
        {values["sampler"]} if "sampler" in values else set())
    if len(chosen) > 1:
        raise ValueError(f"preset {path} names two samplers: {', '.join(sorted(chosen))}")
    if chosen:
        values["sampler"] = chosen.pop()


def settings_file(preset: Path, value: str) -> Path:
    """A settings file a preset names: relative ones beside the preset first (one's own preset
    with its own files), else the repository's (the shipped presets name those)."""
    if Path(value).is_absolute():
        return Path(value)
    beside, shipped = preset.parent / value, REPO_ROOT / value
    return shipped if shipped.exists() and not beside.exists() else beside


def applied_values(preset: Preset, given: Mapping[str, Any]) -> Dict[str, Any]:
    """The preset's values a run takes when the caller gives the options `given` (names and
    values; `sampler` for the sampler chosen): those given win, and set aside the preset values
    they exclude, and the ones that qualify a feature they turn off."""
    dropped = set(given)
    for name in given:
        dropped.update(EXCLUDES.get(name, ()))
    dropped.update(SAMPLER_EXCLUDES.get(given.get("sampler"), ()))
    dilation = {name: given[name] for name in DILATION if name in given}
    turned_off = {name for name in QUALIFIERS if name in given and not given[name]}
    if dilation and not any(dilation.values()):
        turned_off.add("dilation")
    for feature in turned_off:
        dropped.update(QUALIFIERS[feature])
    return {name: value for name, value in preset.values.items() if name not in dropped}


def steps_mismatch(preset: str, made_for: Optional[int], opts, given, steps_text: str) -> str:
    """A preset's taus count steps from the noisiest, for its own step count: run with other
    steps, they re-dilate another share of the run (all of it, when shorter). The warning
    (`steps_text`: how the caller names the step count), or '' when the run keeps the preset's
    steps or no tau of the preset's is on (the taus in `given` are the caller's)."""
    taus = _preset_taus(opts, given)
    counts = [made_for, opts.steps, *taus.values()]
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in counts):
        return ""  # (refused by validate)
    if opts.steps == made_for or not taus:
        return ""
    covered = min(max(taus.values()), opts.steps)
    named = ", ".join(f"{name} {tau}" for name, tau in taus.items())
    return (f"preset {preset} is made for {made_for} steps and its taus count steps ({named}): "
            f"with {steps_text} they cover {covered} of {opts.steps}; set them for this length")


def _preset_taus(opts, given) -> Dict[str, Any]:
    """{name: value} of the preset's taus whose features are on (those in `given` are the
    caller's own)."""
    on = {"dilate_tau": opts.dilate is not None or opts.dilate_settings,
          "ndcfg_tau": opts.ndcfg_dilate_settings, "inflate_tau": opts.disperse_settings}
    return {name: getattr(opts, name) for name, feature in on.items()
            if feature and getattr(opts, name) and name not in given}


def scale_mismatch(preset: Preset, opts, given, size_text: str) -> str:
    """A preset's factors are tuned for its image size (the authors' 2048x1024 ones differ
    from their 2048x2048 ones): given another size, they dilate for another image. The same
    size turned (1024x2048 for 2048x1024) is the same to them: dilation is the same along
    both axes. The warning, naming the shipped presets for that size, or ''."""
    size = _sides(preset.values)
    if not ({"H", "W"} & set(given)) or size is None:
        return ""
    wanted = _sides({"H": opts.H, "W": opts.W})
    if wanted is None or wanted == size:
        return ""
    others = [name for name in list_presets()
              if _sides((other := read_preset(name)).values) == wanted
              and other.family == preset.family]
    hint = f" (presets for it: {', '.join(others)})" if others else ""
    return (f"preset {preset.name} is tuned for {preset.values['W']}x{preset.values['H']}; at "
            f"{size_text} its factors and taus are made for another size{hint}")


def _sides(values) -> Optional[tuple]:
    """The image's sides, shorter first, as integers (a quoted '2048' as txt2img reads it), or
    None where one is not an integer (refused by validate)."""
    sides = []
    for value in (values.get("H"), values.get("W")):
        if isinstance(value, str):
            try:
                value = int(value)  # (as the flag's type reads it: '+2048', '2_048')
            except ValueError:
                return None
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return None
        sides.append(int(value))
    return tuple(sorted(sides))


def size_mismatch(preset: Preset, model_side: Optional[int]) -> str:
    """A preset's factors are tuned for one ratio of the image to the training size: with a
    model trained at another size (SD 2.1's 768-v model under a 512-base preset) they dilate
    for another scale. The warning, or '' where the sizes agree or one is unknown."""
    if preset.trained_size is None or model_side is None or model_side == preset.trained_size:
        return ""
    return (f"preset {preset.name} is tuned for models trained at {preset.trained_size}x"
            f"{preset.trained_size}; this model is trained at {model_side}x{model_side}, so its "
            f"factors and taus are made for another scale")
