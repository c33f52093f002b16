"""Model families' own sampling defaults: data, torch-free, so that txt2img's --help shows them.

The defaults everywhere else are the seed's (SD 2.1 in LDM's txt2img). Where a family's authors'
script differs, its entry here says how: the model's native size, and their diffusers scripts'
guidance scale, eta and DDIM timesteps. FreeU, which those scripts also turn on, stays a preset's
or a flag's choice. A family is named by its conditioner's `family` attribute."""

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

FAMILY_DEFAULTS = {
    "sd1": {"scale": 7.5, "ddim_eta": 1.0, "timestep_spacing": "leading"},
    "sdxl": {"H": 1024, "W": 1024, "scale": 5.0, "ddim_eta": 1.0, "timestep_spacing": "leading"},
}


def label(family) -> str:
    return FAMILY_LABELS.get(family, family or "unknown-family")


def family_values_text(option: str) -> str:
    """The families' own defaults of an option, e.g. 'SD 1.x: 7.5, SDXL: 5.0' ('' if none)."""
    return ", ".join(f"{label(family)}: {defaults[option]}"
                     for family, defaults in FAMILY_DEFAULTS.items() if option in defaults)


# The image side each family's models are trained at, where a config does not say it (LDM's say
# it as `model.params.image_size`, in latent pixels: the SD 2.1 768-v model's 96; sgm's do not).
TRAINED_SIDES = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def trained_side(family, latent_size=None, factor=8):
    """The image side a model is trained at: its config's latent image_size x the VAE factor,
    else its family's (None if neither is known)."""
    if isinstance(latent_size, int) and not isinstance(latent_size, bool) and latent_size > 0:
        return latent_size * factor
    return TRAINED_SIDES.get(family)
