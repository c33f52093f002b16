"""What the command-line scripts (and the API's inputs) share: one-line flag errors, the
--tile_size value, repository paths, and removing the output folders a run made nothing in.
Torch-free: a Ctrl-C while torch is still being imported must not import it again."""
import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The options that name settings files (GenerationOptions' and txt2img's flags)
SETTINGS_FILES = ("dilate_settings", "ndcfg_dilate_settings", "disperse_settings",
                  "disperse_transform")


def repository_fallback(path) -> Path:
    """A relative path that does not exist here but does in the repository (the default config,
    run from another folder) means the repository's."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line on stderr (exit 2), not a usage dump."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"error: {message} (see --help)\n")


def remove_if_empty(folders):
    """Remove the folders (deepest first) that are still empty: what a run that made nothing
    leaves behind of the folders it created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone: keep going up only while they go
            break


class UsageError(Exception):
    """Input a script refuses: reported as its message alone, in one line."""


def parse_tile_size(text: str):
    """A --tile_size text: 'auto', an integer, or HxW (the `Tiles` an image's metadata names)
    as an (h, w) pair; ValueError otherwise (range checks come later, with the other numbers)."""
    if text == "auto":
        return text
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2):
        raise ValueError(f"expected an integer, HxW or 'auto', got {text!r}")
    return sides[0] if len(sides) == 1 else sides


DEVICE_NAMES = ("cpu", "cuda", "auto")


def device_arg(text: str) -> str:
    """A --device: cpu, cuda (the current GPU), cuda:N or auto; checked against the machine
    later, where torch is imported anyway."""
    kind, colon, index = text.partition(":")
    if text in DEVICE_NAMES or (kind == "cuda" and colon and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")


def device_type(device: str) -> str:
    """'cuda' for 'cuda:1': what the per-device tables (autocast dtypes, ...) are keyed by."""
    return device.partition(":")[0]


def tile_size_arg(text):
    try:
        return parse_tile_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
