"""The torch releases this package runs on, and the two places where they differ for it.

The floor, 2.7, is the oldest release the suite has passed on (README, "Manual setup"); the
compiled re-dilation's op needs `torch.library.custom_op` and `register_autocast` (2.4, 2.5)
either way."""
import importlib
import re
from contextlib import contextmanager

import torch

TORCH_FLOOR = (2, 7)


def torch_release(version: str = torch.__version__):
    """(major, minor) of a torch version string such as '2.8.0+cu128'."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


def check_torch(version: str = torch.__version__):
    """ImportError in one line where torch is older than the floor (else an AttributeError
    from deep inside an import would say it)."""
    if torch_release(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"torch {version} is too old: this tool needs torch >= {floor} "
                          f"(pip install -U torch torchvision)")


check_torch()

# Tags of the planned-conv op (ldm/scalecrafter/redilation.py). cudagraph_unsafe, and
# custom_op's `tags`, came in torch 2.8: before, the op cannot say that a CUDA graph must not
# replay it, so CUDA graphs (compile_unet_in_place(cuda_graphs=True)) are refused there.
CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
PLANNED_CONV_OPTIONS = {} if CUDAGRAPH_UNSAFE is None else {"tags": (CUDAGRAPH_UNSAFE,)}


@contextmanager
def meta_device():
    """torch.device("meta") as a context. torch 2.8 fails to import torch._dynamo inside it (a
    circular import; 2.9 does not), which happens when a model's text encoder imports
    open_clip (through torchvision) while it is built there: imported first before 2.9."""
    if torch_release() < (2, 9):
        importlib.import_module("torch._dynamo")
    with torch.device("meta"):
        yield
