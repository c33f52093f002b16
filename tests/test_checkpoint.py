"""Tests for ldm.checkpoint (safe checkpoint loading) and scripts/convert_checkpoint.py."""

from __future__ import annotations

import argparse
import builtins
import collections
import hashlib
import importlib.util
import io
import os
import pathlib
import pickle
import re
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import our_stderr

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.checkpoint import (  # noqa: E402
    CheckpointError,
    load_state_dict,
    save_safetensors,
)

REFERENCE_CKPT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiny" / "tiny-sd21.ckpt"
CONVERTER = REPO_ROOT / "scripts" / "convert_checkpoint.py"
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"

FAKE_CALLBACK_SOURCE = '''
import os
MARKER = None  # set by the test; any real construction writes it

def _touch(what):
    if MARKER:
        with open(MARKER, "a") as fh:
            fh.write(what + "\\n")

class ModelCheckpoint:
    def __new__(cls, *args, **kwargs):
        _touch("new")
        return super().__new__(cls)

    def __init__(self, monitor=None, dirpath=None):
        _touch("init")
        self.monitor = monitor
        self.dirpath = dirpath
        self.best_model_score = None

    def __setstate__(self, state):
        _touch("setstate")
        self.__dict__.update(state)

class RebuiltByCall:
    """Pickled as a call of the class itself (REDUCE)."""
    def __init__(self, value):
        _touch("call")
        self.value = value

    def __reduce__(self):
        return (RebuiltByCall, (self.value,))
'''


def _sample_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "model.diffusion_model.conv.bias": torch.randn(4, generator=gen),
        "first_stage_model.scale": torch.tensor(0.18215),
        "half.weight": torch.randn(5, 5, generator=gen).half(),
        "steps": torch.arange(10, dtype=torch.int64),
        "betas": torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float32),
    }


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].device.type == "cpu", key
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def fake_lightning(tmp_path, monkeypatch):
    """A fake ``pytorch_lightning.callbacks.model_checkpoint`` module, injected into sys.modules.

    Yields the module; its classes write to ``module.MARKER`` whenever they are
    really constructed. The injection is undone after the test.
    """
    source = tmp_path / "fake_model_checkpoint.py"
    source.write_text(FAKE_CALLBACK_SOURCE)
    spec = importlib.util.spec_from_file_location(LIGHTNING_MODULE, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.MARKER = str(tmp_path / "callback_was_constructed")
    parents = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    for name in parents:
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        monkeypatch.setitem(sys.modules, name, pkg)
    monkeypatch.setitem(sys.modules, LIGHTNING_MODULE, module)
    sys.modules["pytorch_lightning"].callbacks = sys.modules["pytorch_lightning.callbacks"]
    sys.modules["pytorch_lightning.callbacks"].model_checkpoint = module
    yield module


def _lightning_checkpoint(module, state_dict):
    callback = module.ModelCheckpoint(monitor="val/loss", dirpath="/nonexistent/ckpts")
    callback.best_model_score = torch.tensor(0.5)
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {module.ModelCheckpoint: callback, "by_call": module.RebuiltByCall(7)},
        "optimizer_states": [
            {
                "state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": 3, "_step_count": 4}],
        "hyper_parameters": {
            "args": argparse.Namespace(lr=1e-4, name="run"),
            "np_scalar": np.float64(1.5),
            "np_int": np.int64(3),
            "np_array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "np_dtype": np.dtype("float16"),
            "logdir": pathlib.PosixPath("/tmp/logs"),
            "a_set": {1, 2, 3},
            "a_frozenset": frozenset({"x"}),
            "a_slice": slice(1, 10, 2),
            "a_complex": 1 + 2j,
            "ordered": collections.OrderedDict(a=1),
            "defaults": collections.defaultdict(list, {"k": [1]}),
            "torch_dtype": torch.float16,
            "raw": b"\x00\x01",
        },
    }


# ---------------------------------------------------------------------------
# Loading good checkpoints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_with_extras_loads(tmp_path, fake_lightning, legacy):
    sd = _sample_state_dict()
    path = tmp_path / "model.ckpt"
    torch.save(
        _lightning_checkpoint(fake_lightning, sd),
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    marker = Path(fake_lightning.MARKER)
    marker.unlink()  # written while building the checkpoint above

    # The fast path cannot read it: the fallback loader is what is exercised.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)

    # The real callback class is still importable here: it must not be used.
    loaded = load_state_dict(path)
    _assert_same(loaded, sd)
    assert not marker.exists(), "a pickled class was really constructed"


def test_lightning_checkpoint_loads_after_module_is_gone(tmp_path, fake_lightning, monkeypatch):
    sd = _sample_state_dict()
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(fake_lightning, sd), path)
    Path(fake_lightning.MARKER).unlink()
    for name in [LIGHTNING_MODULE, "pytorch_lightning.callbacks", "pytorch_lightning"]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)

    _assert_same(load_state_dict(path), sd)

    assert not Path(fake_lightning.MARKER).exists()
    imported = {m for m in set(sys.modules) - before if "lightning" in m}
    assert not imported, f"loader imported {imported}"


@pytest.mark.parametrize("value", ["1", "True", "yes", "Y"])
def test_forced_weights_only_names_the_extra_and_the_way_out(tmp_path, fake_lightning,
                                                              monkeypatch, value):
    """With TORCH_FORCE_WEIGHTS_ONLY_LOAD set (to any value torch reads as true), torch refuses
    the gated fallback loader: a file with training extras is refused in one line that says
    so, a malicious one as such. Set false, the gated loader reads the extras."""
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(fake_lightning, _sample_state_dict()), path)
    evil = tmp_path / "evil.ckpt"
    _write_malicious(evil, _EvalPayload(tmp_path / "pwned"), "zip")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    _assert_same(load_state_dict(path), _sample_state_dict())
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", value)
    with pytest.raises(CheckpointError, match="carries training extras .*unset "
                                              "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


def test_forced_weights_only_names_a_global_of_a_blocked_module(tmp_path, monkeypatch):
    """torch words the refusal of os.system ("whose module ... is blocked") unlike that of
    other globals: still refused for safety, by name."""
    evil = tmp_path / "evil.ckpt"
    _write_malicious(evil, _SystemPayload(tmp_path / "pwned"), "zip")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refused for safety") as refused:
        load_state_dict(evil)
    assert f"{os.system.__module__}.system" in str(refused.value)
    assert not (tmp_path / "pwned").exists()


def test_the_fallback_allow_list_is_a_part_of_torchs(tmp_path, fake_lightning, monkeypatch):
    """Should torch's private allow-list move, the gate takes a fallback: every name in it is
    one torch allows, as the same object (dtype aliases and torch's rebuild functions aside),
    and a Lightning file with numpy extras still loads through it."""
    from ldm import safe_pickle

    fallback, torchs = safe_pickle._fallback_torch_globals(), safe_pickle.torch_allowed_globals()
    for name, value in fallback.items():
        assert torchs.get(name) is value or isinstance(value, torch.dtype) or \
            name.startswith("torch._utils._rebuild_"), name
    monkeypatch.setattr(safe_pickle, "torch_allowed_globals", lambda: fallback)
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(fake_lightning, _sample_state_dict()), path)
    _assert_same(load_state_dict(path), _sample_state_dict())


def test_omegaconf_hyper_parameters_load(tmp_path):
    import omegaconf
    sd = _sample_state_dict()
    conf = omegaconf.OmegaConf.create({"model": {"lr": 1e-4, "layers": [1, 2], "name": "x"}})
    path = tmp_path / "omega.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": conf, "hparams_type": "DictConfig"}, path)
    _assert_same(load_state_dict(path), sd)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_bare_state_dict(tmp_path, suffix):
    sd = _sample_state_dict()
    path = tmp_path / f"bare{suffix}"
    torch.save(collections.OrderedDict(sd), path)
    _assert_same(load_state_dict(path), sd)


def test_bare_state_dict_legacy_format_and_protocol_4(tmp_path):
    sd = _sample_state_dict()
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(legacy), sd)
    proto4 = tmp_path / "proto4.pt"  # weights_only cannot parse protocol 4
    torch.save({"state_dict": sd, "extra": np.float32(1)}, proto4, pickle_protocol=4)
    _assert_same(load_state_dict(proto4), sd)


def test_non_tensor_entries_are_skipped(tmp_path):
    sd = _sample_state_dict()
    mixed = dict(sd, note="hello", count=3, nested={"x": torch.zeros(1)})
    path = tmp_path / "mixed.pt"
    torch.save(mixed, path)
    _assert_same(load_state_dict(path), sd)


def test_parameters_come_back_as_plain_tensors(tmp_path):
    path = tmp_path / "params.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2, 2))}, path)
    loaded = load_state_dict(path)
    assert type(loaded["w"]) is torch.Tensor
    assert not loaded["w"].requires_grad


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = _sample_state_dict()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    _assert_same(load_state_dict(path), sd)
    # safetensors content under a .ckpt name is recognised too
    renamed = tmp_path / "actually-safetensors.ckpt"
    renamed.write_bytes(path.read_bytes())
    _assert_same(load_state_dict(renamed), sd)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_torch_file_named_safetensors_loads_as_what_it_is(tmp_path, legacy):
    """torch.load itself reads a .safetensors name as safetensors: the content decides."""
    sd = _sample_state_dict()
    path = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=not legacy)
    _assert_same(load_state_dict(path), sd)


@pytest.mark.parametrize("content, says", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 5214865159\n",
     "is a Git LFS pointer, not the file"),
    (b"<!DOCTYPE html>\n<html lang='en'><head><title>Hugging Face</title>", "is a web page"),
    (b"  <html><body>Not found</body></html>", "is a web page"),
    (b"GGUF\x03\x00\x00\x00" + bytes(64), "is a GGUF file"),  # (magic, version 3, ...)
])
@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_what_a_failed_download_or_another_format_leaves_is_named(tmp_path, content, says, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        load_state_dict(path)


def test_reference_checkpoint_loads():
    assert REFERENCE_CKPT.is_file(), f"reference checkpoint missing: {REFERENCE_CKPT}"
    sd = load_state_dict(REFERENCE_CKPT)
    assert len(sd) > 100
    assert "betas" in sd
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["betas"].dtype == torch.float32


# ---------------------------------------------------------------------------
# Malicious checkpoints
# ---------------------------------------------------------------------------


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _SubprocessPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


PAYLOADS = {
    "os.system": (_SystemPayload, (f"{os.system.__module__}.system",)),
    "exec": (_ExecPayload, ("builtins.exec",)),
    "eval": (_EvalPayload, ("builtins.eval",)),
    "subprocess": (_SubprocessPayload, ("subprocess.call",)),
}


def _write_malicious(path: Path, payload, fmt: str) -> None:
    obj = {"state_dict": {"w": torch.zeros(2)}, "callbacks": {"evil": payload}}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a raw pickle, no torch container at all
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": {}, "callbacks": {"evil": payload}}, fh, protocol=int(fmt[-1]))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw2", "raw5"])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_pickle_is_refused(tmp_path, fmt, kind):
    cls, names = PAYLOADS[kind]
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _write_malicious(path, cls(marker), fmt)

    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)

    assert not marker.exists(), "the malicious payload ran"
    message = str(info.value)
    assert "\n" not in message
    assert any(name in message for name in names), message
    assert "refused for safety" in message
    assert "convert_checkpoint.py" in message and "--trust-pickle" in message
    assert str(path) in message


# Hand-written protocol-0 pickles for globals that __reduce__ cannot easily produce.
HANDCRAFTED = {
    "builtins.getattr": b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__class__'\ntR.",
    "builtins.__import__": b"c__builtin__\n__import__\n(S'os'\ntR.",
    "numpy.testing._private.utils.runstring": (
        b"cnumpy.testing._private.utils\nrunstring\n(S'open(\"MARKER\", \"w\")'\n(dtR."
    ),
    "torch.load": b"ctorch\nload\n(S'/nonexistent'\ntR.",
    "torch.storage._load_from_bytes": b"ctorch.storage\n_load_from_bytes\n(C\x00tR.",
    "unknown_module.Thing": b"cunknown_module\nThing\n)R.",
}


@pytest.mark.parametrize("target", sorted(HANDCRAFTED))
def test_handcrafted_globals_are_refused(tmp_path, target):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.pt"
    path.write_bytes(HANDCRAFTED[target].replace(b"MARKER", str(marker).encode()))
    with pytest.raises(CheckpointError, match="refused for safety") as info:
        load_state_dict(path)
    assert target in str(info.value)
    assert not marker.exists()


# BUILD (fill in an object's state) aimed at an object every later load shares
SHARED_STATE = {
    "torch.storage.TypedStorage": b"ctorch.storage\nTypedStorage\n(N}S'pwned'\nI1\nstb.",
    "torch._utils._rebuild_tensor_v2": b"ctorch._utils\n_rebuild_tensor_v2\n(N}S'pwned'\nI1\nstb.",
    "torch.float32": b"ctorch\nfloat32\n(N}S'pwned'\nI1\nstb.",  # shared, not callable
}


@pytest.mark.parametrize("target", sorted(SHARED_STATE))
def test_state_written_into_shared_objects_is_refused(tmp_path, target):
    """A pickle may not set attributes on the classes and functions it reaches: they would stay
    changed in this process (for every later load); torch's weights_only loader refuses them
    too, so the gate is the one that must."""
    import importlib

    module, name = target.rsplit(".", 1)
    shared = getattr(importlib.import_module(module), name)
    path = tmp_path / "crafted.pt"
    path.write_bytes(SHARED_STATE[target])
    with pytest.raises(CheckpointError, match=f"would change {re.escape(target)}, which every"):
        load_state_dict(path)
    assert not hasattr(shared, "pwned")


def test_state_filled_into_the_files_own_objects_still_loads(tmp_path):
    """Every real state_dict() is an OrderedDict whose `_metadata` comes through BUILD, and a
    Lightning file's extras (here a Namespace stub) too: the gate lets those through."""
    model = torch.nn.Linear(2, 3)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=1)},
               path)
    with pytest.raises(Exception):  # (so the gate is what loads it)
        torch.load(path, weights_only=True)
    loaded = load_state_dict(path)
    assert sorted(loaded) == ["bias", "weight"] and torch.equal(loaded["weight"], model.weight)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* is deprecated in recent torch
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_state_dict(path)


@pytest.mark.parametrize("drop", ["code", "constants.pkl"])
def test_a_torchscript_archive_missing_one_of_its_marks_is_refused(tmp_path, drop):
    """An archive with constants.pkl alone is what torch.load hands to TorchScript's loader; one
    with code/ alone names TorchScript's classes: each is named as TorchScript."""
    scripted, crafted = tmp_path / "scripted.pt", tmp_path / "crafted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with zipfile.ZipFile(scripted) as src, zipfile.ZipFile(crafted, "w") as dst:
        for name in src.namelist():
            parts = name.split("/")
            if (drop == "code" and parts[1:2] == ["code"]) or parts[-1] == drop:
                continue
            dst.writestr(name, src.read(name))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_state_dict(crafted)


# Callables a crafted pickle could reach for: code execution (directly, or through another
# unpickler, a module runner or an importer), file writes, and changes to shared objects; and
# names that merely look like allowed ones (a package whose name starts with one, numpy's
# loaders beside its dtype names)
GADGETS = ["subprocess.Popen", "subprocess.check_output", "builtins.setattr",
           "functools.partial", "builtins.open", "pickle.loads", "importlib.import_module",
           "builtins.compile", "runpy._run_code", "builtins.type", "builtins.vars",
           "os.system", "nt.system", "posix.system", "numpy.load", "lightningx.Thing",
           "pytorch_lightning_evil.Thing"]


@pytest.mark.parametrize("target", GADGETS)
def test_a_pickle_calling_a_gadget_is_refused_by_name(tmp_path, target):
    module, name = target.rsplit(".", 1)
    path = tmp_path / "gadget.pt"
    path.write_bytes(f"c{module}\n{name}\n)R.".encode())  # GLOBAL, empty tuple, REDUCE
    with pytest.raises(CheckpointError, match="refused for safety") as refused:
        load_state_dict(path)
    assert target in str(refused.value)


def test_a_key_nested_too_deep_to_print_is_still_one_error(tmp_path):
    """A dict whose one key is a tuple nested 100k deep: named by its type, not repr'd (which
    would overflow the recursion limit)."""
    saved = io.BytesIO()
    torch.save({"a": 1}, saved)
    deep = b"\x80\x02}q\x00)" + b"\x85" * 100_000 + b"K\x01s."  # {((...(),),): 1}
    path = tmp_path / "deep.ckpt"
    with zipfile.ZipFile(io.BytesIO(saved.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, deep if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(CheckpointError, match=r"contains no tensors \(top-level keys: <tuple>\)"):
        load_state_dict(path)


# ---------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path, legacy, fraction):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _sample_state_dict()}, good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file(_sample_state_dict(), str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_state_dict(bad)
    assert str(bad) in str(info.value)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match="not a valid PyTorch checkpoint") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_state_dict(tmp_path)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "notensors.ckpt"
    torch.save({"global_step": 3, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="contains no tensors"):
        load_state_dict(path)
    path2 = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path2)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(path2)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def test_describe_missing():
    from ldm.checkpoint import CheckpointMismatch
    from ldm.layouts import describe_missing
    assert describe_missing(["a", "b", "c"]) == ": 3 missing keys (a, b, c)"
    assert describe_missing(["a"]) == ": 1 missing key (a)"
    long = describe_missing([f"k{i}" for i in range(12)])
    assert long == ": 12 missing keys (k0, k1, k2, k3, k4, ... and 7 more)"
    # the line, before and after the loader names the files
    error = CheckpointMismatch(long)
    assert str(error) == "checkpoint does not fit the config" + long
    assert str(error.named("a.ckpt", "b.yaml")) == "checkpoint a.ckpt does not fit the config " \
        "b.yaml" + long
    error = CheckpointMismatch("is an SDXL refiner", about_file=True)
    assert str(error) == "the checkpoint is an SDXL refiner"
    assert str(error.named("a.ckpt", "b.yaml")) == "checkpoint a.ckpt is an SDXL refiner"


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_a_refused_file_leaves_no_tensor_behind(change):
    """A file that does not fit is refused with one line, and its tensors (on CUDA already
    staged on the card) are released with it, not kept alive by the error's traceback."""
    from ldm.checkpoint import CheckpointError
    from ldm.layouts import fit_state_dict

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    state["unused.extra"] = torch.zeros(5)
    if change == "missing":
        del state["1.bias"]
    else:
        state["1.weight"] = torch.zeros(2, 5)
    with pytest.raises(CheckpointError, match="does not fit the config"):
        fit_state_dict(model, state)
    assert state == {}


def test_file_sha256_and_short_hash(tmp_path):
    from ldm.hashing import file_sha256, short_hash
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * 1024 + 17)
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert file_sha256(path, chunk=100) == expected
    assert short_hash(path) == expected[:10]
    assert short_hash(expected) == expected[:10]


def test_a_file_named_like_a_digest_is_hashed_and_a_near_digest_is_a_file(tmp_path, monkeypatch):
    from ldm.hashing import short_hash
    monkeypatch.chdir(tmp_path)
    Path("0" * 64).write_bytes(b"abc")
    assert short_hash("0" * 64) == hashlib.sha256(b"abc").hexdigest()[:10]
    with pytest.raises(FileNotFoundError):
        short_hash("a" * 64 + "x")


def test_save_safetensors_shared_and_noncontiguous(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {
        "base": base,
        "alias": base,  # same storage
        "view": base[1],  # view into the same storage
        "transposed": base.t(),  # non-contiguous
        "param": torch.nn.Parameter(torch.ones(2)),
        "empty": torch.zeros(0),
        "empty2": torch.zeros(0, 3),
    }
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old content")  # replaced atomically
    save_safetensors(sd, path, metadata={"source": "test"})

    from safetensors import safe_open
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value.detach()), key
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"source": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"], "temp file left behind"
    # the input tensors were not modified
    assert torch.equal(base, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_save_safetensors_failure_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(TypeError):
        save_safetensors({"x": "not a tensor"}, path)
    assert list(tmp_path.iterdir()) == []


def test_a_save_that_fails_midway_keeps_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        save_safetensors({"a": torch.zeros(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    assert path.read_bytes() == b"old"


def test_a_save_replaces_the_file_whole_beside_it_with_the_usual_mode(tmp_path, monkeypatch):
    """Written beside the target and renamed over it (the old file's other links keep its
    bytes), readable as any new file is (mkstemp's 0600 widened by the umask)."""
    import tempfile

    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    os.link(path, tmp_path / "link")
    folders, mkstemp = [], tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp",
                        lambda *a, **k: folders.append(k.get("dir")) or mkstemp(*a, **k))
    umask = os.umask(0o022)
    try:
        save_safetensors({"a": torch.zeros(2)}, path)
    finally:
        os.umask(umask)
    assert (tmp_path / "link").read_bytes() == b"old"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [Path(f) for f in folders] == [tmp_path]


# ---------------------------------------------------------------------------
# Converter CLI
# ---------------------------------------------------------------------------


def _run_converter_process(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the script must find the repo by itself
    return subprocess.run(
        [sys.executable, str(CONVERTER), *args],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=300,
    )


def _run_converter(*args: str) -> subprocess.CompletedProcess:
    """The converter's main() in this process (its imports are done already), output
    captured as a subprocess's would be; the round trip runs the script itself."""
    import contextlib
    import io

    from conftest import load_script

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_script("convert_checkpoint").main(list(args))
        except SystemExit as exit_:  # --help, bad flags
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_converter_round_trip(tmp_path, fake_lightning):
    from safetensors.torch import load_file

    sd = _sample_state_dict()
    src = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(fake_lightning, sd), src)
    dst = tmp_path / "model.safetensors"

    result = _run_converter_process(str(src), str(dst))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    _assert_same(load_file(str(dst)), sd)
    _assert_same(load_state_dict(dst), sd)


def test_converter_half(tmp_path):
    from safetensors.torch import load_file

    sd = _sample_state_dict()
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    dst = tmp_path / "half.safetensors"
    result = _run_converter(str(src), str(dst), "--half")
    assert result.returncode == 0, result.stderr
    out = load_file(str(dst))
    assert out["model.diffusion_model.conv.weight"].dtype == torch.float16
    assert out["steps"].dtype == torch.int64
    assert out["betas"].dtype == torch.float32  # schedule buffers keep precision
    assert torch.allclose(out["model.diffusion_model.conv.weight"].float(), sd["model.diffusion_model.conv.weight"], atol=1e-2)


def test_converter_refuses_malicious(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.ckpt"
    _write_malicious(src, _SystemPayload(marker), "zip")
    dst = tmp_path / "evil.safetensors"

    result = _run_converter(str(src), str(dst))

    assert result.returncode != 0
    lines = our_stderr(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "refused for safety" in lines[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not dst.exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("garbage", "is not a valid PyTorch checkpoint"),
    ("bad-suffix", "must end in .safetensors"),
    ("device", "checkpoint path /dev/zero is not a regular file"),
    ("out-under-a-file", "is a file, not a folder"),
    ("no-arguments", "the following arguments are required: IN, OUT (see --help)")])
def test_converter_bad_input(tmp_path, case, message):
    src = tmp_path / "in.ckpt"
    dst = tmp_path / "out.safetensors"
    if case == "garbage":
        src.write_bytes(b"\x00not a checkpoint" * 10)
    elif case == "bad-suffix":
        torch.save(_sample_state_dict(), src)
        dst = tmp_path / "out.ckpt"
    elif case == "device":
        src = pathlib.Path("/dev/zero")
    elif case == "out-under-a-file":
        torch.save(_sample_state_dict(), src)
        (tmp_path / "a-file").write_text("x")
        dst = tmp_path / "a-file" / "out.safetensors"
    result = _run_converter(*([] if case == "no-arguments" else [str(src), str(dst)]))
    assert result.returncode != 0
    lines = our_stderr(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not dst.exists()


def test_converter_keeps_an_existing_output_unless_forced(tmp_path):
    from safetensors.torch import load_file

    sd = _sample_state_dict()
    src, dst = tmp_path / "in.ckpt", tmp_path / "out.safetensors"
    torch.save(sd, src)
    dst.write_bytes(b"someone's file")
    refused = _run_converter(str(src), str(dst))
    assert refused.returncode == 1 and dst.read_bytes() == b"someone's file"
    assert our_stderr(refused.stderr) == [f"error: output {dst} exists: pass --force to replace it"]
    assert _run_converter(str(src), str(dst), "--force").returncode == 0
    _assert_same(load_file(str(dst)), sd)


def test_converter_trust_pickle(tmp_path):
    """Benign but non-whitelisted globals: refused by default, converted with --trust-pickle,
    which says what it allows and really unpickles them (the weights sit in one)."""
    import fractions

    from safetensors.torch import load_file

    sd = _sample_state_dict()
    src = tmp_path / "custom.ckpt"
    torch.save({"ratio": fractions.Fraction(1, 3), "state_dict": collections.UserDict(sd)}, src)
    dst = tmp_path / "custom.safetensors"

    refused = _run_converter(str(src), str(dst))
    assert refused.returncode != 0
    assert "fractions.Fraction" in refused.stderr
    assert not dst.exists()

    trusted = _run_converter(str(src), str(dst), "--trust-pickle")
    assert trusted.returncode == 0, trusted.stderr
    assert "warning: --trust-pickle" in trusted.stderr
    _assert_same(load_file(str(dst)), sd)


def test_converter_refuses_to_write_over_its_own_input(tmp_path):
    """Even with --force: the user's only copy would be rewritten (here as fp16)."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(_sample_state_dict(), str(path))
    before = path.read_bytes()
    result = _run_converter(str(path), str(path), "--force", "--half")
    assert result.returncode == 1 and "same file" in result.stderr
    assert path.read_bytes() == before


def test_converter_help_documents_trust_pickle():
    result = _run_converter("--help")
    assert result.returncode == 0
    assert "--trust-pickle" in result.stdout
    assert "DANGEROUS" in result.stdout


@pytest.mark.parametrize("config, ckpt, family, use", [
    ("tiny/tiny-sd21.yaml", "tiny-sd1/tiny-sd15.ckpt", "an SD 1.x", "v1-inference.yaml"),
    ("tiny-sd1/tiny-sd15.yaml", "tiny/tiny-sd21.ckpt", "an SD 2.x", "v2-inference.yaml"),
    ("tiny/tiny-sd21.yaml", "tiny-sdxl/tiny-sdxl.safetensors", "an SDXL", "sd_xl_base.yaml"),
    ("tiny-sdxl/tiny-sdxl.yaml", "tiny-sd1/tiny-sd15.ckpt", "an SD 1.x", "v1-inference.yaml"),
])
def test_another_familys_file_is_named_with_its_config(config, ckpt, family, use):
    from conftest import REF
    """The likeliest first mistake (the default config is SD 2.x's): the line says which family
    the file is and which config reads it, not that the file lacks its text encoder."""
    from ldm.checkpoint import CheckpointError
    from ldm.pipeline import Pipeline

    with pytest.raises(CheckpointError) as error:
        Pipeline.load(REF / config, REF / ckpt)
    message = str(error.value)
    assert f"the file looks like {family} checkpoint, use --config " in message, message
    assert use in message and "has none of" not in message and "\n" not in message


def test_skipped_tensors_are_not_read(tmp_path, monkeypatch):
    """load_state_dict(skip=...): the keys a caller does not want (a whole model's UNet, when
    only its VAE is wanted) are left out, and a .safetensors file's are never read."""
    import safetensors

    sd = _sample_state_dict()
    unwanted = sorted(sd)[:2]
    skip = lambda key: key in unwanted  # noqa: E731
    read, opened = [], safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = opened(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    path = tmp_path / "model.safetensors"
    save_safetensors(sd, path)
    got = load_state_dict(path, skip=skip)
    assert set(got) == set(sd) - set(unwanted) and set(read) == set(got)
    _assert_same(got, {k: v for k, v in sd.items() if k not in unwanted})
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    assert set(load_state_dict(tmp_path / "model.ckpt", skip=skip)) == set(sd) - set(unwanted)
