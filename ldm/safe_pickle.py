"""The pickle gate of checkpoint loading (ldm.checkpoint, step 2): an unpickler through which a
pickled checkpoint reaches only torch's weights_only allow-list, a few plain builtin types and
inert stubs for known training extras (Lightning callbacks, omegaconf containers, numpy
scalars, ...); any other global is refused by name, and BUILD may not change the shared
classes and functions it reaches. The trusting unpickler (``--trust-pickle`` of
scripts/convert_checkpoint.py only) runs the file's code."""

from __future__ import annotations

import _compat_pickle
import builtins
import pickle
import re
import types
from collections.abc import Mapping
from typing import Any

import torch


class _InertStub:
    """Stand-in for a training-extra class or function found in a pickle.

    Constructing, calling, ``__setstate__``, item assignment and appends only
    record their arguments; nothing else ever runs.  Subclasses are created
    per pickled global (see :func:`_stub_for`) so that ``repr`` says what was
    skipped.
    """

    _stub_target = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "_stub_args", args)
        object.__setattr__(self, "_stub_kwargs", kwargs)
        object.__setattr__(self, "_stub_state", None)
        object.__setattr__(self, "_stub_items", [])
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_stub_state", state)

    def __setitem__(self, key, value):
        self._stub_items.append((key, value))

    def append(self, item):
        self._stub_items.append(item)

    def extend(self, items):
        self._stub_items.extend(items)

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __class_getitem__(cls, item):
        return cls

    def __repr__(self):
        return f"<skipped {self._stub_target}>"


_STUBS: dict[str, type] = {}


def _stub_for(module: str, name: str) -> type:
    target = f"{module}.{name}"
    stub = _STUBS.get(target)
    if stub is None:
        stub = type(
            name.rsplit(".", 1)[-1] or "stub",
            (_InertStub,),
            {"__module__": module, "__qualname__": name, "_stub_target": target},
        )
        _STUBS[target] = stub
    return stub


# Plain builtin types: constructing them runs no user code.
_SAFE_BUILTINS = frozenset(
    {
        "set", "frozenset", "slice", "complex", "int", "float", "bool", "str",
        "bytes", "bytearray", "tuple", "list", "dict", "range",
    }
)

# Packages whose globals are training extras; every name in them becomes a stub
# (so nothing from them can run, whatever the name).
_EXTRA_PACKAGES = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torchmetrics",
    "omegaconf",
)

# Individual globals that are training extras, replaced by stubs.
_EXTRA_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
        "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
        "pathlib._local.Path", "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath", "pathlib._local.PurePath",
        "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath",
        "collections.defaultdict", "collections.deque",
        "datetime.datetime", "datetime.date", "datetime.time",
        "datetime.timedelta", "datetime.timezone",
        "typing.Any", "typing.Dict", "typing.List", "typing.Tuple",
        "typing.Set", "typing.Union", "typing.Optional", "typing.Sequence",
        "typing.Mapping", "typing.Callable", "typing.Type",
        "_operator.getitem", "operator.getitem",  # typing.Dict[str, int] etc.
        "copyreg._reconstructor",  # protocol 0/1 objects
        "builtins.object",
    }
)

# numpy modules and the names in them that only describe data.
_NUMPY_MODULES = frozenset(
    {
        "numpy", "numpy.core.multiarray", "numpy._core.multiarray",
        "numpy.core.numeric", "numpy._core.numeric", "numpy.dtypes",
    }
)
_NUMPY_NAMES = frozenset(
    {"scalar", "_reconstruct", "ndarray", "dtype", "_frombuffer", "frombuffer"}
)
_NUMPY_SCALAR_RE = re.compile(
    r"(bool_?|(u?int|float|complex)\d*|u?byte|u?short|u?intc|u?intp|u?long|"
    r"u?longlong|half|single|double|longdouble|c?longdouble|csingle|cdouble|"
    r"str_|bytes_|void|object_|datetime64|timedelta64|generic|number)"
)


def _is_training_extra(module: str, name: str) -> bool:
    if module.split(".", 1)[0] in _EXTRA_PACKAGES:
        return True
    if f"{module}.{name}" in _EXTRA_GLOBALS:
        return True
    if module in _NUMPY_MODULES:
        return (
            name in _NUMPY_NAMES
            or name.endswith("DType")
            or _NUMPY_SCALAR_RE.fullmatch(name) is not None
        )
    return False


def _fallback_torch_globals() -> dict[str, Any]:
    """A part of torch's list, for a torch whose private list moved: what checkpoints with
    training extras name (numpy scalars' bytes through _codecs.encode, parameters rebuilt by
    type, sets), each the object torch's list has."""
    import codecs
    from collections import Counter, OrderedDict

    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "_codecs.encode": codecs.encode,
        "builtins.set": set,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.storage.TypedStorage": torch.storage.TypedStorage,
        "torch.storage.UntypedStorage": torch.storage.UntypedStorage,
    }
    for attr in dir(torch._utils):
        if attr.startswith("_rebuild_"):
            allowed[f"torch._utils.{attr}"] = getattr(torch._utils, attr)
    for attr in dir(torch):
        value = getattr(torch, attr, None)
        if isinstance(value, torch.dtype):
            allowed[f"torch.{attr}"] = value
    return allowed


def torch_allowed_globals() -> dict[str, Any]:
    """torch's own ``weights_only`` allow-list ("module.name" -> object)."""
    try:
        from torch import _weights_only_unpickler

        return dict(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # private API moved: use a conservative equivalent
        return _fallback_torch_globals()


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"refused global {module}.{name}")
        self.target = f"{module}.{name}"


def _normalise_global(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (``__builtin__.set``) to Python 3 ones."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def resolve_safe(module: str, name: str, allowed: Mapping[str, Any]):
    """The object for a whitelisted global, or ``None`` if not whitelisted."""
    module, name = _normalise_global(module, name)
    target = f"{module}.{name}"
    if target in allowed:
        return allowed[target]
    if module == "builtins" and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    if _is_training_extra(module, name):
        return _stub_for(module, name)
    return None


class RefusedBuild(RefusedGlobal):
    """BUILD (the opcode that fills in an object's state) aimed at a shared object."""

    def __init__(self, target: str):
        pickle.UnpicklingError.__init__(self, f"refused state for {target}")
        self.target = target


def _shared_object_name(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


class _GatedUnpickler(pickle._Unpickler):
    """Unpickler whose ``find_class`` only yields whitelisted objects or stubs, and whose BUILD
    only fills in objects the pickle made itself: a class, function or module reached through
    ``find_class`` is shared by the whole process (BUILD would set attributes on, say,
    ``torch.storage.TypedStorage`` for every later load). The C unpickler cannot check BUILD,
    hence the pure-Python one; a checkpoint's pickle is small, its tensors' bytes are not in it."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = torch_allowed_globals()
        self._shared = {id(obj): name for name, obj in self._allowed.items()}

    def find_class(self, module, name):
        obj = resolve_safe(str(module), str(name), self._allowed)
        if obj is None:
            raise RefusedGlobal(*_normalise_global(str(module), str(name)))
        return obj

    def _load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if (isinstance(target, (type, types.ModuleType)) or id(target) in self._shared
                or (callable(target) and not isinstance(target, _InertStub))):
            raise RefusedBuild(self._shared.get(id(target)) or _shared_object_name(target))
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


class _TrustingUnpickler(pickle.Unpickler):
    """Full pickle (runs the file's code!); missing modules become stubs.

    Only used with ``trust_pickle=True``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = torch_allowed_globals()

    def find_class(self, module, name):
        obj = resolve_safe(str(module), str(name), self._allowed)
        if obj is not None:
            return obj
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stub_for(*_normalise_global(str(module), str(name)))


def _pickle_module(name: str, unpickler_cls: type) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.Unpickler = unpickler_cls

    def load(file, **kwargs):
        return unpickler_cls(file, **kwargs).load()

    mod.load = load
    return mod


GATED_PICKLE = _pickle_module("ldm_checkpoint_gated_pickle", _GatedUnpickler)
TRUSTING_PICKLE = _pickle_module("ldm_checkpoint_trusting_pickle", _TrustingUnpickler)
