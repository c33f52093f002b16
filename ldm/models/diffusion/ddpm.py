"""Latent diffusion for inference: the noise schedule, the UNet call, text conditioning and the
first stage. Sampling loops live in their own modules and only see a denoiser callable."""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ldm.modules.encoders.conditioning import Conditioning, as_conditioning
from ldm.util import instantiate_from_config


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Betas in float64, as the LDM defines them (SD uses 'linear' = squared linspace)."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep,
                           dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}")


# LDM's schedule settings and their defaults (a config's model.params may set each)
SCHEDULE_DEFAULTS = dict(beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                         linear_end=2e-2, cosine_s=8e-3, v_posterior=0.0)


def schedule_settings(params) -> dict:
    """Every schedule setting: those `params` give, else the defaults."""
    return {name: params.get(name, value) for name, value in SCHEDULE_DEFAULTS.items()}


def schedule_buffers(beta_schedule, timesteps, linear_start, linear_end, cosine_s, v_posterior):
    """LDM's schedule buffers (alphas_cumprod, posterior coefficients, ...): float64, then
    stored as float32, as LDM does."""
    betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = (1 - v_posterior) * betas * (1 - acp_prev) / (1 - acp) + v_posterior * betas
    buffers = {
        "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - acp),
        "log_one_minus_alphas_cumprod": np.log(1 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / acp - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1 - acp),
        "posterior_mean_coef2": (1 - acp_prev) * np.sqrt(alphas) / (1 - acp),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in buffers.items()}


@dataclass
class Prediction:
    """What one (guided) model evaluation says about x_t: the noise and the clean latent."""
    eps: torch.Tensor
    x0: torch.Tensor

    @classmethod
    def split(cls, parameterization: str, x, output, alpha_bar) -> "Prediction":
        """eps and x0 from a network's raw `output` ('eps' or 'v' prediction) at latents x and
        cumulative alpha `alpha_bar` (broadcastable to x)."""
        sqrt_a, sqrt_1ma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if parameterization == "v":
            return cls(eps=sqrt_a * output + sqrt_1ma * x, x0=sqrt_a * x - sqrt_1ma * output)
        return cls(eps=output, x0=(x - sqrt_1ma * output) / sqrt_a)


class DiffusionWrapper(nn.Module):
    """Keeps the `model.diffusion_model.*` key layout of LDM checkpoints."""

    def __init__(self, unet_config):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x, t, context=None, y=None):
        return self.diffusion_model(x, t, context=context, y=y)


class LatentDiffusion(nn.Module):
    """Accepts every key of the standard SD 1.x / 2.x configs; those inference has no use for
    (training settings, the latent size and channels the UNet and VAE already fix) are ignored."""

    conditioner_key = "cond_stage_model"  # the conditioner's name, hence its checkpoint keys
    schedule_in_checkpoint = True         # LDM files carry the schedule buffers
    unet_config_key = "unet_config"       # the UNet's node in the config's params

    def __init__(self, unet_config, first_stage_config, cond_stage_config,
                 parameterization="eps", scale_factor=1.0, scale_by_std=False,
                 conditioning_key="crossattn", **params):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        if conditioning_key not in ("crossattn", None):
            raise ValueError(f"only cross-attention conditioning is supported, "
                             f"got {conditioning_key!r}")
        self.parameterization = parameterization
        self.image_size = params.get("image_size")  # the latent side it is trained at, if said
        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        self.add_module(self.conditioner_key, instantiate_from_config(cond_stage_config).eval())
        self._schedule = schedule_settings(params)  # (other params: training's, unused)
        for name, value in self.rebuildable_buffers().items():
            self.register_buffer(name, value, persistent=self.schedule_in_checkpoint)
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor

    @classmethod
    def schedule_arguments(cls, params) -> dict:
        """The schedule_buffers arguments a config's `model.params` gives this model class."""
        return schedule_settings(params)

    def rebuildable_buffers(self):
        """The schedule buffers LDM checkpoints carry, computed from the config; files that
        lack them get these."""
        return schedule_buffers(**self._schedule)

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def cond_model(self) -> nn.Module:
        """The conditioner (text tower, or SDXL's text towers + size embedders)."""
        return self._modules[self.conditioner_key]

    @property
    def family(self) -> str:
        """Which model family this is (presets are made for one), as its conditioner says."""
        return getattr(self.cond_model, "family", "unknown")

    def apply_model(self, x, t, cond):
        """Raw network output (eps or v, per `parameterization`) for latents x at timesteps t;
        cond is a Conditioning or a bare context tensor."""
        cond = as_conditioning(cond)
        return self.model(x, t, context=cond.context, y=cond.vector)

    def split_prediction(self, x, output, alpha_bar) -> Prediction:
        """Turn the raw output at cumulative alpha `alpha_bar` into eps and x0."""
        return Prediction.split(self.parameterization, x, output, alpha_bar)

    @torch.no_grad()
    def get_learned_conditioning(self, prompts):
        """The text tower's own output (SD 1.x/2.x: the context tensor)."""
        return self.cond_model.encode(prompts)

    @torch.no_grad()
    def get_conditioning(self, prompts, size=None) -> Conditioning:
        """Conditioning of `prompts` for images of `size` (H, W); only SDXL uses the size."""
        return self.cond_model.condition(list(prompts), size)

    @torch.no_grad()
    def get_unconditional_conditioning(self, negative_prompts, size=None) -> Conditioning:
        """CFG's unconditional branch for these negative prompts ("" = none), by the family's
        rule, which lives in its conditioner."""
        return self.cond_model.unconditional(list(negative_prompts), size)

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x) * self.scale_factor


# sgm's denoiser scalings and what they mean for the raw network output.
_SGM_PARAMETERIZATION = {"EpsScaling": "eps", "VScaling": "v"}


def _sgm_params(denoiser_config):
    return (denoiser_config or {}).get("params") or {}


def _sgm_parameterization(denoiser_config) -> str:
    params = _sgm_params(denoiser_config)
    scaling = ((params.get("scaling_config") or {}).get("target") or "EpsScaling").split(".")[-1]
    if scaling not in _SGM_PARAMETERIZATION:
        raise ValueError(f"unsupported sgm denoiser scaling {scaling!r}")
    return _SGM_PARAMETERIZATION[scaling]


class DiffusionEngine(LatentDiffusion):
    """Stability's sgm layout (SDXL): the same model under sgm's names. The conditioner is
    `conditioner.*`; the schedule is not stored in the file, which may instead carry
    `denoiser.sigmas`, sqrt((1 - a)/a) of that same schedule."""

    conditioner_key = "conditioner"
    schedule_in_checkpoint = False
    unet_config_key = "network_config"

    def __init__(self, network_config, first_stage_config, conditioner_config,
                 denoiser_config=None, scale_factor=1.0, **_training_only):
        super().__init__(network_config, first_stage_config, conditioner_config,
                         parameterization=_sgm_parameterization(denoiser_config),
                         scale_factor=scale_factor,
                         **self.schedule_arguments({"denoiser_config": denoiser_config}))
        self.register_load_state_dict_post_hook(DiffusionEngine._place_schedule)

    @classmethod
    def schedule_arguments(cls, params) -> dict:
        """From sgm's DiscreteDenoiser config (SDXL: LDM's linear betas 0.00085..0.012 over 1000
        steps, LegacyDDPMDiscretization's defaults)."""
        denoiser = _sgm_params(params.get("denoiser_config"))
        disc = (denoiser.get("discretization_config") or {}).get("params") or {}
        return schedule_settings(dict(
            timesteps=denoiser.get("num_idx", disc.get("num_timesteps", 1000)),
            linear_start=disc.get("linear_start", 0.00085),
            linear_end=disc.get("linear_end", 0.012)))

    def _place_schedule(self, _incompatible_keys=None):
        """The schedule is not in the file, so loading into a meta-built model leaves it on
        the meta device: compute it next to the loaded weights."""
        device = next(self.model.parameters()).device
        for name, value in self.rebuildable_buffers().items():
            self.register_buffer(name, value.to(device), persistent=False)
