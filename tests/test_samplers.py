"""Samplers against an exact solution: for Gaussian data N(0, s^2) the ideal denoiser is known in
closed form and the probability-flow ODE keeps x_t / std_t constant, so every deterministic
sampler must carry x_T to x_T * std_end / std_start. A wrong coefficient or time shift fails.
The noise schedules are checked by their defining formulas."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import ddim_timesteps, sample_ddim
from ldm.models.diffusion.ddpm import Prediction, make_beta_schedule
from ldm.models.diffusion.dpm_solver import DiscreteVPSchedule, sample_dpmpp_2m
from ldm.models.diffusion.plms import sample_plms

DATA_STD = 0.5
ALPHAS_CUMPROD = torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012)),
                              dtype=torch.float32)


class GaussianDenoiser:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, alpha_bar, step):
        self.calls.append((float(t), step))
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)
        x64 = x.double()
        eps = (1 - a).sqrt() * x64 / (a * DATA_STD ** 2 + 1 - a)
        x0 = (x64 - (1 - a).sqrt() * eps) / a.sqrt()
        return Prediction(eps=eps.float(), x0=x0.float())


def std_at(alpha_bar):
    return float(np.sqrt(alpha_bar * DATA_STD ** 2 + 1 - alpha_bar))


def x_T():
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def ddim_error(sampler, steps):
    acp = ALPHAS_CUMPROD.double().numpy()
    x = x_T()
    out = sampler(GaussianDenoiser(), x, ALPHAS_CUMPROD, steps, progress=False)
    expected = x * std_at(acp[0]) / std_at(acp[ddim_timesteps(steps)[-1]])
    return float(((out - expected).abs().max() / expected.abs().max()))


def dpm_error(steps, denoiser=None):
    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD)
    x = x_T()
    out = sample_dpmpp_2m(denoiser or GaussianDenoiser(), x, ALPHAS_CUMPROD, steps,
                          progress=False)
    a_start = schedule.alpha_sigma_lambda(1.0)[0] ** 2
    a_end = schedule.alpha_sigma_lambda(1.0 / 1000)[0] ** 2
    expected = x * std_at(a_end) / std_at(a_start)
    return float(((out - expected).abs().max() / expected.abs().max()))


def test_ddim_converges_to_the_exact_solution_at_first_order():
    coarse, fine = ddim_error(sample_ddim, 50), ddim_error(sample_ddim, 200)
    assert fine < 0.02
    assert 3 < coarse / fine < 5  # error ~ 1/steps


def test_plms_converges_at_higher_order():
    coarse, fine = ddim_error(sample_plms, 20), ddim_error(sample_plms, 50)
    assert fine < 5e-3
    assert coarse / fine > 5


def test_dpm_solver_converges_at_higher_order():
    coarse, fine = dpm_error(50), dpm_error(200)
    assert fine < 1e-2
    assert coarse / fine > 6  # between first (4x) and second order (16x) on this schedule


def test_dpm_solver_evaluates_once_per_step_from_the_noisiest():
    denoiser = GaussianDenoiser()
    dpm_error(8, denoiser)
    assert [s for _, s in denoiser.calls] == list(range(8))
    assert denoiser.calls[0][0] == pytest.approx(999.0)
    assert denoiser.calls[-1][0] < denoiser.calls[0][0]


class LastCall(GaussianDenoiser):
    def __call__(self, x, t, alpha_bar, step):
        out = super().__call__(x, t, alpha_bar, step)
        self.last = (x.double(), out.x0.double())
        return out


@pytest.mark.parametrize("steps,first_order", [(10, True), (14, True), (15, False), (20, False)])
def test_dpm_solver_last_step_is_first_order_below_15_steps(steps, first_order):
    """The published solver's lower_order_final rule (steps < 15): then the last update is
    DPM-Solver++'s first-order one from the last evaluation alone."""
    denoiser = LastCall()
    out = sample_dpmpp_2m(denoiser, x_T(), ALPHAS_CUMPROD, steps, progress=False).double()
    log_alpha = np.log(ALPHAS_CUMPROD.double().numpy()) / 2

    def alpha_sigma_lambda(t):  # the discrete schedule, interpolated in t = (n + 1) / 1000
        la = np.interp(t, np.arange(1, 1001) / 1000, log_alpha)
        sigma = np.sqrt(1 - np.exp(2 * la))
        return np.exp(la), sigma, la - np.log(sigma)
    times = np.linspace(1.0, 1.0 / 1000, steps + 1)
    _, sigma_s, lam_s = alpha_sigma_lambda(times[-2])
    alpha_t, sigma_t, lam_t = alpha_sigma_lambda(times[-1])
    x, x0 = denoiser.last
    first = (sigma_t / sigma_s) * x - alpha_t * np.expm1(-(lam_t - lam_s)) * x0
    gap = float((out - first).abs().max())
    assert (gap < 1e-5) if first_order else (gap > 1e-4), gap


def test_ddim_eta_noise_is_drawn_every_step():
    """The reference draws one randn per step even at eta 0: the RNG stream after a run depends
    on the number of steps, not on eta."""
    states = []
    for eta in (0.0, 1.0):
        g = torch.Generator().manual_seed(5)
        sample_ddim(GaussianDenoiser(), x_T(), ALPHAS_CUMPROD, 6, eta=eta, generator=g,
                    progress=False)
        states.append(torch.randn(3, generator=g))
    assert torch.equal(states[0], states[1])


def test_plms_draws_noise_for_every_update_as_the_published_sampler():
    """The published PLMS draws (and scales by sigma 0) one noise tensor per x-update: steps + 1
    of them, the first step updating twice. Drawing them too keeps the stream of later batches."""
    g = torch.Generator().manual_seed(5)
    x = x_T()
    sample_plms(GaussianDenoiser(), x, ALPHAS_CUMPROD, 5, generator=g, progress=False)
    assert len(ddim_timesteps(5)) == 5
    expected = torch.Generator().manual_seed(5)
    for _ in range(5 + 1):
        torch.randn(x.shape, generator=expected)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=expected))


def test_step_index_is_counted_from_the_noisiest_step():
    denoiser = GaussianDenoiser()
    sample_ddim(denoiser, x_T(), ALPHAS_CUMPROD, 6, progress=False)
    assert [t for t, _ in denoiser.calls] == [997, 831, 665, 499, 333, 167, 1]
    assert [s for _, s in denoiser.calls] == list(range(7))


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_prediction_split_is_consistent(parameterization):
    """eps and x0 from either parameterization satisfy x_t = sqrt(a) x0 + sqrt(1-a) eps, and a
    v output built from known eps/x0 gives them back (v = sqrt(a) eps - sqrt(1-a) x0)."""
    from ldm.models.diffusion.ddpm import Prediction
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    a = torch.tensor(0.3)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    pred = Prediction.split(parameterization, x, output, a)
    assert torch.allclose(pred.eps, eps, atol=1e-5) and torch.allclose(pred.x0, x0, atol=1e-5)


def test_plms_start_evaluations_belong_to_step_zero():
    """PLMS evaluates twice in its first step; both run under step 0's plan (so a re-dilation
    tau of 1 covers exactly the first step, as for DDIM)."""
    denoiser = GaussianDenoiser()
    sample_plms(denoiser, x_T(), ALPHAS_CUMPROD, 6, progress=False)
    assert [s for _, s in denoiser.calls] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert [t for t, _ in denoiser.calls][:3] == [997, 831, 831]


def test_beta_schedules_follow_their_definitions():
    """LDM's schedules by their defining property: 'linear' (SD's) runs from start to end
    evenly in sqrt(beta), 'sqrt_linear' evenly in beta, and 'sqrt' is the square root of an
    even run from start to end."""
    start, end, n = 0.00085, 0.012, 1000
    for name, power, first, last in (("linear", 0.5, start, end),
                                     ("sqrt_linear", 1.0, start, end),
                                     ("sqrt", 2.0, start ** 0.5, end ** 0.5)):
        betas = make_beta_schedule(name, n, start, end)
        assert betas.dtype == np.float64 and betas.shape == (n,)
        np.testing.assert_allclose(betas ** power, np.linspace(first ** power, last ** power, n),
                                   rtol=1e-12, err_msg=name)


def test_cosine_schedule_has_the_cosine_alphas_cumprod():
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), betas clipped at 0.999 near t = T."""
    n, s = 1000, 8e-3
    betas = make_beta_schedule("cosine", n, cosine_s=s)
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    unclipped = betas < 0.999
    assert betas.min() > 0 and betas.max() == 0.999 and unclipped[:-1].all()
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], (f[1:] / f[0])[:-1], rtol=1e-9)


def test_unknown_beta_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'quadratic'"):
        make_beta_schedule("quadratic", 10)


class NonlinearDenoiser:
    """eps = tanh(x) * (1 + t / 1000): nonlinear in x and t, so a wrong coefficient, history
    term or timestep shows (the Gaussian denoiser is linear, and forgiving)."""

    def __call__(self, x, t, alpha_bar, step):
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)
        eps = eps_of(x.double(), t)
        return Prediction(eps=eps.float(), x0=((x.double() - (1 - a).sqrt() * eps) / a.sqrt()).float())


def eps_of(x, t):
    return torch.tanh(x) * (1 + float(t) / 1000)


def test_ddim_at_eta_one_half_is_the_published_update():
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise, with
    sigma = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)) and a_prev of the last step
    alphas_cumprod[0], in float64; one noise draw per step."""
    acp = ALPHAS_CUMPROD.double()
    steps, eta = 6, 0.5
    timesteps = ddim_timesteps(steps)
    ours = sample_ddim(NonlinearDenoiser(), x_T(), ALPHAS_CUMPROD, steps, eta=eta,
                       generator=torch.Generator().manual_seed(3), progress=False)
    x, noise = x_T().double(), torch.Generator().manual_seed(3)
    for i, t in enumerate(reversed(timesteps)):
        a_prev = acp[timesteps[len(timesteps) - 2 - i]] if i < len(timesteps) - 1 else acp[0]
        x = ddim_update(x, t, acp[t], a_prev, eta, noise)
    assert float((ours.double() - x).abs().max() / x.abs().max()) < 1e-5


def ddim_update(x, t, a, a_prev, eta, noise):
    """The published DDIM step in float64, with NonlinearDenoiser's eps and one noise draw."""
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    eps = eps_of(x, t)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    z = torch.randn(x.shape, generator=noise).double()
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * z


def test_plms_is_ldms_pseudo_linear_multistep():
    """LDM's p_sample_plms, transcribed in float64: an improved-Euler first step (eps averaged
    with eps at the next timestep), then Adams-Bashforth over up to three previous eps."""
    acp = ALPHAS_CUMPROD.double()
    steps = 7
    timesteps = list(reversed(ddim_timesteps(steps)))
    ours = sample_plms(NonlinearDenoiser(), x_T(), ALPHAS_CUMPROD, steps, progress=False)

    def x_prev(x, e, i):
        a = acp[timesteps[i]]
        a_prev = acp[timesteps[i + 1]] if i + 1 < len(timesteps) else acp[0]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

    x, old = x_T().double(), []
    for i, t in enumerate(timesteps):
        e = eps_of(x, t)
        if not old:
            t_next = timesteps[min(i + 1, len(timesteps) - 1)]
            e_prime = (e + eps_of(x_prev(x, e, i), t_next)) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = x_prev(x, e_prime, i)
        old = (old + [e])[-3:]
    assert float((ours.double() - x).abs().max() / x.abs().max()) < 1e-5


def test_leading_spacing_is_diffusers_ddim_with_offset_one():
    """diffusers' DDIMScheduler (timestep_spacing 'leading', steps_offset 1), as the authors'
    SD 1.5 and SDXL scripts load it: 30 steps are 958, 925, ..., 1; LDM's uniform schedule
    runs 31 from 991. Where the step count divides 1000 both are the same."""
    leading = ddim_timesteps(30, spacing="leading")
    assert len(leading) == 30 and list(leading[:3]) == [1, 34, 67] and leading[-1] == 958
    uniform = ddim_timesteps(30)
    assert len(uniform) == 31 and uniform[-1] == 991 and list(uniform[:30]) == list(leading)
    assert list(ddim_timesteps(6, spacing="leading")) == [1, 167, 333, 499, 665, 831]
    for steps in (1, 4, 5, 8, 20, 50, 250, 500):
        assert list(ddim_timesteps(steps, spacing="leading")) == list(ddim_timesteps(steps))
    with pytest.raises(ValueError, match="'linspace'"):
        ddim_timesteps(30, spacing="linspace")


@pytest.mark.parametrize("sampler", [sample_ddim, sample_plms])
def test_ddim_and_plms_step_through_the_spacing_they_are_given(sampler):
    """From the noisiest timestep down, once per step (PLMS also evaluates its first step at
    the next timestep)."""
    for spacing in ("uniform", "leading"):
        denoiser = GaussianDenoiser()
        sampler(denoiser, x_T(), ALPHAS_CUMPROD, 30, progress=False, spacing=spacing)
        timesteps = [t for t, _step in denoiser.calls]
        if sampler is sample_plms:
            timesteps.pop(1)  # the pseudo improved Euler start's second evaluation
        assert timesteps == list(reversed(ddim_timesteps(30, spacing=spacing)))


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_is_the_published_multistep_second_order_update(steps):
    """DPM-Solver++ (2M), data prediction, transcribed in float64 from the published
    multistep_dpm_solver_second_update ('dpmsolver' type): x_t = (sigma_t / sigma_s) x
    - alpha_t phi m0 - alpha_t phi (m0 - m1) / (2 r), phi = expm1(-h), r = h_prev / h; the first
    step first order, and the last too below 15 steps. Time-uniform from t = 1 to 1/1000,
    the model fed (t - 1/1000) * 1000."""
    log_alpha = np.log(ALPHAS_CUMPROD.double().numpy()) / 2

    def alpha_sigma_lambda(t):
        la = np.interp(t, np.arange(1, 1001) / 1000, log_alpha)
        sigma = np.sqrt(1 - np.exp(2 * la))
        return np.exp(la), sigma, la - np.log(sigma)

    def x0_of(x, t):
        alpha, sigma, _ = alpha_sigma_lambda(t)
        return (x - sigma * eps_of(x, (t - 1 / 1000) * 1000)) / alpha

    ours = sample_dpmpp_2m(NonlinearDenoiser(), x_T(), ALPHAS_CUMPROD, steps, progress=False)
    times = np.linspace(1.0, 1 / 1000, steps + 1)
    x = x_T().double()
    m = [x0_of(x, times[0])]
    for i in range(1, steps + 1):
        _, sigma_s, lam_s = alpha_sigma_lambda(times[i - 1])
        alpha_t, sigma_t, lam_t = alpha_sigma_lambda(times[i])
        h, phi = lam_t - lam_s, np.expm1(-(lam_t - lam_s))
        x_next = (sigma_t / sigma_s) * x - alpha_t * phi * m[-1]
        if i > 1 and not (steps < 15 and i == steps):
            r = (lam_s - alpha_sigma_lambda(times[i - 2])[2]) / h
            x_next = x_next - 0.5 * alpha_t * phi * (m[-1] - m[-2]) / r
        x = x_next
        m.append(x0_of(x, times[i]))
    assert float((ours.double() - x).abs().max() / x.abs().max()) < 1e-5


def test_ddim_with_leading_timesteps_is_diffusers_ddim_step():
    """diffusers' DDIMScheduler.step as the authors' scripts run it: t runs down from
    (steps - 1) * (1000 // steps) + 1, the previous timestep is t - 1000 // steps, and below 0
    alpha_prev is alphas_cumprod[0] (set_alpha_to_one False); eta 1, float64."""
    acp = ALPHAS_CUMPROD.double()
    steps, eta, stride = 6, 1.0, 1000 // 6
    ours = sample_ddim(NonlinearDenoiser(), x_T(), ALPHAS_CUMPROD, steps, eta=eta,
                       generator=torch.Generator().manual_seed(5), progress=False,
                       spacing="leading")
    x, noise = x_T().double(), torch.Generator().manual_seed(5)
    for t in range((steps - 1) * stride + 1, 0, -stride):
        x = ddim_update(x, t, acp[t], acp[t - stride] if t - stride >= 0 else acp[0], eta, noise)
    assert float((ours.double() - x).abs().max() / x.abs().max()) < 1e-5


def test_trailing_spacing_is_diffusers_and_starts_at_the_last_timestep():
    """diffusers' 'trailing': round(arange(1000, 0, -1000 / steps)) - 1."""
    assert list(ddim_timesteps(1, spacing="trailing")) == [999]
    assert list(ddim_timesteps(4, spacing="trailing")) == [249, 499, 749, 999]
    assert list(ddim_timesteps(3, spacing="trailing")) == [332, 666, 999]
    assert len(set(ddim_timesteps(500, spacing="trailing"))) == 500


def test_trailing_spacing_has_its_steps_at_every_count():
    """The float arange of diffusers' formula has one element too many at some counts (61:
    a 62nd, t = -1); every count gets exactly its steps, in 0..999."""
    for steps in range(1, 501):
        timesteps = ddim_timesteps(steps, spacing="trailing")
        assert len(timesteps) == steps and timesteps[0] >= 0 and timesteps[-1] == 999, steps
        assert len(set(timesteps)) == steps, steps


def test_dpm_solver_reaches_the_unet_at_its_fractional_timesteps(tiny_pipe, monkeypatch):
    """DPM-Solver++ evaluates the model at t = N (t_cont - 1/N), half-integers where N does not
    divide: the guided denoiser must hand those to the UNet as they are, not truncated to the
    integers of the LDM samplers (832 instead of 832.5 moves every --dpm run)."""
    seen, apply_model = [], tiny_pipe.model.apply_model

    def recorded(x, t, *args, **kwargs):
        seen.append(t.tolist())
        return apply_model(x, t, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.model, "apply_model", recorded)
    opts = tiny_pipe.options(H=64, W=64, steps=6, sampler="dpm", precision="full", scale=5.0)
    tiny_pipe.generate(["a red cube"], opts, progress=False)
    assert seen == [[t, t] for t in (999, 832.5, 666, 499.5, 333, 166.5)]  # cond and uncond


def test_the_samplers_get_float32_predictions_under_autocast(tiny_pipe, monkeypatch):
    """The UNet runs in half precision under autocast (bf16 on the CPU); its output is taken
    back to the latents' float32 before the samplers' updates (DDIM's direction term, PLMS's
    55/59/37/9 combination), which would otherwise run in half precision."""
    from ldm.scalecrafter.guidance import GuidedDenoiser

    call, dtypes = GuidedDenoiser.__call__, set()

    def recorded(self, x, *args, **kwargs):
        pred = call(self, x, *args, **kwargs)
        dtypes.add((x.dtype, pred.eps.dtype, pred.x0.dtype))
        return pred

    monkeypatch.setattr(GuidedDenoiser, "__call__", recorded)
    opts = tiny_pipe.options(H=64, W=64, steps=2, precision="autocast")
    tiny_pipe.generate(["a red cube"], opts, progress=False)
    assert dtypes == {(torch.float32,) * 3}
