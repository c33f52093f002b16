"""How this folder's files were made (not run by the tests; needs `pip install diffusers`):
diffusers' own converters and model classes, so the tests meet its layout as it writes it.

- tiny-sd21-vae.safetensors: the tiny SD 2.1 reference model's VAE through
  diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint (diffusers 0.42.1);
- sd-vae.keys.json: the key names and shapes of diffusers' AutoencoderKL with the SD 1.x / 2.x /
  SDXL VAE's config (built on the meta device), as diffusion_pytorch_model.safetensors holds them.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TINY = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference/tiny/tiny-sd21.ckpt")
LEVELS = 4
config = {"down_block_types": ["DownEncoderBlock2D"] * LEVELS,
          "up_block_types": ["UpDecoderBlock2D"] * LEVELS}
state = torch.load(TINY, map_location="cpu", weights_only=True)["state_dict"]
vae = convert_ldm_vae_checkpoint(state, config)
save_file({k: v.contiguous() for k, v in vae.items()}, HERE / "tiny-sd21-vae.safetensors")

with torch.device("meta"):
    full = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512),
                         down_block_types=config["down_block_types"],
                         up_block_types=config["up_block_types"])
keys = {k: list(v.shape) for k, v in full.state_dict().items()}
lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(keys.items()))
(HERE / "sd-vae.keys.json").write_text("{\n" + lines + "\n}\n")
