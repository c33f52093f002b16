"""The guided denoiser: the one seam between samplers and the model.

A sampler calls `denoiser(x, t, alpha_bar, step)` and gets eps and x0. Everything ScaleCrafter
does per step (re-dilation, dispersion, noise-damped CFG) happens here, so every sampler gets it
without knowing about it."""
from typing import Optional

import torch

from ldm.models.diffusion.ddpm import Prediction
from ldm.modules.encoders.conditioning import Conditioning, as_conditioning
from ldm.scalecrafter.redilation import overridden_convs
from ldm.scalecrafter.schedule import ScaleCrafterSettings, StepPlanner


class GuidedDenoiser:
    def __init__(self, model, cond, uncond=None, scale: float = 1.0,
                 settings: Optional[ScaleCrafterSettings] = None):
        if scale != 1.0 and uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional conditioning")
        # Conditionings (context + optional vector; a bare tensor is a context) are batched
        # as a whole, so CFG is the same for every family.
        self.model, self.scale = model, scale
        self.cond = as_conditioning(cond)
        self.uncond = None if uncond is None else as_conditioning(uncond)
        self.planner = StepPlanner(model.unet, settings or ScaleCrafterSettings())
        self.unet_batches = []  # batch size of every UNet call, for accounting and tests
        self._batched = {}  # the batched conditionings, made once, not at every step

    def _conditioning(self, parts: str) -> Conditioning:
        """Batched once per denoiser: "uc" is [uncond, cond], "ucu" [uncond, cond, uncond]."""
        if parts not in self._batched:
            pick = {"u": self.uncond, "c": self.cond}
            self._batched[parts] = Conditioning.cat([pick[p] for p in parts])
        return self._batched[parts]

    def _unet(self, x, t, cond, overrides):
        self.unet_batches.append(x.shape[0])
        with overridden_convs(self.model.unet, overrides):
            return self.model.apply_model(x, t, cond)

    def guided_output(self, x, t, step: int):
        """Raw (eps or v) prediction with CFG, and noise-damped CFG while its plan says so."""
        main, damped = self.planner.main(step), self.planner.damped(step)
        if self.scale == 1.0:  # no guidance, so no unconditional branch to damp either
            return self._unet(x, t, self.cond, main)
        if damped is None:
            both = self._unet(torch.cat([x, x]), torch.cat([t, t]),
                              self._conditioning("uc"), main)
            uncond, cond = both.chunk(2)
            return uncond + self.scale * (cond - uncond)
        # Noise-damped CFG: the unconditional half runs once more with the damped plan, as
        # extra rows of the same UNet call (1.5 batches); only convs whose plans differ split.
        rows = x.shape[0]
        out = self._unet(torch.cat([x, x, x]), torch.cat([t, t, t]),
                         self._conditioning("ucu"),
                         [(2 * rows, main), (rows, damped)])
        uncond, cond, uncond_damped = out.chunk(3)
        return uncond_damped + self.scale * (cond - uncond)

    def __call__(self, x, t, alpha_bar, step: int) -> Prediction:
        """t: timestep (int or fractional) for every batch element; alpha_bar: the sampler's
        cumulative alpha at t."""
        t_batch = torch.full((x.shape[0],), t, device=x.device,
                             dtype=torch.long if float(t).is_integer() else torch.float32)
        out = self.guided_output(x, t_batch, step)
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x.device)
        return self.model.split_prediction(x, out.to(x.dtype), alpha_bar)
