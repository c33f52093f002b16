"""SDXL's conditioner, computed as Stability's sgm computes it: two text towers whose token
features are concatenated into the cross-attention context, and a vector of the big tower's
pooled text embedding followed by sinusoidal embeddings of the image size numbers. Module and
parameter names follow sgm (`conditioner.embedders.N.*`) so that SDXL checkpoints load as they
are."""
from typing import Sequence, Tuple

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import timestep_embedding
from ldm.modules.encoders.conditioning import Conditioning
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """OpenCLIP ViT-bigG text tower (sgm, `legacy: false`): returns the penultimate block's
    tokens (no final norm) and the pooled embedding: ln_final(last block)[first end-of-text
    token] @ text_projection. Tokens are padded with 0, so argmax finds that token."""

    POOLED = True

    def __init__(self, arch="ViT-bigG-14", version=None, device="cpu", max_length=77,
                 freeze=True, layer="penultimate", always_return_pooled=True, legacy=False,
                 **_unused):
        if layer != "penultimate" or legacy or not always_return_pooled:
            raise ValueError("FrozenOpenCLIPEmbedder2 supports SDXL's setting only: "
                             "layer penultimate, always_return_pooled true, legacy false")
        super().__init__(arch, version, device, max_length, freeze, layer="last")

    def encode_tokens(self, tokens) -> Tuple[torch.Tensor, torch.Tensor]:
        *inner, last = self.model.transformer.resblocks
        penultimate = self.run_blocks(self.embed(tokens), inner)
        final = self.model.ln_final(self.run_blocks(penultimate, [last]))
        eot = final[torch.arange(final.shape[0]), tokens.argmax(dim=-1)]
        return penultimate, eot @ self.model.text_projection


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of a (B, N) input as a `outdim`-wide sinusoidal embedding, concatenated:
    (B, N * outdim). Computed in float32 like the UNet's timestep embedding (sgm does the
    same; at 4096 float32 rounding of v * f moves cos/sin by ~1e-4, so the dtype matters)."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        b, n = x.shape
        emb = timestep_embedding(x.reshape(-1).float(), self.outdim)
        return emb.reshape(b, n * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm's conditioner: embedders fed from named inputs. Outputs with 3 dims join the
    cross-attention context, 2-dim ones the vector, concatenated in embedder order. For CFG,
    an empty negative prompt gives all-zero text parts (sgm's force_uc_zero_embeddings for
    "txt") and the same size parts."""

    family = "sdxl"
    TEXT = "txt"

    def __init__(self, emb_models):
        super().__init__()
        self.embedders = nn.ModuleList()
        self.input_keys = []
        for spec in emb_models:
            self.embedders.append(instantiate_from_config(spec).eval())
            self.input_keys.append(spec.get("input_key", self.TEXT))
        self.requires_grad_(False)

    @property
    def _device(self):
        return next(self.parameters()).device

    def inputs(self, prompts: Sequence[str], size) -> dict:
        """sgm's batch for images of `size` (H, W): original = target = (H, W), crop (0, 0),
        as diffusers and ScaleCrafter set them."""
        if size is None:
            raise ValueError("the SDXL conditioner needs the image size (H, W)")
        b = len(prompts)

        def pair(values):
            return torch.tensor([list(values)] * b, dtype=torch.float32, device=self._device)
        return {self.TEXT: list(prompts), "original_size_as_tuple": pair(size),
                "crop_coords_top_left": pair((0, 0)), "target_size_as_tuple": pair(size)}

    def _encode(self, prompts, size, keep_text) -> Conditioning:
        batch = self.inputs(prompts, size)
        context, vector = [], []
        for embedder, key in zip(self.embedders, self.input_keys):
            out = embedder(batch[key])
            for part in (out if isinstance(out, (tuple, list)) else (out,)):
                if key == self.TEXT and keep_text is not None:
                    part = part * keep_text.view(-1, *[1] * (part.dim() - 1)).to(part.dtype)
                (context if part.dim() == 3 else vector).append(part)
        return Conditioning(torch.cat(context, dim=-1), torch.cat(vector, dim=-1))

    def condition(self, prompts, size) -> Conditioning:
        return self._encode(prompts, size, keep_text=None)

    def unconditional(self, negative_prompts, size) -> Conditioning:
        keep = torch.tensor([bool(p) for p in negative_prompts], device=self._device)
        return self._encode(negative_prompts, size, keep_text=keep)

    def encode(self, prompts, size=None):
        return self.condition(prompts, size)
