"""Text conditioning: the OpenCLIP text tower of SD 2.x (the CLIP text model of SD 1.x lives in
clip_text.py). Weights always come from the SD checkpoint, so the towers are built without
downloading anything (and without the unused visual tower). open_clip is imported when a tower
is built, not with this module: naming a config's family must not cost its 2-9 s."""
import json

import torch
from torch import nn

# Config targets name every text encoder in this module (`ldm.modules.encoders.modules.X`).
from ldm.modules.encoders.clip_text import FrozenCLIPEmbedder  # noqa: F401
from ldm.modules.encoders.common import (  # noqa: F401  (re-exported)
    AbstractEncoder, clip_bpe, import_open_clip, register_config_dir, resolve_config_file)


def resolve_openclip_config(arch: str) -> dict:
    """Model config of `arch`: an open_clip model name, or a path to an open_clip config JSON."""
    path = resolve_config_file(arch)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    config = import_open_clip().get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown OpenCLIP architecture {arch!r}: not an open_clip model name "
                         f"and no {arch}.json found")
    return config


def build_text_tower(arch: str) -> nn.Module:
    """An open_clip CLIP holding only its text tower; parameters are on the meta device when
    the caller builds under `torch.device('meta')`, ready for checkpoint weights."""
    config = dict(resolve_openclip_config(arch))
    config.pop("custom_text", None)
    model = import_open_clip().model.CLIP(**config)
    del model.visual
    return model


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """Token-wise CLIP text features, from the last or the penultimate transformer layer."""

    family = "sd2"

    LAYERS = ("last", "penultimate")
    POOLED = False  # whether the pooled embedding (ln_final, text_projection) is read

    def __init__(self, arch="ViT-H-14", version=None, device="cpu", max_length=77, freeze=True,
                 layer="last", **_unused):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.model = build_text_tower(arch)
        self.max_length = max_length
        self._unread = self._drop_unread(skipped_blocks=0 if layer == "last" else 1)
        self.requires_grad_(False)

    def _drop_unread(self, skipped_blocks: int) -> list:
        """Remove what the published files carry and these features never pass through: the
        blocks after the chosen layer, CLIP's logit scale and, unless pooled, the projection
        (SD 2.x: 50 MB; files converted back from diffusers lack exactly these). Returns their
        state-dict patterns, relative to this module (see unread_keys)."""
        blocks = self.model.transformer.resblocks
        unread = [f"model.transformer.resblocks.{i}.*"
                  for i in range(len(blocks) - skipped_blocks, len(blocks))]
        del blocks[len(blocks) - skipped_blocks:]
        for name in ("logit_scale", "logit_bias") + (() if self.POOLED else ("text_projection",)):
            if hasattr(self.model, name):
                delattr(self.model, name)
                unread.append(f"model.{name}")
        return unread

    def unread_keys(self) -> list:
        """Keys of this tower in checkpoints that it does not read (ldm.layouts drops them
        without a word, and does not ask for them)."""
        return list(self._unread)

    def tokenize(self, prompts):
        tokens = import_open_clip().tokenize(prompts, context_length=self.max_length)
        return tokens.to(self.model.token_embedding.weight.device)

    def truncated(self, prompts, tokens):
        # open_clip pads with 0, so only a prompt that fills the last slot can have been cut;
        # those are counted (its tokenizer is built then, not for every short prompt)
        full = [p for p, row in zip(prompts, tokens) if int(row[-1]) != 0]
        if not full:
            return []
        counter = clip_bpe()
        return [p for p in full if len(counter.encode(p)) > self.max_length - 2]

    def encode_tokens(self, tokens):
        x = self.run_blocks(self.embed(tokens), self.model.transformer.resblocks)
        return self.model.ln_final(x)

    def embed(self, tokens):
        return self.model.token_embedding(tokens) + self.model.positional_embedding

    def run_blocks(self, x, blocks):
        """`blocks` of the text transformer under the causal mask, batch-first in and out
        (open_clip >= 2.24 runs its transformer batch-first; older releases sequence-first)."""
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        batch_first = getattr(self.model.transformer, "batch_first", False)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=causal)
        return x if batch_first else x.transpose(0, 1)
