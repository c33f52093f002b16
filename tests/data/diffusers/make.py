"""How this folder's files were made (not run by the tests; needs `pip install diffusers==0.42.1`):
with diffusers' own converters (diffusers.loaders.single_file_utils, the code behind its
`from_single_file`) and model classes, so the tests meet diffusers' layout as diffusers writes it.

    python tests/data/diffusers/make.py ../shared/reference

- tiny-sd21-vae.safetensors: the tiny SD 2.1 reference model's VAE, converted;
- sd-vae.keys.json: the names and shapes of diffusers' AutoencoderKL with the SD 1.x / 2.x /
  SDXL VAE's config, built on the meta device (diffusion_pytorch_model.safetensors' keys);
- tiny-<model>.map.json: for each part of the tiny reference models in diffusers' layout (unet,
  vae, text_encoder, text_encoder_2), each diffusers key's source in the single file:
  [single-file key, first element, shape, transposed]. The converters ran on a copy of the file
  whose every element is distinct (float64 counts), and each converted tensor was traced back to
  the elements it holds; the tests rebuild the folder from the reference file with it;
- full-<model>.keys.json: the same converters over the full-size key manifests (meta tensors):
  the names and shapes of each part of the real models' diffusers folders.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from diffusers import AutoencoderKL
from diffusers.loaders import single_file_utils as convert
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REF = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
LEVELS = 4
VAE_CONFIG = {"down_block_types": ["DownEncoderBlock2D"] * LEVELS,
              "up_block_types": ["UpDecoderBlock2D"] * LEVELS}
TINY = {"sd21": ("tiny/tiny-sd21.ckpt", "tiny/tiny-sd21.yaml"),
        "sd15": ("tiny-sd1/tiny-sd15.ckpt", "tiny-sd1/tiny-sd15.yaml"),
        "sdxl": ("tiny-sdxl/tiny-sdxl.safetensors", "tiny-sdxl/tiny-sdxl.yaml")}
FULL = {"sd21": ("sd21-v2-inference.keys.json", "v2-inference.yaml"),
        "sd15": ("sd15-v1-inference.keys.json", "v1-inference.yaml"),
        "sdxl": ("sdxl-base.keys.json", "sd_xl_base.yaml")}


def read(path):
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def parts(state, original_config, model):
    """The diffusers folder's parts, as the converters write them."""
    unet_config = convert.create_unet_diffusers_config_from_ldm(original_config, state)
    out = {"unet": convert.convert_ldm_unet_checkpoint(state, unet_config),
           "vae": convert.convert_ldm_vae_checkpoint(state, VAE_CONFIG)}
    if model == "sd15":
        out["text_encoder"] = convert.convert_ldm_clip_checkpoint(state)
    elif model == "sd21":  # (its width where the file has no projection)
        width = state["cond_stage_model.model.token_embedding.weight"].shape[1]
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        out["text_encoder"] = convert.convert_open_clip_checkpoint(stub, state)
    else:
        out["text_encoder"] = convert.convert_ldm_clip_checkpoint(
            state, remove_prefix="conditioner.embedders.0.transformer.")
        width = state["conditioner.embedders.1.model.token_embedding.weight"].shape[1]
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        out["text_encoder_2"] = convert.convert_open_clip_checkpoint(
            stub, state, prefix="conditioner.embedders.1.model.")
    return out


def traced(converted, tagged, starts):
    """Each converted tensor's source: [key, first element, shape, transposed]."""
    sources = sorted((start, key) for key, start in starts.items())
    out = {}
    for name, value in converted.items():
        first = int(value.flatten()[0])
        start, key = max((s, k) for s, k in sources if s <= first)
        source = tagged[key]
        if torch.equal(value, source.t()) if source.dim() == 2 else False:
            out[name] = [key, 0, list(value.shape), True]
            continue
        offset = first - start
        flat = source.flatten()[offset:offset + value.numel()]
        assert torch.equal(value.flatten(), flat), name
        out[name] = [key, offset, list(value.shape), False]
    return out


def write_json(path, data):
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def main():
    state = read(REF / TINY["sd21"][0])
    vae = convert.convert_ldm_vae_checkpoint(state, VAE_CONFIG)
    save_file({k: v.contiguous() for k, v in vae.items()}, HERE / "tiny-sd21-vae.safetensors")
    with torch.device("meta"):
        full_vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                 layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                                 **VAE_CONFIG)
    keys = {k: list(v.shape) for k, v in full_vae.state_dict().items()}
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(keys.items()))
    (HERE / "sd-vae.keys.json").write_text("{\n" + lines + "\n}\n")

    for model, (file, config) in TINY.items():
        state = {k: v for k, v in read(REF / file).items() if v.is_floating_point()}
        starts, tagged, at = {}, {}, 1
        for key, value in state.items():
            starts[key] = at
            tagged[key] = torch.arange(at, at + value.numel(), dtype=torch.float64).reshape(
                value.shape)
            at += value.numel()
        original = yaml.safe_load((REF / config).read_text())
        write_json(HERE / f"tiny-{model}.map.json",
                   {part: traced(converted, tagged, starts)
                    for part, converted in parts(tagged, original, model).items()})

    repo = HERE.parents[2]
    for model, (manifest, config) in FULL.items():
        shapes = json.loads((REF / manifest).read_text())
        meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        original = yaml.safe_load((repo / "configs" / "stable-diffusion" / config).read_text())
        write_json(HERE / f"full-{model}.keys.json",
                   {part: {k: list(v.shape) for k, v in converted.items()}
                    for part, converted in parts(meta, original, model).items()})


if __name__ == "__main__":
    main()
