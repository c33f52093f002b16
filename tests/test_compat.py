"""The torch releases the package runs on (ldm/compat.py)."""
import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm import compat, precision


@pytest.mark.parametrize("version, release", [("2.8.0+cu128", (2, 8)), ("2.10.0a0+git1", (2, 10)),
                                              ("2.14.1", (2, 14)), ("3.0.0", (3, 0))])
def test_a_torch_version_is_read_as_its_release(version, release):
    assert compat.torch_release(version) == release


def test_a_torch_below_the_floor_is_named_in_one_line():
    assert compat.TORCH_FLOOR == (2, 7)
    with pytest.raises(ImportError, match=r"^torch 2\.6\.0\+cu124 is too old: this tool needs "
                                          r"torch >= 2\.7 \(pip install -U torch torchvision\)$"):
        compat.check_torch("2.6.0+cu124")
    compat.check_torch("2.7.1")
    compat.check_torch(torch.__version__)  # the one installed passed at import


def test_the_planned_conv_op_says_cuda_graphs_must_not_replay_it_where_torch_can():
    importlib.import_module("ldm.scalecrafter.redilation")  # defines the planned-conv op
    tags = compat.PLANNED_CONV_OPTIONS.get("tags", ())
    if compat.torch_release() >= (2, 8):
        assert tags == (torch.Tag.cudagraph_unsafe,)
        assert torch.Tag.cudagraph_unsafe in torch.ops.scalecrafter.planned_conv.default.tags
    else:
        assert tags == () and compat.CUDAGRAPH_UNSAFE is None


def test_cuda_graphs_are_refused_where_the_op_cannot_refuse_replays(monkeypatch):
    monkeypatch.setattr(precision, "CUDAGRAPH_UNSAFE", None)
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"CUDA graphs need torch >= 2\.8"):
        precision.compile_unet_in_place(net, cuda_graphs=True)
    assert not getattr(net.forward, "compiled_in_place", False)  # left as it was


@pytest.mark.parametrize("release, imported", [((2, 8), ["torch._dynamo"]), ((2, 9), []),
                                               ((2, 14), [])])
def test_the_meta_device_context_imports_dynamo_first_before_torch_2_9(monkeypatch, release,
                                                                        imported):
    seen = []
    monkeypatch.setattr(compat, "torch_release", lambda: release)
    # compat's own name for importlib only: torch's lazy imports inside the block must still work
    monkeypatch.setattr(compat, "importlib", SimpleNamespace(import_module=seen.append))
    with compat.meta_device():
        assert seen == imported  # before anything is built there
        assert torch.empty(3).device.type == "meta"
        assert nn.Linear(4, 4).weight.is_meta
    assert torch.empty(3).device.type == "cpu"
