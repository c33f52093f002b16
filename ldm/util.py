"""Small helpers shared by the whole package: config instantiation and model loading."""
import importlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.compat import meta_device


class ConfigError(Exception):
    """A model config that cannot be read or built; the message is one user-facing line."""


def get_obj_from_str(path: str):
    """The class a config's `target` names: one of this package's (ldm.*), or Stability's sgm.*
    name of one. A config only builds models: any other callable (os.system, ...) would run
    whatever its params say, so it is refused."""
    from ldm.targets import SGM_TARGETS

    path = SGM_TARGETS.get(path, path)  # Stability's (sgm) config targets build our classes
    module, _, name = path.rpartition(".")
    if not module:
        raise ConfigError(f"target {path!r} is not a dotted import path")
    if module.split(".")[0] != "ldm":
        raise ConfigError(f"target {path!r} is not a model class of this package (ldm.*, or "
                          f"an sgm.* name of one): a config builds models, it runs no other code")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import target {path!r}: {err}") from err
    if not isinstance(target, type):
        raise ConfigError(f"target {path!r} is not a class")
    return target


def instantiate_from_config(config):
    """Build `target(**params)` from an OmegaConf/dict node, as every LDM config expects."""
    if "target" not in config:
        raise ConfigError("config node has no 'target' key")
    params = config.get("params", None) or {}
    target = get_obj_from_str(config["target"])
    try:
        return target(**params)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as err:
        # a wrong or missing param (a string for a number, 0 heads, ...): say which part
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"the config's {target.__name__} could not be built from its params: "
                          f"{detail}") from err


def load_config(path) -> "OmegaConf":
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = OmegaConf.load(path)
    except OSError:  # unreadable, not malformed: the caller reports the file and why
        raise
    except Exception as err:  # yaml errors come in many classes
        raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from err
    if not hasattr(config, "keys") or "model" not in config:
        raise ConfigError(f"config file {path} has no 'model' section")
    return config


def config_family(config):
    """The model family of a config ("sd1", "sd2", "sdxl", ...), as the class of one of its
    components declares with a `family` attribute (the conditioner does); None if none does."""
    params = config.model.get("params") or {}
    for node in params.values():
        if not (hasattr(node, "get") and isinstance(node.get("target"), str)):
            continue
        try:
            family = getattr(get_obj_from_str(node["target"]), "family", None)
        except ConfigError:  # training-only parts (lr schedulers, losses) are not ours to import
            continue
        if family:
            return family
    return None


def build_model(config, device="cpu", state_dict=None, dtype=torch.float32, vae_encoder=True):
    """Build the model of `config.model`; with a state dict (a checkpoint file's tensors, consumed
    here), build it on the meta device (no random init of a billion parameters) and take the
    file's tensors as `ldm.layouts.fit_state_dict` fits them (state_dict may be a
    `ldm.layouts.StagedStateDict` still moving them). Weights become `dtype` (a dtype or
    a key -> dtype policy, ldm.precision.weight_dtype_policy): float32 by default, like the
    reference implementation, whatever the file stores. vae_encoder=False: the VAE without
    its encoder, for a model that only decodes."""
    from ldm.layouts import fit_state_dict

    if state_dict is None:
        model = instantiate_from_config(config.model)
        if not vae_encoder:
            model.first_stage_model.drop_encoder()
        return model.to(device).eval()
    with meta_device():
        model = instantiate_from_config(config.model)
    if not vae_encoder:
        model.first_stage_model.drop_encoder()
    if hasattr(state_dict, "result"):  # a StagedStateDict, filled while the model was built
        state_dict = state_dict.result()
    model.load_state_dict(fit_state_dict(model, state_dict, dtype, device),
                          strict=True, assign=True)
    return model.eval()


def part_configs(config):
    """The UNet's and the VAE's config nodes of a model config, under the keys its model class
    reads (`unet_config_key`: LDM's `unet_config`, Stability's `network_config`); None where
    one is missing."""
    params = config.model.get("params") or {}
    model_class = get_obj_from_str(config.model.target)
    return (params.get(getattr(model_class, "unet_config_key", "unet_config")),
            params.get("first_stage_config"))


def model_part_names(config) -> set:
    """The first components of the model's state-dict keys: its UNet wrapper (`model`), VAE
    and conditioner (named by the model class: `cond_stage_model` or `conditioner`)."""
    model_class = get_obj_from_str(config.model.target)
    return {"model", "first_stage_model",
            getattr(model_class, "conditioner_key", "cond_stage_model")}
