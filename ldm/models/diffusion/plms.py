"""PLMS (pseudo linear multistep) over a denoiser callable, on the DDIM discretization."""
import torch

from ldm.models.diffusion.ddim import (coefficients_on_device, ddim_coefficients,
                                      ddim_timesteps, generator_device)
from ldm.progress import progress_bar


def _plms_eps(eps, history):
    """Adams-Bashforth combination of the current and up to three previous eps."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(denoiser, x, alphas_cumprod, steps, generator=None, progress=True,
                spacing="uniform"):
    timesteps = ddim_timesteps(steps, len(alphas_cumprod), spacing)
    alphas, alphas_prev, _ = ddim_coefficients(alphas_cumprod, timesteps, 0.0)
    alphas, alphas_prev = (coefficients_on_device(v, x) for v in (alphas, alphas_prev))
    n = len(timesteps)

    def step_to(x, eps, index):
        # The published PLMS draws noise for every update and scales it by sigma = 0; drawing
        # (and dropping) it too keeps a run's later batches on the same random stream.
        torch.randn(x.shape, generator=generator, dtype=x.dtype,
                    device=generator_device(generator))
        a_t, a_prev = alphas[index], alphas_prev[index]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    history = []
    for step in progress_bar(range(n), desc="PLMS", disable=not progress):
        index = n - 1 - step
        eps = denoiser(x, int(timesteps[index]), alphas[index], step).eps
        if not history:  # pseudo improved Euler start: average with eps at the next timestep
            # (this evaluation is part of step 0, so it runs under step 0's plan)
            next_index = max(index - 1, 0)
            x_next = step_to(x, eps, index)
            eps_next = denoiser(x_next, int(timesteps[next_index]),
                                alphas[next_index], step).eps
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = _plms_eps(eps, history)
        x = step_to(x, eps_prime, index)
        history = (history + [eps])[-3:]
    return x
