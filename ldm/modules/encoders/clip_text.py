"""The CLIP ViT-L/14 text encoder of SD 1.x (and SDXL's first text tower), built offline.

Parameter names follow transformers' `CLIPTextModel` (`transformer.text_model.*`), so published
checkpoints load key for key, but nothing here imports transformers or downloads anything: the
architecture is a small table of numbers, the BPE vocabulary is the one open_clip ships (the same
49408 tokens and merges as openai/clip-vit-large-patch14's tokenizer)."""
import json
import re

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.common import AbstractEncoder, clip_bpe, resolve_config_file

# transformers' CLIPTextConfig of openai/clip-vit-large-patch14 (the fields this model reads).
KNOWN_CONFIGS = {
    "openai/clip-vit-large-patch14": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5),
}

BOS, EOS = 49406, 49407
_SPECIAL = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
# CLIP's pre-tokeniser: contractions, letter runs, single digits, other non-space runs.
_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in _SPECIAL) + ")")


def text_config(version: str) -> dict:
    """The text model's config: a known model name, or a CLIPTextConfig JSON file."""
    if version in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[version])
    path = resolve_config_file(version)
    if path is None:
        raise ValueError(f"unknown CLIP text model {version!r}: not one of "
                         f"{', '.join(KNOWN_CONFIGS)} and no such config JSON")
    with open(path) as f:
        return json.load(f)


class ClipTokenizer:
    """The tokenizer of openai/clip-vit-large-patch14 as transformers applies it: ftfy clean-up,
    whitespace collapse, lower case, CLIP's BPE; <|startoftext|> ... <|endoftext|>, cut to
    `length` with the last slot kept for <|endoftext|>, padded with `pad` (SD: <|endoftext|>)."""

    def __init__(self, length: int = 77, pad: int = EOS):
        self.bpe = clip_bpe()
        self.length, self.pad = length, pad
        self.cut = []  # the texts of the last call that did not fit, and were cut

    def _encode_plain(self, text):
        text = " ".join(ftfy.fix_text(text).split()).lower()
        ids = []
        for word in _WORDS.findall(text):
            word = "".join(self.bpe.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.bpe.encoder[piece] for piece in self.bpe.bpe(word).split(" "))
        return ids

    def encode(self, text: str):
        """Token ids of one text, without start/end tokens (literal special tokens map to ids)."""
        ids = []
        for part in _SPECIAL_SPLIT.split(text):
            ids.extend([_SPECIAL[part]] if part in _SPECIAL else self._encode_plain(part))
        return ids

    def __call__(self, texts):
        rows = torch.full((len(texts), self.length), self.pad, dtype=torch.long)
        self.cut = []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.length - 2:
                self.cut.append(text)
            ids = [BOS] + ids[: self.length - 2] + [EOS]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class ClipAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal and nothing else: padding tokens are ordinary inputs in CLIP's text model.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ClipMLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = ClipAttention(width, cfg["num_attention_heads"])
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ClipMLP(width, cfg["intermediate_size"], _ACTIVATIONS[cfg["hidden_act"]])

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        positions = cfg["max_position_embeddings"]
        self.token_embedding = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embedding = nn.Embedding(positions, cfg["hidden_size"])
        # Published SD 1.x / SDXL files carry this buffer (older transformers saved it); it is
        # always 0..n-1, so it is rebuilt, never read from a file (some files hold it as floats).
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))

    def rebuildable_buffers(self):
        return {"position_ids": torch.arange(self.position_embedding.num_embeddings)[None]}

    def forward(self, tokens):
        n = tokens.shape[1]
        return self.token_embedding(tokens) + self.position_embedding.weight[:n]


class ClipEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class ClipTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def hidden_state(self, tokens, index: int):
        """transformers' `hidden_states[index]`: 0 is the embedding, k the output of layer k."""
        x = self.embeddings(tokens)
        for layer in self.encoder.layers[:index]:
            x = layer(x)
        return x


class ClipTextModel(nn.Module):
    """Only the wrapper level that gives the `text_model.` key prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.text_model = ClipTextTransformer(cfg)


class FrozenCLIPEmbedder(AbstractEncoder):
    """Token-wise CLIP text features for cross-attention.

    layer: "last" = after the final layer norm (SD 1.x); "penultimate" = the second-to-last
    layer's output, no final norm; "hidden" = `hidden_states[layer_idx]`, no final norm (SDXL
    uses 11 of 12)."""

    family = "sd1"
    LAYERS = ("last", "penultimate", "hidden")

    def __init__(self, version="openai/clip-vit-large-patch14", device="cpu", max_length=77,
                 freeze=True, layer="last", layer_idx=None, **_unused):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        cfg = text_config(version)
        n_layers = cfg["num_hidden_layers"]
        # transformers' hidden_states holds the embedding and each layer's output: n + 1 states
        if layer == "hidden" and (layer_idx is None or not -n_layers - 1 <= layer_idx <= n_layers):
            raise ValueError(f"layer 'hidden' needs a layer_idx within the {n_layers} layers "
                             f"(hidden_states[{-n_layers - 1}..{n_layers}]), got {layer_idx}")
        self.transformer = ClipTextModel(cfg)
        self.tokenizer = ClipTokenizer(max_length)
        self.layer = layer
        self.index = {"last": n_layers, "penultimate": n_layers - 1}.get(
            layer, (layer_idx or 0) % (n_layers + 1))
        self._unread = self._drop_unread()
        self.requires_grad_(False)

    def _drop_unread(self) -> list:
        """Remove the layers after the chosen one and, unless the last layer's output is taken,
        the final norm (SDXL: one layer, 14 MB in fp16). Returns their state-dict patterns,
        relative to this module (see unread_keys)."""
        text = self.transformer.text_model
        layers = text.encoder.layers
        unread = [f"transformer.text_model.encoder.layers.{i}.*"
                  for i in range(self.index, len(layers))]
        del layers[self.index:]
        if self.layer != "last":
            del text.final_layer_norm
            unread.append("transformer.text_model.final_layer_norm.*")
        return unread

    def unread_keys(self) -> list:
        """Keys of this tower in checkpoints that it does not read (ldm.layouts drops them
        without a word, and does not ask for them)."""
        return list(self._unread)

    def tokenize(self, prompts):
        return self.tokenizer(prompts)

    def truncated(self, prompts, tokens):
        return self.tokenizer.cut  # counted while tokenizing `prompts`

    def encode_tokens(self, tokens):
        text = self.transformer.text_model
        x = text.hidden_state(tokens.to(text.embeddings.token_embedding.weight.device), self.index)
        return text.final_layer_norm(x) if self.layer == "last" else x

