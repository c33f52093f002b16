"""What every text encoder shares: the encoder interface, where config files are found, and how
open_clip is imported."""
import functools
import importlib
import sys
from pathlib import Path

from torch import nn

from ldm.modules.encoders.conditioning import Conditioning
from ldm.progress import warn_once

# Where a text-encoder config named in a model yaml (`arch: NAME`, `version: NAME.json`) that is
# not a known model is looked for: the model yaml's folder (registered when it is loaded), then
# configs/openclip.
_CONFIG_DIRS = [Path(__file__).resolve().parents[3] / "configs" / "openclip"]


def register_config_dir(path):
    """Let encoder configs resolve relative to `path` (e.g. the directory of a model yaml)."""
    path = Path(path)
    if path not in _CONFIG_DIRS:
        _CONFIG_DIRS.insert(0, path)


def resolve_config_file(name: str):
    """The JSON file `name` denotes (a path, or NAME / NAME.json in a registered folder)."""
    candidates = [Path(name)]
    for folder in _CONFIG_DIRS:
        candidates += [folder / name, folder / f"{name}.json"]
    return next((p for p in candidates if p.suffix == ".json" and p.is_file()), None)


# open_clip's package import pulls in these optional integrations (HF text towers, timm vision
# towers, CoCa generation) if they are installed; we build only CLIP text towers from open_clip's
# own modules, so they are dead weight: on a GPU image that has transformers, timm and their
# dependencies, `import open_clip` took 8.7 s (H200 machine) of the CLI's load.
OPEN_CLIP_UNUSED_EXTRAS = ("transformers", "timm")


def import_open_clip():
    """open_clip, imported with its optional extras hidden (open_clip falls back to "not
    installed" for each). Extras already imported stay as they are, and every hidden name is
    importable again afterwards; only open_clip's HF/timm towers are unusable in this process.
    An open_clip that needs an extra after all is imported the plain way."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    hidden = [name for name in OPEN_CLIP_UNUSED_EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # makes `import name` raise ImportError
    try:
        return importlib.import_module("open_clip")
    except ImportError as err:
        if err.name not in hidden:
            raise
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    return importlib.import_module("open_clip")


_WARNED_CUT = set()


def _shortened(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else text[:keep] + "..."


class AbstractEncoder(nn.Module):
    """A text tower: prompts -> tokens (`tokenize`) -> the cross-attention context
    (`encode_tokens`). Its conditioning ignores the image size, and CFG's unconditional branch
    encodes the negative prompts ("" included): the interface SDXL's conditioner shares."""

    def tokenize(self, prompts):
        raise NotImplementedError

    def encode_tokens(self, tokens):
        raise NotImplementedError

    def truncated(self, prompts, tokens):
        """The prompts whose tokens did not all fit the context (the rest is cut)."""
        return []

    def forward(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenize(list(prompts))
        for prompt in self.truncated(prompts, tokens):
            # once a prompt or negative prompt in the process, not once a batch and tower
            warn_once(_WARNED_CUT, prompt, f"the text {_shortened(prompt)!r} exceeds the text "
                      f"encoder's {tokens.shape[-1]}-token context; the rest is ignored")
        return self.encode_tokens(tokens)

    def encode(self, prompts):
        return self(prompts)

    def condition(self, prompts, size=None) -> Conditioning:
        return Conditioning(self.encode(prompts))

    def unconditional(self, negative_prompts, size=None) -> Conditioning:
        return Conditioning(self.encode(negative_prompts))


@functools.lru_cache(maxsize=1)
def clip_bpe():
    """open_clip's BPE tokenizer (CLIP's 49408-token vocabulary), built once per process for
    the CLIP tower and the OpenCLIP towers' length checks: reading the vocabulary takes 0.1 s
    (open_clip.tokenize keeps a copy of its own)."""
    return import_open_clip().tokenizer.SimpleTokenizer()
