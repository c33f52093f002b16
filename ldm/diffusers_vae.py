"""A VAE file in diffusers' layout (`vae/diffusion_pytorch_model.safetensors`, or `.bin`) under
our names: the same weights, its blocks named by position in another order.

diffusers counts the decoder's levels from the bottom (`up_blocks.0` is our `up.3` of four), calls
a level's ResNets `resnets`, the middle ResNets `mid_block.resnets.0/1` and the mid attention's
1x1 convs Linear layers: `to_q/to_k/to_v/to_out.0` since diffusers 0.17 (mid-2023),
`query/key/value/proj_attn` in files saved before, which the hub still serves. Their Linear
weights [C, C] take our conv shape through RESHAPED (ldm.layouts), as the back-converted whole
models' do.
"""
import re
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

# (a diffusers block path, ours from its numbers and the decoder's level count)
BLOCKS: Tuple[Tuple[str, Callable[..., str]], ...] = (
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)",
     lambda levels, i, j: f"encoder.down.{i}.block.{j}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", lambda levels, i: f"encoder.down.{i}.downsample"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
     lambda levels, i, j: f"decoder.up.{levels - 1 - int(i)}.block.{j}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
     lambda levels, i: f"decoder.up.{levels - 1 - int(i)}.upsample"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)",
     lambda levels, part, j: f"{part}.mid.block_{int(j) + 1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0", lambda levels, part: f"{part}.mid.attn_1"),
)

# A layer's own name inside its block (or at the top), where diffusers' differs.
LAYERS = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "group_norm": "norm",
          "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
          "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}

MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")


def is_diffusers_vae(keys) -> bool:
    return any(k.startswith(MARKERS) for k in keys)


def _our_name(key: str, levels: int) -> str:
    head, _, rest = key.partition(".")
    block = head + "."  # (a top-level layer: decoder.conv_norm_out)
    for pattern, ours in BLOCKS:
        found = re.match(pattern + r"\.", key)
        if found:
            block, rest = ours(levels, *found.groups()) + ".", key[found.end():]
            break
    layer, dot, kind = rest.rpartition(".")
    return block + LAYERS.get(layer, layer) + dot + kind if dot else key


def ours_from_diffusers(vae: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The VAE's weights under our names. A key no rule knows keeps its name (the model's fit
    then names it)."""
    levels = 1 + max((int(m.group(1)) for m in map(re.compile(r"decoder\.up_blocks\.(\d+)\.")
                                                    .match, vae) if m), default=-1)
    return {_our_name(key, levels): value for key, value in vae.items()}


# The weights file of a diffusers VAE folder (`vae/` in a pipeline's), by preference.
FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def vae_file(path) -> Path:
    """`path` itself for a file; for a diffusers VAE folder (or a pipeline folder with `vae/`)
    the weights file in it. CheckpointError (one line) for a folder without one."""
    from ldm.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_dir():
        return path
    for folder in (path, path / "vae"):
        found = next((folder / name for name in FOLDER_FILES if (folder / name).is_file()), None)
        if found is not None:
            return found
    raise CheckpointError(f"VAE folder {path} holds no VAE weights file ({FOLDER_FILES[0]} or "
                          f"the like, in it or in its vae/)")
