"""What the command-line scripts share: one-line flag errors and the --tile_size value."""
import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line on stderr (exit 2), not a usage dump."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"error: {message} (see --help)\n")


class UsageError(Exception):
    """Input a script refuses: reported as its message alone, in one line."""


def tile_size_arg(text):
    """--tile_size: an integer, HxW (the `Tiles` an image's metadata names) or 'auto' (range
    checks come later, with the other numbers)."""
    if text == "auto":
        return text
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) == 1:
        return sides[0]
    if len(sides) == 2:
        return sides
    raise argparse.ArgumentTypeError(f"expected an integer, HxW or 'auto', got {text!r}")
