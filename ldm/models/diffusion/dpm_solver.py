"""DPM-Solver++ (2M, multistep, data prediction) over a denoiser callable, on the discrete-time
VP schedule of the trained model (log alpha interpolated piecewise linearly in t)."""
import numpy as np
import torch

from ldm.progress import progress_bar


class DiscreteVPSchedule:
    """Continuous t in (0, 1] over N training timesteps: t = (n + 1) / N for timestep n."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        acp = alphas_cumprod.detach().cpu().double().numpy()
        self.n = len(acp)
        self.t_grid = np.linspace(0.0, 1.0, self.n + 1)[1:]
        self.log_alpha_grid = 0.5 * np.log(acp)

    def log_alpha(self, t):
        return float(np.interp(t, self.t_grid, self.log_alpha_grid))

    def alpha_sigma_lambda(self, t):
        log_a = self.log_alpha(t)
        sigma = np.sqrt(1.0 - np.exp(2 * log_a))
        return np.exp(log_a), sigma, log_a - np.log(sigma)

    def model_time(self, t):
        return (t - 1.0 / self.n) * self.n


LOWER_ORDER_FINAL_BELOW = 15


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, alphas_cumprod, steps, generator=None, progress=True):
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    schedule = DiscreteVPSchedule(alphas_cumprod)
    times = np.linspace(1.0, 1.0 / schedule.n, steps + 1)  # 'time_uniform', from noisiest
    coeffs = [schedule.alpha_sigma_lambda(t) for t in times]
    # alpha_bar of every step on the device at once: no host-device copy (and sync) per step
    alpha_bars = torch.tensor([c[0] ** 2 for c in coeffs], dtype=torch.float32).to(x.device)

    def x0_at(x, i):
        return denoiser(x, schedule.model_time(times[i]), alpha_bars[i], i).x0

    previous = [x0_at(x, 0)]
    for i in progress_bar(range(1, steps + 1), desc="DPM-Solver++",
                          disable=not progress):
        alpha_t, sigma_t, lam_t = coeffs[i]
        _, sigma_s, lam_s = coeffs[i - 1]
        h = lam_t - lam_s
        phi = np.expm1(-h)
        # Second order from the second step on; in a short run (fewer than 15 steps, the
        # published solver's `lower_order_final` rule) the last step drops to first order,
        # which is more stable.
        order = 1 if i == 1 or (steps < LOWER_ORDER_FINAL_BELOW and i == steps) else 2
        x = (sigma_t / sigma_s) * x - (alpha_t * phi) * previous[-1]
        if order == 2:
            r = (lam_s - coeffs[i - 2][2]) / h
            x = x - 0.5 * (alpha_t * phi) * (previous[-1] - previous[-2]) / r
        if i < steps:
            previous = (previous + [x0_at(x, i)])[-2:]
    return x
