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
    """--tile_size: an integer or 'auto' (range checks come later, with the other numbers)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
