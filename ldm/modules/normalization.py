"""The UNet's GroupNorm: float32 statistics whatever the activation dtype, computed either by
casting the activations to float32 and back (the reference way) or, where the kernel accumulates
in float32 by itself (CUDA), natively in the activations' half dtype."""
import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose output has the input's dtype; fp16 statistics would overflow, so they are
    always taken in float32.

    `in_input_dtype` (set by ldm.precision, off by default): a half input is normalised by the
    native kernel in its own dtype, outside autocast (which would promote it to float32): CUDA's
    group_norm accumulates half inputs in float32, and this saves a float32 copy of every
    activation it normalises plus the cast back."""

    in_input_dtype = False

    def forward(self, x):
        if self.in_input_dtype and x.dtype in HALF_DTYPES:
            return self._native(x)
        return super().forward(x.float()).type(x.dtype)

    def _native(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def set_native_group_norm(module: nn.Module, enabled: bool) -> int:
    """Switch every GroupNorm32 in `module` to (or back from) native half computation; returns
    how many were switched."""
    norms = [m for m in module.modules() if isinstance(m, GroupNorm32)]
    for norm in norms:
        norm.in_input_dtype = enabled
    return len(norms)
