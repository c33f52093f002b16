"""The UNet's normalisations: float32 statistics whatever the activation dtype, computed either
the reference way (GroupNorm: the activations cast to float32 and back; LayerNorm: as autocast
runs it, in float32 with a float32 output) or, where the kernel accumulates in float32 by itself
(CUDA), natively in the activations' half dtype, which saves a float32 copy of every normalised
activation and the cast back (`in_input_dtype`, set by ldm.precision; off by default)."""
import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_dtype(t, dtype):
    return None if t is None else t.to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose output has the input's dtype; fp16 statistics would overflow, so they are
    taken in float32 (by the native kernel itself where `in_input_dtype` is set: outside
    autocast, which would promote the input to float32)."""

    in_input_dtype = False

    def forward(self, x):
        if self.in_input_dtype and x.dtype in HALF_DTYPES:
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, _in_dtype(self.weight, x.dtype),
                                    _in_dtype(self.bias, x.dtype), self.eps)
        return super().forward(x.float()).type(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm as the transformer blocks use it: by default exactly nn.LayerNorm (under
    autocast: float32 computation and output); with `in_input_dtype`, a half input is
    normalised natively in its own dtype (float32 statistics inside the kernel)."""

    in_input_dtype = False

    def forward(self, x):
        if self.in_input_dtype and x.dtype in HALF_DTYPES:
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, _in_dtype(self.weight, x.dtype),
                                    _in_dtype(self.bias, x.dtype), self.eps)
        return super().forward(x)


def set_native_norms(module: nn.Module, enabled: bool) -> int:
    """Switch every GroupNorm32 and LayerNorm32 in `module` to (or back from) native half
    computation; returns how many were switched."""
    norms = [m for m in module.modules() if isinstance(m, (GroupNorm32, LayerNorm32))]
    for norm in norms:
        norm.in_input_dtype = enabled
    return len(norms)
