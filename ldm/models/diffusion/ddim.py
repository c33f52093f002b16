"""DDIM over a denoiser callable, with the standard LDM uniform discretization."""
import numpy as np
import torch

from ldm.progress import progress_bar


# How DDIM and PLMS place their timesteps: LDM's 'uniform' (the seed's code), or diffusers'
# 'leading' with steps_offset 1 (the authors' diffusers scripts, SD 1.5 and SDXL). Both stride
# 1000 // steps from 1; uniform takes every stride below 1000, leading exactly `steps` of them,
# so they differ only where steps does not divide 1000 (30 steps: uniform runs 31, from 991).
# diffusers' 'trailing' counts down from the last timestep, 999 (distilled few-step models
# such as SD-Turbo: one step is t = 999, where the others would take t = 1).
TIMESTEP_SPACINGS = ("uniform", "leading", "trailing")


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000,
                   spacing: str = "uniform") -> np.ndarray:
    """The timesteps of a DDIM/PLMS run, ascending (uniform with 6 steps gives 7 of them)."""
    if not 1 <= steps <= num_train_timesteps // 2:  # beyond, the stride is 1: a repeated step
        raise ValueError(f"steps must be between 1 and {num_train_timesteps // 2}, got {steps}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, "
                         f"got {spacing!r}")
    stride = num_train_timesteps // steps
    if spacing == "leading":
        return np.arange(steps) * stride + 1
    if spacing == "trailing":  # diffusers' round(arange(n, 0, -n / steps)) - 1, without the
        # float arange's occasional extra element (61 steps: a 62nd, t = -1)
        n = num_train_timesteps
        return np.round(n - np.arange(steps) * (n / steps))[::-1].astype(np.int64) - 1
    timesteps = np.arange(0, num_train_timesteps, stride) + 1
    # Where the stride divides 999 (e.g. 3, 9, 27, 37 steps) the shift reaches 1000, past the
    # end of the schedule (the original crashes there); use the last trained timestep instead.
    return np.minimum(timesteps, num_train_timesteps - 1)


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float):
    """alpha_bar at each timestep, at the previous one, and the eta-scaled sigma (all float64)."""
    acp = alphas_cumprod.detach().cpu().double().numpy()
    alphas = acp[timesteps]
    alphas_prev = np.concatenate([acp[:1], acp[timesteps[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return alphas, alphas_prev, sigmas


def coefficients_on_device(values, like):
    """Per-step coefficients as one float32 tensor on x's device, copied once: indexing it in
    the loop costs no host-device round trip."""
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32).to(like.device)


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A CPU tensor (e.g. seeded noise) onto x's device without waiting for the device: the copy
    goes through pinned memory, so the host keeps queueing work."""
    if t.device == like.device:
        return t
    return t.pin_memory().to(like.device, non_blocking=True)


def generator_device(generator):
    """Where a generator draws (None: torch's global CPU one)."""
    return generator.device if generator is not None else "cpu"


def draw_noise(generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like x from the generator, on the generator's device (a CPU
    one by default, so a seed means the same numbers on every device), then on x's."""
    noise = torch.randn(like.shape, generator=generator, dtype=like.dtype,
                        device=generator_device(generator))
    return to_device(noise, like)


@torch.no_grad()
def sample_ddim(denoiser, x, alphas_cumprod, steps, eta=0.0, generator=None, progress=True,
                spacing="uniform"):
    """Run DDIM from noise x (x_T). One noise draw per step, even when eta is 0, so that a seed
    gives the same stream of random numbers whatever eta is."""
    timesteps = ddim_timesteps(steps, len(alphas_cumprod), spacing)
    alphas, alphas_prev, sigmas = ddim_coefficients(alphas_cumprod, timesteps, eta)
    coefficients = [coefficients_on_device(v, x) for v in (alphas, alphas_prev, sigmas)]
    n = len(timesteps)
    for step in progress_bar(range(n), desc="DDIM", disable=not progress):
        index = n - 1 - step
        a_t, a_prev, sigma = (v[index] for v in coefficients)
        pred = denoiser(x, int(timesteps[index]), a_t, step)
        noise = draw_noise(generator, x)
        direction = (1 - a_prev - sigma ** 2).sqrt() * pred.eps
        x = a_prev.sqrt() * pred.x0 + direction + sigma * noise
    return x
