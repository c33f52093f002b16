"""The samplers by name: what the CLI, the API's checks and the image metadata know of each.

Every sampler is a function over a denoiser callable; `run` gives them one signature (eta is
0 for those that take none, which GenerationOptions checks)."""
from dataclasses import dataclass
from typing import Callable

from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.dpm_solver import sample_dpmpp_2m
from ldm.models.diffusion.plms import sample_plms


@dataclass(frozen=True)
class Sampler:
    label: str       # for messages and metadata
    takes_eta: bool  # stochastic with eta > 0
    max_steps: int   # DDIM's uniform schedule (PLMS's too) strides 1000 // steps: beyond 500
                     # the stride is 1 and its last timestep repeats
    spaced: bool     # follows the timestep spacing (DDIM's discretization); else its own grid
    run: Callable    # (denoiser, x, alphas_cumprod, steps, eta, generator, progress, spacing)
                     # -> x_0


SAMPLERS = {
    "ddim": Sampler("DDIM", True, 500, True, sample_ddim),
    "plms": Sampler("PLMS", False, 500, True,
                    lambda d, x, acp, steps, _eta, g, progress, spacing:
                    sample_plms(d, x, acp, steps, g, progress, spacing)),
    # DPM-Solver++ steps through continuous time, uniformly (the seed's 'time_uniform')
    "dpm": Sampler("DPM-Solver++ (2M)", False, 1000, False,
                   lambda d, x, acp, steps, _eta, g, progress, _spacing:
                   sample_dpmpp_2m(d, x, acp, steps, g, progress)),
}
