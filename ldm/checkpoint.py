"""Safe checkpoint loading and saving.

Loading a ``.ckpt`` with plain ``pickle`` runs whatever code the file asks for,
so this module never does that (unless a caller explicitly passes
``trust_pickle=True``, which only ``scripts/convert_checkpoint.py
--trust-pickle`` does).

How a pickled checkpoint (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) is loaded:

1. ``torch.load(path, map_location="cpu", weights_only=True)``.  Plain state
   dicts and most Stable Diffusion releases load here.
2. If that fails (typically because a Lightning checkpoint also carries
   training extras: callback objects, numpy scalars, ``argparse.Namespace`` or
   omegaconf hyper-parameters, ...), the file is read again with
   ``torch.load(..., weights_only=False, pickle_module=<gated pickle>)``
   (``ldm.safe_pickle``).  The gated unpickler's ``find_class`` is the only way a
   pickle can reach a Python object, and it answers:

   * torch's own ``weights_only`` allow-list (tensor rebuild functions,
     storages, dtypes, ``torch.Size``, ``collections.OrderedDict``, ...) and a
     few plain builtin types (``set``, ``slice``, ``complex``, ``int``, ...):
     the real objects, all free of side effects;
   * known training extras (``pytorch_lightning``/``lightning`` classes,
     ``omegaconf`` containers, numpy scalars/dtypes/arrays,
     ``argparse.Namespace``, ``pathlib`` paths, ``typing`` markers, ...): an
     inert stub class that only records the arguments it is given; the real
     class is never imported, constructed or called;
   * anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``,
     ``builtins.getattr``, unknown modules, ...): the load is refused with a
     :class:`CheckpointError` naming the global.

   Its BUILD opcode (which fills in an object's state) is refused on the classes and
   functions ``find_class`` hands out: they are shared by the whole process.

   TorchScript archives are refused before this step, because
   ``torch.load(weights_only=False)`` would hand them to ``torch.jit.load``.

Whatever was unpickled, only ``str -> torch.Tensor`` entries of the state dict
(``ckpt["state_dict"]`` for Lightning checkpoints, else the top-level dict, else the one
nested dict that holds tensors) are returned; the extras are dropped.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from ldm.safe_pickle import (GATED_PICKLE, TRUSTING_PICKLE, RefusedBuild, RefusedGlobal,
                             resolve_safe, torch_allowed_globals)

__all__ = [
    "CheckpointError",
    "load_state_dict",
    "save_safetensors",
]

PathLike = Union[str, os.PathLike]

CONVERTER = "scripts/convert_checkpoint.py"


class CheckpointError(Exception):
    """A checkpoint could not be loaded; ``str(err)`` is one user-facing line."""


class CheckpointMismatch(CheckpointError):
    """The file's weights do not make the config's model. `detail` says how: what the file is
    ("is an SDXL refiner, ..."; `about_file`), or how it fails the config (": 3 missing keys
    ..."). The line names the two files once the loader knows them (`named`)."""

    def __init__(self, detail: str, about_file: bool = False, ckpt=None, config=None):
        self.detail, self.about_file = detail, about_file
        if about_file:
            line = f"{f'checkpoint {ckpt}' if ckpt else 'the checkpoint'} {detail}"
        else:
            line = (f"checkpoint{f' {ckpt}' if ckpt else ''} does not fit the config"
                    f"{f' {config}' if config else ''}{detail}")
        super().__init__(line)

    def named(self, ckpt, config) -> "CheckpointMismatch":
        """The same error, naming the checkpoint and config files."""
        return CheckpointMismatch(self.detail, self.about_file, ckpt, config)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            if len(line) > 160 and ". " in line[:300]:
                line = line[: line.index(". ") + 1]  # first sentence of a long message
            if len(line) > 300:
                line = line[:297] + "..."
            return f"{type(exc).__name__}: {line}"
    return type(exc).__name__


def _check_file(path: Path) -> tuple[int, bytes]:
    """The file's size and first bytes, once it is known to be a readable, non-empty file that
    a failed download did not leave in a checkpoint's place."""
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"checkpoint file {path} is a broken symlink")
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory, not a file")
    if not path.is_file():  # a device or a pipe reports size 0, or never ends
        raise CheckpointError(f"checkpoint path {path} is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    for marks, what in _NOT_CHECKPOINTS:
        if head.lstrip().lower().startswith(marks):
            raise CheckpointError(f"checkpoint {path} is {what}")
    return size, head


# Files told by their first bytes (lower-cased) as no checkpoint this tool reads: what a
# download gone wrong leaves, and other formats: (first bytes, what to say).
_NOT_CHECKPOINTS = (
    ((b"gguf",), "a GGUF file (quantized weights for stable-diffusion.cpp / ComfyUI-GGUF), "
                 "which this tool does not read: use the model's .safetensors or .ckpt"),
    ((b"version https://git-lfs",), "a Git LFS pointer, not the file: fetch the file itself "
                                    "(`git lfs pull` in its clone, or download it)"),
    ((b"<!doctype html", b"<html"), "a web page, not a checkpoint: download the file itself "
                                    "(on Hugging Face, the .../resolve/main/... link)"),
)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if size < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len <= size - 8


def _load_safetensors(path: Path, skip=None) -> dict[str, torch.Tensor]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError(
            f"cannot load {path}: the 'safetensors' package is not installed"
        ) from None
    try:
        if skip is None:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file (truncated or corrupt): "
            f"{_first_line(exc)}"
        ) from None


def _torchscript_archive(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # torch's reader will report the corruption
    for entry in names:
        parts = entry.split("/")
        if parts[-1] == "constants.pkl" or (len(parts) > 2 and parts[1] == "code"):
            return True
    return False


def _refusal(path: Path, target: str, build: bool = False) -> CheckpointError:
    why = (f"would change {target}, which every later load shares (only objects the file "
           "makes may be filled in)" if build else
           f"would call {target}, which is not a tensor, a known training extra or a plain "
           "builtin type")
    return CheckpointError(
        f"checkpoint {path} was refused for safety: its pickle {why}. "
        "Only if you trust this file, convert it once with "
        f"`python {CONVERTER} {path} OUT.safetensors --trust-pickle` "
        "and load the .safetensors file instead"
    )


_UNSUPPORTED_GLOBAL_RE = re.compile(
    r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module [\w.]+ is blocked)"
)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _is_torch_save(head: bytes) -> bool:
    """A torch.save file: a zip archive, or (legacy format) a pickle, protocol 2 or later."""
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _named_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _torch_load(path: Path, **kwargs) -> Any:
    """torch.load onto the CPU. A torch.save file named .safetensors goes in as an open file:
    torch.load would read it as safetensors by its name (so it cannot be memory-mapped)."""
    if not _named_safetensors(path):
        return torch.load(str(path), map_location="cpu", **kwargs)
    with open(path, "rb") as fh:
        return torch.load(fh, map_location="cpu", **kwargs)


def _torch_load_pickled(path: Path, trust_pickle: bool) -> Any:
    # Zip checkpoints are memory-mapped: storages are not read up front (a 5 GB file took 17 s
    # to read), only the pages each tensor touches when it is cast or moved. The pickle goes
    # through the same gate either way; legacy (non-zip) files cannot be mapped.
    mmap = _is_zip(path) and not _named_safetensors(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _torch_load(path, weights_only=True, mmap=mmap)
        except Exception as exc:
            first_error = exc
        if _torchscript_archive(path):
            raise CheckpointError(
                f"checkpoint {path} is a TorchScript archive, not a state-dict checkpoint; "
                "it was not loaded (TorchScript archives contain code)"
            )
        return _load_through_gate(path, trust_pickle, mmap, first_error)


def _load_through_gate(path: Path, trust_pickle: bool, mmap: bool, first_error: Exception):
    """Step 2: the full pickle format, every global it names checked against the whitelist
    (or, with trust_pickle, none refused)."""
    if _weights_only_forced():  # torch refuses any other pickle module then
        raise _forced_weights_only_error(path, first_error)
    pickle_module = TRUSTING_PICKLE if trust_pickle else GATED_PICKLE
    try:
        return _torch_load(path, weights_only=False, pickle_module=pickle_module, mmap=mmap)
    except RefusedBuild as exc:
        raise _refusal(path, exc.target, build=True) from None
    except RefusedGlobal as exc:
        raise _refusal(path, exc.target) from None
    except RecursionError:
        raise CheckpointError(
            f"checkpoint {path} is not a valid PyTorch checkpoint: its pickle is nested too deeply"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid PyTorch checkpoint (truncated or corrupt): "
            f"{_first_line(exc)}"
        ) from None


def _weights_only_forced() -> bool:
    """Whether TORCH_FORCE_WEIGHTS_ONLY_LOAD holds one of the values torch reads as true."""
    return os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes",
                                                                           "true")


def _forced_weights_only_error(path: Path, first_error: Exception) -> CheckpointError:
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, so only step 1 can run: why it failed."""
    match = _UNSUPPORTED_GLOBAL_RE.search(str(first_error))
    if not match:
        return CheckpointError(
            f"checkpoint {path} could not be loaded with weights_only=True "
            f"(TORCH_FORCE_WEIGHTS_ONLY_LOAD is set): {_first_line(first_error)}"
        )
    target = match.group(1)
    module, _, name = target.rpartition(".")
    if resolve_safe(module, name, torch_allowed_globals()) is None:
        return _refusal(path, target)
    return CheckpointError(
        f"checkpoint {path} carries training extras (e.g. {target}) that only the "
        "fallback loader can skip, and TORCH_FORCE_WEIGHTS_ONLY_LOAD forbids it: "
        "unset TORCH_FORCE_WEIGHTS_ONLY_LOAD (the fallback loader is safe too: "
        "it refuses every global outside its whitelist)"
    )


def _is_weights(obj: Any) -> bool:
    """A state dict: module paths (dotted names) to tensors. An optimizer's state is not one
    (its keys are parameter indices)."""
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and "." in k and isinstance(v, torch.Tensor) for k, v in obj.items())


def _holds_weights(obj: Any, depth: int) -> bool:
    return isinstance(obj, Mapping) and depth > 0 and (
        _is_weights(obj) or any(_holds_weights(v, depth - 1) for v in obj.values()))


def _state_dict_of(obj: Any, depth: int = 4) -> Any:
    """The mapping that holds the weights: a Lightning file's ``state_dict``, else the
    top-level dict where it is a state dict, else the one nested mapping that holds one
    (trainers wrap the weights as ``{"model": ..., "optimizer": ..., "step": ...}``)."""
    if not isinstance(obj, Mapping) or depth == 0:
        return obj
    if isinstance(obj.get("state_dict"), Mapping):
        return _state_dict_of(obj["state_dict"], depth - 1)
    if _is_weights(obj):
        return obj
    holders = [v for v in obj.values() if _holds_weights(v, depth - 1)]
    return _state_dict_of(holders[0], depth - 1) if len(holders) == 1 else obj


def _extract_tensors(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    obj = _state_dict_of(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} does not hold a state dict (it holds a {type(obj).__name__})"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            # detach: a plain tensor, no autograd hooks or Parameter wrapper
            tensors[key] = value.detach()
    if not tensors:
        nested = [k for k, v in obj.items() if _holds_tensors(v)]
        if len(nested) > 1:  # e.g. a trainer's {"model": ..., "ema": ...}
            raise CheckpointError(
                f"checkpoint {path} holds several state dicts "
                f"({', '.join(_key_text(k) for k in nested[:8])}): save the one to use alone "
                f"(scripts/convert_checkpoint.py reads the file)")
        shown = ", ".join(_key_text(k) for k in list(obj.keys())[:8])
        raise CheckpointError(
            f"checkpoint {path} contains no tensors"
            + (f" (top-level keys: {shown})" if shown else " (it is an empty dict)")
        )
    empty = [k for k, v in tensors.items() if v.is_meta]
    if empty:  # saved from a model built on the meta device: shapes, no numbers
        raise CheckpointError(f"checkpoint {path} holds {len(empty)} tensors without data "
                              f"(meta tensors), e.g. {empty[0]}")
    return tensors


def _holds_tensors(value) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _key_text(key) -> str:
    """A top-level key for a message: str and int keys as they are, others by type (a crafted
    key, a tuple nested 100k deep, would overflow repr's recursion)."""
    return repr(key) if isinstance(key, (str, int)) else f"<{type(key).__name__}>"


def load_state_dict(path: PathLike, *, trust_pickle: bool = False,
                    skip=None) -> dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint onto the CPU without running its code.

    ``.safetensors`` files (or files whose content is safetensors) are read
    with ``safetensors``; anything else must be a ``torch.save`` file (zip or
    legacy format) and goes through the safe loader described in the module
    docstring.  Returns ``{name: tensor}``; a Lightning checkpoint's
    ``state_dict`` is unwrapped and non-tensor entries are dropped.

    ``trust_pickle=True`` lets a pickle that the safe loader refuses run with
    full pickle (ARBITRARY CODE EXECUTION) -- only for files you trust; meant
    for ``scripts/convert_checkpoint.py --trust-pickle``.

    ``skip``: a key -> bool predicate of tensors not wanted (``.safetensors`` files never read
    them; zip checkpoints are memory-mapped, so theirs are never read either).

    Raises :class:`CheckpointError` with a one-line message on any failure.
    """
    path = Path(path)
    size, head = _check_file(path)
    # the content decides, not the name (a .ckpt renamed .safetensors loads as what it is)
    if _looks_like_safetensors(head, size) or (_named_safetensors(path)
                                               and not _is_torch_save(head)):
        obj: Any = _load_safetensors(path, skip)
    else:
        obj = _torch_load_pickled(path, trust_pickle)
    tensors = _extract_tensors(path, obj)
    return tensors if skip is None else {k: v for k, v in tensors.items() if not skip(k)}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``{name: tensor}`` to ``path`` as safetensors, atomically.

    Tensors are detached, moved to the CPU and made contiguous; a tensor whose
    storage is shared with an earlier one is cloned (safetensors refuses
    shared storage).  The file is written to a temporary file in the same
    directory and moved into place with ``os.replace``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, got {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict value {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu")
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.contiguous()
        if tensor.numel() > 0:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen_storages or storage.nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        tensors[key] = tensor

    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=dict(metadata) if metadata else None)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        with open(tmp_name, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
