"""Progress bars for long work: nested and erased when done on a terminal (or in a notebook);
one line per finished bar in a log file. Warnings are written above them, not through them."""
import os
import sys

from tqdm.auto import tqdm

# How often a bar redraws in a log file, in seconds: each redraw is appended, not replaced.
FILE_REDRAW_S = 5.0


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs), transient (leave=False) unless told otherwise. Where the bars
    go to a file, nesting and erasing would write cursor-movement codes into it (a file can't
    move up a line), so every bar there stays on its own lines and is kept when done."""
    kwargs.setdefault("leave", False)
    # TQDM_DISABLE, read now: tqdm reads it once, when imported, and only where `disable`
    # isn't given (as our callers give it)
    kwargs["disable"] = _env_disables() or kwargs.get("disable", False)
    if _to_file(kwargs.get("file") or sys.stderr):
        kwargs.update(position=0, leave=True, mininterval=FILE_REDRAW_S)
    return tqdm(iterable, **kwargs)


def warn(message: str) -> None:
    """One warning line on stderr, above any progress bar rather than through it."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def warn_once(seen: set, key, message: str) -> None:
    """warn(message) unless `seen` holds `key`; `seen` is the scope (a pipeline, the process),
    so that a multi-batch run says a thing once."""
    if key not in seen:
        seen.add(key)
        warn(message)


def _env_disables() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _to_file(stream) -> bool:
    """Whether plain tqdm (not a notebook widget) writes to something other than a terminal."""
    if "notebook" in tqdm.__module__:  # tqdm.auto picked the widget bars
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return not (isatty and isatty())
    except ValueError:  # a closed stream
        return True
