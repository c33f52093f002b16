"""The per-step ScaleCrafter plan: which convs run re-dilated (by how much, with which kernel) in
the main CFG pass and in the noise-damped unconditional pass, at sampling step i (0 = noisiest)."""
import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

import numpy as np
from torch import nn

from ldm.scalecrafter.dispersion import disperse_kernel
from ldm.scalecrafter.redilation import ConvOverride


@dataclass
class ScaleCrafterSettings:
    """Everything ScaleCrafter changes, in our UNet's conv names. Empty settings = plain model."""
    dilation: Dict[str, float] = field(default_factory=dict)
    dilate_tau: int = 0
    progressive: bool = False
    ndcfg_dilation: Dict[str, float] = field(default_factory=dict)
    ndcfg_tau: int = 0
    disperse: FrozenSet[str] = frozenset()
    transform: Optional[np.ndarray] = None
    inflate_tau: int = 0

    def __post_init__(self):
        if self.disperse and self.transform is None:
            raise ValueError("dispersion needs a transform (--disperse_transform)")
        if self.inflate_tau > self.dilate_tau:
            raise ValueError(f"--inflate_tau ({self.inflate_tau}) must not exceed --dilate_tau "
                             f"({self.dilate_tau}): dispersion only applies to re-dilated "
                             f"convolutions")
        unknown = sorted(self.disperse - set(self.dilation) - set(self.ndcfg_dilation))
        if unknown:
            raise ValueError(f"dispersed conv {unknown[0]} has no dilation factor")

    @property
    def uses_ndcfg(self) -> bool:
        return bool(self.ndcfg_dilation) and self.ndcfg_tau > 0


def factor_at(factor: float, step: int, tau: int, progressive: bool) -> Optional[float]:
    """The dilation factor at `step`, or None once re-dilation is over. Progressive schedules
    shrink the factor linearly towards 2 (the authors' definition)."""
    if step >= tau:
        return None
    if progressive:
        return max(math.ceil(factor * (tau - step) / tau), 2)
    return factor


class StepPlanner:
    """Turns settings into per-step conv overrides; dispersed kernels are computed once."""

    def __init__(self, unet: nn.Module, settings: ScaleCrafterSettings):
        self.settings = settings
        modules = dict(unet.named_modules())
        self.dispersed = {name: disperse_kernel(modules[name].weight.detach(), settings.transform)
                          for name in settings.disperse}

    def _overrides(self, dilation, tau, step) -> Dict[str, ConvOverride]:
        s = self.settings
        plan = {}
        for name, factor in dilation.items():
            f = factor_at(factor, step, tau, s.progressive)
            if f is None:
                continue
            if step < s.inflate_tau and name in self.dispersed:
                plan[name] = ConvOverride(f / 2, self.dispersed[name])
            else:
                plan[name] = ConvOverride(f)
        return plan

    def main(self, step: int) -> Dict[str, ConvOverride]:
        return self._overrides(self.settings.dilation, self.settings.dilate_tau, step)

    def damped(self, step: int) -> Optional[Dict[str, ConvOverride]]:
        """Overrides for the noise-damped unconditional pass, or None when there is none."""
        s = self.settings
        if not s.uses_ndcfg or step >= s.ndcfg_tau:
            return None
        return self._overrides(s.ndcfg_dilation, s.ndcfg_tau, step)
