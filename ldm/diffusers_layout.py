"""Models and VAEs in diffusers' layout under a single file's names: a pipeline folder (`unet/`,
`vae/`, `text_encoder/`, SDXL's `text_encoder_2/`, as `from_pretrained` caches them), a VAE folder
(`sd-vae-ft-mse/`) or a VAE's `diffusion_pytorch_model.safetensors`. The same weights, with blocks
named by position in another order and the text towers in transformers' CLIP layout.

- UNet: diffusers names a level's ResNets and attentions `down_blocks.{l}.resnets/attentions.{j}`,
  where a single file counts blocks across levels (`input_blocks.{n}.0/1`); the file's own ResNet
  count per level fixes the numbering. Attention blocks' inner names are the same.
- VAE: diffusers counts the decoder's levels from the bottom (`up_blocks.0` is `up.3` of four);
  the mid attention's 1x1 convs are Linear layers, `to_q/to_k/to_v/to_out.0` since diffusers 0.17
  (mid-2023) and `query/key/value/proj_attn` in files saved before, which the hub still serves;
  their [C, C] weights take the conv shape through RESHAPED (ldm.layouts).
- Text: SD 1.x's and SDXL's first tower are transformers' CLIP in both layouts (a prefix apart);
  OpenCLIP towers (SD 2.x, SDXL's second: `hidden_act` gelu in the tower's config.json, where
  OpenAI's CLIP has quick_gelu) take q/k/v as one in_proj and the projection transposed.
"""
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

# --- the VAE -----------------------------------------------------------------------------------

# (a diffusers block path, ours from its numbers and the decoder's level count)
VAE_BLOCKS: Tuple[Tuple[str, Callable[..., str]], ...] = (
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)",
     lambda levels, i, j: f"encoder.down.{i}.block.{j}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0",
     lambda levels, i: f"encoder.down.{i}.downsample"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
     lambda levels, i, j: f"decoder.up.{levels - 1 - int(i)}.block.{j}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
     lambda levels, i: f"decoder.up.{levels - 1 - int(i)}.upsample"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)",
     lambda levels, part, j: f"{part}.mid.block_{int(j) + 1}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0", lambda levels, part: f"{part}.mid.attn_1"),
)

# A layer's own name inside its block (or at the top), where diffusers' differs.
VAE_LAYERS = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "group_norm": "norm",
              "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}

VAE_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.",
               "decoder.mid_block.")


def is_diffusers_vae(keys) -> bool:
    return any(k.startswith(VAE_MARKERS) for k in keys)


def _renamed(key: str, blocks, layers, *numbers) -> str:
    """`key` with its block path and its layer's name in ours (a key no rule knows keeps its
    name: the model's fit then names it)."""
    head, _, rest = key.partition(".")
    block = head + "."  # (a top-level layer: decoder.conv_norm_out)
    for pattern, ours in blocks:
        found = re.match(pattern + r"\.", key)
        if found:
            block, rest = ours(*numbers, *found.groups()) + ".", key[found.end():]
            break
    layer, dot, kind = rest.rpartition(".")
    return block + (layers.get(layer, layer) + dot if dot else "") + kind


def _count(keys, pattern: str) -> int:
    """1 + the largest number `pattern`'s group takes in `keys` (0 for none)."""
    return 1 + max((int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m),
                   default=-1)


def vae_from_diffusers(vae: Dict) -> Dict:
    """A diffusers VAE's weights under the VAE's own names (`decoder.up.3.block.0...`)."""
    levels = _count(vae, r"decoder\.up_blocks\.(\d+)\.")
    return {_renamed(key, VAE_BLOCKS, VAE_LAYERS, levels): value for key, value in vae.items()}


# --- the UNet ----------------------------------------------------------------------------------

# (a diffusers block path, ours from the blocks a level has down, `per`, and the path's numbers);
# a level down holds `per - 1` ResNets (each maybe with an attention) and a downsampler.
UNET_BLOCKS: Tuple[Tuple[str, Callable[..., str]], ...] = (
    (r"down_blocks\.(\d+)\.resnets\.(\d+)",
     lambda per, up, l, j: f"input_blocks.{1 + int(l) * per + int(j)}.0"),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)",
     lambda per, up, l, j: f"input_blocks.{1 + int(l) * per + int(j)}.1"),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv",
     lambda per, up, l: f"input_blocks.{(int(l) + 1) * per}.0.op"),
    (r"mid_block\.resnets\.(\d+)", lambda per, up, j: f"middle_block.{2 * int(j)}"),
    (r"mid_block\.attentions\.0", lambda per, up: "middle_block.1"),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)",
     lambda per, up, l, j: f"output_blocks.{int(l) * per + int(j)}.0"),
    (r"up_blocks\.(\d+)\.attentions\.(\d+)",
     lambda per, up, l, j: f"output_blocks.{int(l) * per + int(j)}.1"),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",  # (after the level's last attention, if any)
     lambda per, up, l: f"output_blocks.{int(l) * per + per - 1}.{up(int(l))}.conv"),
    (r"time_embedding\.linear_(\d)", lambda per, up, n: f"time_embed.{2 * int(n) - 2}"),
    # SDXL's size and pooled-text embedding (`class_embedding` where diffusers' converter
    # does not take the model for SDXL: the tiny one)
    (r"(?:add|class)_embedding\.linear_(\d)", lambda per, up, n: f"label_emb.0.{2 * int(n) - 2}"),
    (r"conv_in", lambda per, up: "input_blocks.0.0"),
    (r"conv_norm_out", lambda per, up: "out.0"),
    (r"conv_out", lambda per, up: "out.2"),
)

# A ResNet's layers (an attention block's are named alike: theirs sit deeper, never matched)
UNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_from_diffusers(unet: Dict) -> Dict:
    """A diffusers UNet's weights under a single file's names (`model.diffusion_model.*`)."""
    per = 1 + _count(unet, r"down_blocks\.0\.resnets\.(\d+)\.")

    def up(level: int) -> int:  # the upsampler's place in its block: after an attention?
        return 2 if any(k.startswith(f"up_blocks.{level}.attentions.") for k in unet) else 1
    return {"model.diffusion_model." + _renamed(key, UNET_BLOCKS, UNET_LAYERS, per, up): value
            for key, value in unet.items()}


# --- the text towers ---------------------------------------------------------------------------

# transformers' CLIP text layer names -> OpenCLIP's: inside a block, and at the top
OPENCLIP_LAYERS = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                   ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."))
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}
LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)")


def openclip_from_transformers(tower: Dict, prefix: str) -> Dict:
    """A transformers CLIP text tower's weights under OpenCLIP's names: q/k/v as one in_proj,
    the projection (CLIPTextModelWithProjection's Linear) transposed."""
    import torch
    out, qkv = {}, {}
    for key, value in tower.items():
        layer = LAYER.match(key)
        if key in OPENCLIP_TOP:
            out[prefix + OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif layer and re.match(r"self_attn\.[qkv]_proj\.", layer.group(2)):
            which, kind = layer.group(2)[len("self_attn."):].split("_proj.")
            qkv.setdefault((layer.group(1), kind), {})[which] = value
        elif layer:
            rest = layer.group(2)
            rest = next((ours + rest[len(theirs):] for theirs, ours in OPENCLIP_LAYERS
                         if rest.startswith(theirs)), rest)
            out[f"{prefix}transformer.resblocks.{layer.group(1)}.{rest}"] = value
        else:
            out[prefix + key] = value  # (position_ids, ...: extras the fit drops or names)
    for (block, kind), parts in qkv.items():
        name = f"{prefix}transformer.resblocks.{block}.attn.in_proj_{kind}"
        if set(parts) != {"q", "k", "v"}:
            raise _error(f"the text tower lacks part of block {block}'s attention "
                         f"({', '.join(sorted(parts))} only)")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- folders -----------------------------------------------------------------------------------

# A part's weights file, by preference: safetensors before pickles, full precision before
# fp16; each may be sharded (`<name>.index.json` naming its shards).
WEIGHT_FILES = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "transformers": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                     "pytorch_model.fp16.bin"),
}

# A pipeline folder's text towers: subfolder -> the single file's prefix of the tower as OpenAI's
# CLIP (None: never one) and as OpenCLIP's; SDXL's first tower has its own prefix.
TEXT_TOWERS = {"text_encoder": ("cond_stage_model.transformer.", "cond_stage_model.model."),
               "text_encoder_2": (None, "conditioner.embedders.1.model.")}
SDXL_FIRST_TOWER = "conditioner.embedders.0.transformer."


def _error(message: str):
    from ldm.checkpoint import CheckpointError
    return CheckpointError(message)


def _shard_index(name: str) -> str:
    """The index file of a sharded weights file (a variant's as diffusers and transformers
    name it: `model.safetensors.index.fp16.json`)."""
    stem, variant, suffix = re.fullmatch(r"(\w+)(\.fp16)?(\.\w+)", name).groups()
    return f"{stem}{suffix}.index{variant or ''}.json"


def _read_json(path: Path) -> dict:
    """A JSON object file's contents; CheckpointError (one line) for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _error(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise _error(f"{path} holds no JSON object")
    return data


def weight_files(folder: Path, library: str):
    """The files holding a part's weights (one, or a sharded file's shards), or []."""
    for name in WEIGHT_FILES[library]:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / _shard_index(name)
        if index.is_file():
            shards = _read_json(index).get("weight_map")
            if not isinstance(shards, dict) or not all(
                    isinstance(shard, str) for shard in shards.values()):
                raise _error(f"the shard index {index} has no weight_map of file names")
            return [folder / shard for shard in sorted(set(shards.values()))]
    return []


def vae_file(path) -> Path:
    """`path` itself for a file; for a diffusers VAE folder (or a pipeline folder with `vae/`)
    the weights file in it, also for a model id in the Hugging Face cache
    (`madebyollin/sdxl-vae-fp16-fix`). CheckpointError (one line) for a folder without one."""
    path = Path(path)
    if not path.exists():
        path = cached_snapshot(str(path)) or path
    if not path.is_dir():
        return path
    for folder in (path, path / "vae"):
        found = weight_files(folder, "diffusers")
        if len(found) == 1:
            return found[0]
        if found:
            raise _error(f"VAE folder {folder} holds a sharded VAE, which --vae does not read")
    single = single_file_in(path, f"VAE folder {path}")  # (sd-vae-ft-mse-original's)
    if single is None:
        raise _error(f"VAE folder {path} holds no VAE weights file "
                     f"({WEIGHT_FILES['diffusers'][0]} or the like, in it or in its vae/, or "
                     f"one .safetensors / .ckpt)")
    return single


def single_file_in(folder: Path, what: str) -> Optional[Path]:
    """The one single-file checkpoint in `folder` (a .safetensors before a .ckpt), or None;
    CheckpointError (one line) where there are several to choose from."""
    for suffix in (".safetensors", ".ckpt"):
        files = sorted(folder.glob(f"*{suffix}"))
        if len(files) == 1:
            return files[0]
        if files:
            raise _error(f"{what} holds {len(files)} checkpoints: give one "
                         f"({', '.join(str(f) for f in files)})")
    return None


# A Hugging Face model id (`org/name`); not a relative path (`./x`, `models/sd.safetensors`)
REPO_ID = re.compile(r"(?!.*\.(?:ckpt|safetensors|pt|pth|bin|yaml)$)"
                     r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_cache() -> Path:
    """Where huggingface_hub (from_pretrained) caches model repositories, by its rules."""
    def env(name):
        value = os.environ.get(name)
        return os.path.expanduser(os.path.expandvars(value)) if value else None
    home = env("HF_HOME") or os.path.join(
        env("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub"))


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot of the Hugging Face model `org/name`: its `main`'s, or its only
    one; None where the model is not there (nothing is downloaded)."""
    if not REPO_ID.fullmatch(str(repo_id)):
        return None
    repo = hub_cache() / f"models--{str(repo_id).replace('/', '--')}"
    try:
        snapshot = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        found = sorted((repo / "snapshots").glob("*"))
        snapshot = found[0].name if len(found) == 1 else ""
    folder = repo / "snapshots" / snapshot
    return folder if snapshot and folder.is_dir() else None


def checkpoint_path(given) -> Path:
    """`given` itself where it exists; else the Hugging Face cache's snapshot of a model id
    (`stabilityai/stable-diffusion-2-1-base`, as the authors' scripts name models): its
    pipeline folder, or the one single-file checkpoint it holds (a .safetensors before a
    .ckpt). CheckpointError (one line) for a snapshot with neither, or with several files."""
    if Path(given).exists():
        return Path(given)
    snapshot = cached_snapshot(given)
    if snapshot is None or is_pipeline_folder(snapshot):
        return snapshot or Path(given)
    single = single_file_in(snapshot, f"{given} in the Hugging Face cache")
    if single is not None:
        return single
    raise _error(f"{given} is in the Hugging Face cache, but its snapshot {snapshot} holds "
                 f"neither a diffusers pipeline (unet/, ...) nor a .safetensors / .ckpt file: "
                 f"a partial download?")


def model_name(path) -> str:
    """A checkpoint's name for the images: its file or folder name; a Hugging Face cache
    snapshot's model id (and the file's name, for one of its files)."""
    path = Path(os.path.abspath(path))  # (`.`; links kept: a snapshot's files are links)
    snapshot = path if path.is_dir() else path.parent
    repo = snapshot.parent.parent.name
    if snapshot.parent.name != "snapshots" or not repo.startswith("models--"):
        return path.name
    model_id = repo[len("models--"):].replace("--", "/")
    return model_id if snapshot == path else f"{model_id}/{path.name}"


def vae_name(path) -> str:
    """A VAE file's name for the images; a diffusers VAE's is its folder's (or its pipeline's,
    or its model id)."""
    path = Path(os.path.abspath(path))
    if not path.name.startswith("diffusion_pytorch_model."):
        return path.name
    folder = path.parent.parent if path.parent.name == "vae" else path.parent
    return model_name(folder)


def is_pipeline_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "unet").is_dir()


def pipeline_files(path) -> Dict[str, list]:
    """A pipeline folder's weights files by part (`unet`, `vae`, text towers present)."""
    path = Path(path)
    parts = {"unet": "diffusers", "vae": "diffusers",
             **{name: "transformers" for name in TEXT_TOWERS}}
    files = {part: weight_files(path / part, library) for part, library in parts.items()
             if (path / part).is_dir()}
    if files.get("text_encoder_2") and not files.get("text_encoder"):
        raise _error(f"diffusers folder {path} is an SDXL refiner (text_encoder_2/ alone), "
                     f"which txt2img cannot run")
    for part in ("unet", "vae", "text_encoder", *files):  # (and any part given a folder)
        if not files.get(part):
            raise _error(f"diffusers folder {path} has no {part} weights ({part}/"
                         f"{WEIGHT_FILES[parts[part]][0]} or the like)")
    return files


def _hidden_act(folder: Path) -> str:
    """The text tower's activation (config.json), which tells OpenCLIP's from OpenAI's CLIP."""
    return _read_json(folder / "config.json").get("hidden_act", "")


def single_file_state(parts: Dict[str, Dict], hidden_acts: Dict[str, str]) -> Dict:
    """A pipeline's weights by part (`unet`, `vae`, text towers) under a single file's names;
    `hidden_acts`: each text tower's config.json `hidden_act`."""
    from ldm.layouts import VAE_PREFIX

    state = unet_from_diffusers(parts["unet"])
    vae = parts["vae"]
    state.update((VAE_PREFIX + k, v) for k, v in
                 (vae_from_diffusers(vae) if is_diffusers_vae(vae) else vae).items())
    for part, (openai, openclip) in TEXT_TOWERS.items():
        if part not in parts:
            continue
        if hidden_acts[part] == "gelu":  # (OpenCLIP's towers; OpenAI's CLIP: quick_gelu)
            state.update(openclip_from_transformers(parts[part], openclip))
        elif openai is None:
            raise _error(f"SDXL's second text tower should be OpenCLIP's (hidden_act gelu in "
                         f"{part}/config.json, not {hidden_acts[part]!r})")
        else:
            prefix = SDXL_FIRST_TOWER if "text_encoder_2" in parts else openai
            state.update((prefix + k, v) for k, v in parts[part].items())
    return state


# What a folder's scheduler/scheduler_config.json says that single files say by a marker key
# (MODEL_VARIANTS in ldm.layouts then refuses the model under a config that would sample it
# wrong): (setting, its value, the marker)
SCHEDULER_MARKERS = (("prediction_type", "v_prediction", "v_pred"),
                     ("rescale_betas_zero_snr", True, "ztsnr"))


def scheduler_markers(path: Path) -> Dict:
    import torch
    file = path / "scheduler" / "scheduler_config.json"
    if not file.exists():  # (the weights alone decide, as a single file's)
        return {}
    config = _read_json(file)
    return {marker: torch.zeros(0) for setting, value, marker in SCHEDULER_MARKERS
            if config.get(setting) == value}


def load_pipeline_folder(path) -> Dict:
    """A diffusers pipeline folder's weights under a single file's names, ready for the fit,
    with the markers its scheduler's settings stand for."""
    from ldm.checkpoint import load_state_dict

    path, parts = Path(path), {}
    for part, files in pipeline_files(path).items():
        parts[part] = {}
        for file in files:
            parts[part].update(load_state_dict(file))
    state = single_file_state(parts, {part: _hidden_act(path / part) for part in TEXT_TOWERS
                                      if part in parts})
    state.update(scheduler_markers(path))
    return state
