"""What every text encoder shares: the encoder interface and where config files are found."""
from pathlib import Path

from torch import nn

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


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError
