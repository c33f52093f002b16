"""ScaleCrafter settings files and their translation to our UNet's conv names.

A dilation settings file has one `module_name:factor` a line; a dispersion file one module name a
line. Names may be ours (`input_blocks.4.0.in_layers.2`) or diffusers' (`down_blocks.1.resnets.0.conv1`,
as in the authors' published files); each must denote one 3x3 convolution of the UNet.

The authors' SDXL files also name convs SDXL lacks (they were written for a 4-level UNet; diffusers
silently patched only the names it found). A diffusers name is skipped, with one warning line per
file, when it is a conv of the SD 1.x/2.x layout (SD_LAYOUT_SLOTS) that this UNet lacks; any
other unknown name is refused as a typo (on SD 1.x/2.x, every unknown name)."""
import math
from pathlib import Path
from typing import Dict, FrozenSet, List

from torch import nn

from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
from ldm.scalecrafter.redilation import MAX_FACTOR, conv3x3_names, uniform_dilation_map
from ldm.scalecrafter.schedule import ScaleCrafterSettings


def _resnet_convs(prefix_ours, prefix_theirs):
    return {f"{prefix_theirs}.conv1": f"{prefix_ours}.in_layers.2",
            f"{prefix_theirs}.conv2": f"{prefix_ours}.out_layers.3"}


def diffusers_conv_names(unet: nn.Module) -> Dict[str, str]:
    """diffusers UNet2DConditionModel conv name -> our conv name, derived from the block layout."""
    names = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}
    level, res = 0, 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if isinstance(block[0], ResBlock):
            names.update(_resnet_convs(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{res}"))
            res += 1
        elif isinstance(block[0], Downsample):
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            level, res = level + 1, 0
    names.update(_resnet_convs("middle_block.0", "mid_block.resnets.0"))
    names.update(_resnet_convs("middle_block.2", "mid_block.resnets.1"))
    level, res = 0, 0
    for i, block in enumerate(unet.output_blocks):
        names.update(_resnet_convs(f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{res}"))
        res += 1
        for j, layer in enumerate(block):
            if isinstance(layer, Upsample):
                names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{i}.{j}.conv"
                level, res = level + 1, 0
    return names


class SettingsError(ValueError):
    pass


def _sd_layout_slots() -> FrozenSet[str]:
    """The 3x3 conv names of the diffusers SD 1.x/2.x UNet (4 levels; 2 ResNets a level down, 3
    up; no sampler at the deepest level), which the authors' settings files use for SDXL too."""
    names = {"conv_in", "conv_out"} | {f"mid_block.resnets.{r}.conv{c}" for r in (0, 1)
                                       for c in (1, 2)}
    for level in range(4):
        names |= {f"down_blocks.{level}.resnets.{r}.conv{c}" for r in (0, 1) for c in (1, 2)}
        names |= {f"up_blocks.{level}.resnets.{r}.conv{c}" for r in (0, 1, 2) for c in (1, 2)}
        if level < 3:
            names |= {f"down_blocks.{level}.downsamplers.0.conv",
                      f"up_blocks.{level}.upsamplers.0.conv"}
    return frozenset(names)


# Names of that layout a UNet may lack (SDXL has 3 levels): skipped with a warning, as the
# authors' diffusers code skipped them; any other unknown name is an error (a typo).
SD_LAYOUT_SLOTS = _sd_layout_slots()


def _absent_slot(name: str, translation: Dict[str, str]) -> bool:
    """A conv of the SD 1.x/2.x layout that this UNet's layout does not have."""
    return name in SD_LAYOUT_SLOTS and name not in translation


def _warn_skipped(path, skipped: List[str]):
    """One line per file read."""
    from ldm.progress import warn

    if skipped:
        warn(f"{path}: skipped {len(skipped)} names this UNet does not have (as diffusers "
             f"did): {', '.join(skipped)}")


def _lines(path):
    """(line number, text) of each entry, comments and blank lines left out; a file with no
    entry is refused (it would silently switch its feature off)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise SettingsError(f"settings file {path} {what}")
    try:  # utf-8-sig: Notepad starts its UTF-8 files with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SettingsError(f"settings file {path} is not UTF-8 text (byte {err.start}): a "
                            f"binary file?") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((number, line))
    if not entries:
        raise SettingsError(f"settings file {path} has no entries")
    return entries


def _our_name(name, translation, ours, path, number, skipped):
    """Our conv name for `name`, or None (recorded in `skipped`) for an absent diffusers slot."""
    if name in ours:
        return name
    if name in translation:
        return translation[name]
    if _absent_slot(name, translation):
        skipped.append(name)
        return None
    raise SettingsError(f"{path}:{number}: {name!r} is not a 3x3 convolution of this UNet")


def read_dilation_settings(path, unet: nn.Module) -> Dict[str, float]:
    translation, ours = diffusers_conv_names(unet), set(conv3x3_names(unet))
    factors, skipped, first_line = {}, [], {}
    for number, line in _lines(path):
        name, sep, value = line.rpartition(":")
        if not sep:
            raise SettingsError(f"{path}:{number}: expected 'module_name:factor', got {line!r}")
        try:
            factor = float(value)
        except ValueError:
            raise SettingsError(f"{path}:{number}: factor {value!r} is not a number") from None
        if not (math.isfinite(factor) and 1 <= factor <= MAX_FACTOR):
            raise SettingsError(f"{path}:{number}: factor must be a number from 1 (the trained "
                                f"conv) to {MAX_FACTOR:g}, got {value.strip()}")
        ours_name = _our_name(name.strip(), translation, ours, path, number, skipped)
        if ours_name is None:
            continue
        if factors.get(ours_name, factor) != factor:  # (once under its diffusers name, maybe)
            raise SettingsError(f"{path}:{number}: {ours_name} has factor "
                                f"{factors[ours_name]:g} at line {first_line[ours_name]}: one "
                                f"factor a conv")
        factors[ours_name] = factor
        first_line.setdefault(ours_name, number)
    _warn_skipped(path, skipped)
    return factors


def read_conv_list(path, unet: nn.Module) -> FrozenSet[str]:
    translation, ours = diffusers_conv_names(unet), set(conv3x3_names(unet))
    skipped = []
    names = {_our_name(line, translation, ours, path, number, skipped)
             for number, line in _lines(path)}
    _warn_skipped(path, skipped)
    return frozenset(names - {None})


def build_settings(unet: nn.Module, opts) -> ScaleCrafterSettings:
    """ScaleCrafter settings from generation options (see ldm.pipeline.GenerationOptions)."""
    from ldm.scalecrafter.dispersion import load_dispersion_transform

    if opts.dilate is not None:
        dilation = uniform_dilation_map(unet, opts.dilate, opts.dilate_skip)
    elif opts.dilate_settings:
        dilation = read_dilation_settings(opts.dilate_settings, unet)
    else:
        dilation = {}
    ndcfg = read_dilation_settings(opts.ndcfg_dilate_settings, unet) \
        if opts.ndcfg_dilate_settings else {}
    # the list is read (and its names checked) even where inflate_tau 0 switches it off
    listed = read_conv_list(opts.disperse_settings, unet) if opts.disperse_settings else frozenset()
    disperse = listed if opts.inflate_tau > 0 else frozenset()
    transform = None
    if disperse and opts.disperse_transform:  # (none: refused by ScaleCrafterSettings)
        transform = load_dispersion_transform(opts.disperse_transform)
        if transform.shape[1] != 9:  # what it maps: the UNet's 3x3 kernels
            raise SettingsError(f"{opts.disperse_transform}: the transform maps kernels of "
                                f"{transform.shape[1]} entries; the UNet's are 3x3 (9 columns)")
    return ScaleCrafterSettings(
        dilation=dilation, dilate_tau=opts.dilate_tau if dilation else 0,
        progressive=opts.progressive_dilate, ndcfg_dilation=ndcfg,
        ndcfg_tau=opts.ndcfg_tau if ndcfg else 0, disperse=disperse, transform=transform,
        inflate_tau=opts.inflate_tau if disperse else 0)
