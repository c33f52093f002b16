"""Fitting a published checkpoint file to the model its config builds.

Real files are not the model's state dict. The rules, as the established tools apply them:
- every weight the model needs must be in the file with its shape, else the load is refused;
- buffers the model derives from its config (the diffusion schedule, CLIP position ids) may be
  missing: they are rebuilt (files converted by other tools often lack them);
- the known extras below, and the weights a module was built without because it never reads
  them (`unread_keys`), are dropped without a word; any other extra key is dropped with one
  warning line (the file may be from another family or a fine-tune with add-ons).
The tables are data: a family whose files carry something new adds a row here."""
import fnmatch
from typing import Callable, Dict, List, Mapping, Union

import torch
from torch import nn

from ldm.background import InBackground
from ldm.progress import warn

# Keys that published files carry and no inference model uses: pattern -> where they come from.
KNOWN_EXTRAS = {
    "model_ema.*": "training EMA state: decay / num_updates (SD 1.x, 2.x), and in non-pruned "
                   "files (v1-5-pruned.ckpt) full EMA copies of the UNet; configs with "
                   "use_ema: False use the main model.* weights",
    "*.embeddings.position_ids": "CLIP text position ids, saved by transformers < 4.31 "
                                 "(SD 1.x, SDXL); absent from newer conversions",
    "denoiser.sigmas": "sgm's DiscreteDenoiser buffer (SDXL); it follows from the schedule",
    "cond_stage_model.transformer.text_projection.weight":
        "CLIP's projection, which ComfyUI saved with SD 1.x text encoders until it dropped it "
        "on saving; SD 1.x reads the tokens' features, never a projection",
    "cond_stage_model.logit_scale": "CLIP's logit scale, saved by ComfyUI as the projection was",
    "lvlb_weights": "LDM training loss weights",
    "logvar": "LDM training log-variance",
    "v_pred": "the marker of v-prediction files (ComfyUI, kohya): refused under an eps config "
              "(MODEL_VARIANTS), no more than a marker under a v one",
}

# Buffers rebuilt even when the file has them: their value is fixed by the architecture, and
# some community files store them damaged (position ids as rounded floats).
ALWAYS_REBUILT = ("*.embeddings.position_ids",)

EXAMPLES = 5  # keys named in an error or warning line

# Half-precision files round the schedule buffers too: in bf16 (or fp8) the first values of
# alphas_cumprod become exactly 1, which makes every latent NaN. A copy of a buffer the config
# defines that differs from it and holds only half-precision values (rounded once or twice,
# staged up to fp32 or not) gives way to the exact one; a full-precision schedule is the file's.
_ROUNDING_DTYPES = tuple(getattr(torch, name) for name in
                         ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
                         if hasattr(torch, name))


def _is_rounded_copy(value: torch.Tensor, exact: torch.Tensor) -> bool:
    """`value` (the file's, maybe cast up by staging) is not `exact` and is made of values a
    half dtype holds exactly: a rounded copy."""
    if not value.is_floating_point() or value.shape != exact.shape:
        return False
    stored = value.detach().to("cpu", torch.float32)
    if torch.equal(stored, exact.float()):
        return False
    return any(torch.equal(stored, stored.to(dtype).float()) for dtype in _ROUNDING_DTYPES)


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _key_list(keys: List[str]) -> str:
    shown = ", ".join(keys[:EXAMPLES])
    return shown + (f", ... and {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else "")


# The model's parts, by their state-dict prefix: named where a file lacks all of one.
PART_NAMES = {"model": "the UNet", "first_stage_model": "the VAE",
              "cond_stage_model": "the text encoder", "conditioner": "the text encoders"}


# What the UNets of distilled models (SSD-1B, Vega, KOALA: SDXL with transformer blocks taken
# out) lack, when every missing weight is one of these.
DISTILLED_GAPS = ("model.diffusion_model.*.transformer_blocks.*",)

# What to do about a part a file lacks whole, where there is something to do.
PART_HINTS = {"first_stage_model": ": give a VAE file (txt2img --vae, Pipeline.load(vae_path=))"}


# A key prefix only one family's files have -> the family and the config that reads them, to
# point a file loaded with another family's config to its own.
FAMILY_MARKERS = {
    "cond_stage_model.transformer.text_model.":
        ("an SD 1.x", "configs/stable-diffusion/v1-inference.yaml"),
    "cond_stage_model.model.transformer.":
        ("an SD 2.x", "configs/stable-diffusion/v2-inference.yaml (v2-inference-v.yaml for "
                      "768-v files)"),
    "conditioner.embedders.1.": ("an SDXL", "configs/stable-diffusion/sd_xl_base.yaml"),
    # sgm's layout of an SD 2.x model (SD-Turbo); the refiner's is refused before
    "conditioner.embedders.0.model.":
        ("an SD 2.x (sgm layout: SD-Turbo)", "configs/stable-diffusion/v2-inference.yaml"),
}

# Other tools' names for the same tensors: (the file's prefix, the model's), taken where the
# model has the second and the file only the first.
KEY_RENAMES = (
    # CLIPTextModel saved by transformers 3.x, without `text_model.` (SD 1.x community files)
    ("cond_stage_model.transformer.embeddings.",
     "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.",
     "cond_stage_model.transformer.text_model.final_layer_norm."),
    # the same flat names for SDXL's CLIP tower (converters over transformers' own flat keys)
    *((f"conditioner.embedders.0.transformer.{part}.",
       f"conditioner.embedders.0.transformer.text_model.{part}.")
      for part in ("embeddings", "encoder", "final_layer_norm")),
    # Stability's sgm layout of an SD 2.x model (SD-Turbo): its OpenCLIP tower as embedder 0
    ("conditioner.embedders.0.model.", "cond_stage_model.model."),
    # the VAE's mid-block attention under diffusers >= 0.17's names, which its SD 1.x / 2.x
    # back-conversion script passed through from mid-2023 to December 2023 (as Linear weights:
    # see RESHAPED)
    *((f"first_stage_model.{part}.mid.attn_1.{theirs}.",
       f"first_stage_model.{part}.mid.attn_1.{ours}.") for part in ("encoder", "decoder")
      for theirs, ours in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))),
)

# Weights other tools store with the same numbers in another shape: (model key patterns, the
# story). A file's tensor there that differs from the model's only by trailing 1-sized dims is
# reshaped; nowhere else (a shape mismatch elsewhere means another model).
RESHAPED = (
    (("first_stage_model.*.mid.attn_1.*",),
     "the VAE's mid-block attention, 1x1 convs here: diffusers' Linear weights [C, C] as "
     "converted back to single files, and biases [C, 1, 1] from that script's early-2024 fix"),
)

# The component torch.compile's wrapper adds to its module's keys, where a trainer saved a
# compiled UNet (`model.diffusion_model._orig_mod.input_blocks...`): dropped.
COMPILED = "_orig_mod."

# Parameters other tools store as a Linear layer's weight, i.e. transposed: (the file's key, the
# model's), taken transposed where the model has the second and the file only the first.
TRANSPOSED_RENAMES = (
    # SDXL files from diffusers' convert_diffusers_to_original_sdxl.py before it transposed
    # (and others'): CLIPTextModelWithProjection's text_projection Linear, saved as it is.
    # Square (1280 x 1280): only the name tells the two apart.
    ("conditioner.embedders.1.model.text_projection.weight",
     "conditioner.embedders.1.model.text_projection"),
)

# The VAE's weights' top-level names (a standalone VAE file's keys), and its part's prefix in
# a whole model.
VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
VAE_PREFIX = "first_stage_model."

# Files that are no text-to-image model this tool runs, told by their keys when they lack the
# UNet: (fnmatch patterns, "any" key or "all" keys matching, what to say); first match wins.
NOT_A_MODEL = (
    (("lora_unet_*", "lora_te*", "*.lora_A.*", "*.lora_down.*", "*.lora.down.*"), "any",
     "a LoRA, not a model: pass the base model's checkpoint (LoRAs are not supported)"),
    (("model_ema.diffusion_model*",), "any",
     "one whose UNet is there only as EMA copies (model_ema.*): use the model's pruned or "
     "-emaonly file"),
    (tuple(f"{part}.*" for part in VAE_PARTS) + (VAE_PREFIX + "*",), "all",
     "a VAE alone, not a whole model (a VAE goes with --vae / vae_path, beside the model's "
     "checkpoint)"),  # (before the next row: a VAE in diffusers' layout is one too)
    (("*down_blocks.*", "*mid_block.*"), "any",
     "in diffusers' layout (a UNet, or a pipeline in one file): give the whole pipeline "
     "folder (unet/, vae/, text_encoder/, ...) or the model's single-file .ckpt / "
     ".safetensors"),
    (("text_model.*", "transformer.*", "cond_stage_model.*", "conditioner.*"), "all",
     "a text encoder alone, not a whole model"),
)

# Extras that mean the weights cannot be used as stored: (patterns, what the file is).
UNUSABLE_EXTRAS = (
    (("scaled_fp8", "*.scale_weight"),
     "a scaled-fp8 file (ComfyUI): its fp8 weights need their scales (*.scale_weight), which "
     "this tool does not apply; use an fp16 or fp32 file"),
)

# Models whose weights fit a config here but which must be sampled otherwise, told by marker
# keys (as ComfyUI and diffusers tell them): (patterns, the config parameterization the marker
# contradicts, or None for any; what the file is). Loaded, they would make wrong images.
MODEL_VARIANTS = (
    (("edm_mean", "edm_std"), None,
     "a Playground v2.5 model (edm_mean / edm_std: EDM sampling and its own latent scaling), "
     "which this tool does not run"),
    (("edm_vpred.*",), None,
     "a v-prediction model sampled by EDM (edm_vpred.*), which this tool does not run"),
    (("ztsnr",), None,
     "a zero-terminal-SNR model (ztsnr; a diffusers folder's scheduler: "
     "rescale_betas_zero_snr), whose rescaled schedule this tool does not apply"),
    (("v_pred",), "eps",
     "a v-prediction model (v_pred; a diffusers folder's scheduler: prediction_type "
     "v_prediction), and the config predicts eps: use a config that predicts "
     "v (SD 2.x: configs/stable-diffusion/v2-inference-v.yaml; others: a copy of the "
     "family's config with `parameterization: v`, or for SDXL the denoiser's scaling_config "
     "target VScaling)"),
    (("embedder.model.*",), None,
     "an SD 2.1 unCLIP model (embedder.model.*: image variations from a CLIP image "
     "embedding), which txt2img cannot run"),
)

# SD 2.x files do not say whether they predict eps (512-base) or v (768-v), and the other
# config makes noise. ComfyUI tells them by a norm bias that v training spread wider: family ->
# (key, the standard deviation above which the file predicts v). Only the eps config is warned
# (the common slip: the 768-v file with the seed's v2-inference.yaml).
V_PREDICTION_TELLS = {
    "sd2": ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias", 0.09),
}


def _looks_v_predicting(model, state_dict) -> bool:
    """A model configured for eps whose file's weights look v-predicting (V_PREDICTION_TELLS)."""
    key, threshold = V_PREDICTION_TELLS.get(getattr(model, "family", None), (None, None))
    if key not in state_dict or getattr(model, "parameterization", None) != "eps":
        return False
    return float(state_dict[key].float().std(unbiased=False)) > threshold  # (as ComfyUI)


# UNet input channels of image-conditioned SD models, which txt2img cannot run.
IMAGE_CONDITIONED = {9: "an inpainting", 5: "a depth-conditioned", 8: "an InstructPix2Pix"}
UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"


def renamed(state_dict: Dict[str, torch.Tensor], expected,
            unread=()) -> Dict[str, torch.Tensor]:
    """The file's keys under the model's names, where COMPILED, KEY_RENAMES or
    TRANSPOSED_RENAMES knows the file's, and its tensors in the model's shapes where RESHAPED
    allows it. Names the model was built without (`unread` patterns) are renamed too, so
    that they are dropped as such."""
    def has(keys, prefix):
        return any(k.startswith(prefix) for k in keys)
    if not any(COMPILED in k for k in expected) and any(COMPILED in k for k in state_dict):
        for key in [k for k in state_dict if COMPILED in k]:
            state_dict[key.replace(COMPILED, "")] = state_dict.pop(key)
    for old, new in KEY_RENAMES:
        wanted = has(expected, new) or any(p.startswith(new) for p in unread)
        if wanted and not has(state_dict, new) and has(state_dict, old):
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[new + key[len(old):]] = state_dict.pop(key)
    for old, new in TRANSPOSED_RENAMES:
        if new in expected and new not in state_dict and old in state_dict:
            state_dict[new] = state_dict.pop(old).t().contiguous()
    for patterns, _story in RESHAPED:
        for key, value in state_dict.items():
            target = expected.get(key)
            if target is not None and _matches(key, patterns) and value.shape != target.shape \
                    and _trailing_ones_dropped(value.shape) == _trailing_ones_dropped(target.shape):
                state_dict[key] = value.reshape(target.shape)
    return state_dict


def _trailing_ones_dropped(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def what_the_file_is(needed, present) -> str:
    """': the file is ...' for a file without the UNet that NOT_A_MODEL recognises, else ''."""
    unet = "model.diffusion_model."
    if not any(k.startswith(unet) for k in needed) or any(k.startswith(unet) for k in present):
        return ""
    weights = [key for key in present if not _matches(key, KNOWN_EXTRAS)]
    for patterns, how, what in NOT_A_MODEL:
        found = any(_matches(key, patterns) for key in present) if how == "any" else \
            bool(weights) and all(_matches(key, patterns) for key in weights)
        if found:
            return f": the file is {what}"
    return ""


def _unusable(state_dict, expected, parameterization=None) -> str:
    """What makes the file's weights unusable as stored, said of the file ("is ...", "holds
    ..."; '' if nothing): a UNUSABLE_EXTRAS or MODEL_VARIANTS marker (the latter for a model
    of `parameterization`), or integer (quantized) tensors where the model has floating
    ones."""
    for patterns, what in UNUSABLE_EXTRAS:
        if any(_matches(key, patterns) for key in state_dict):
            return f"is {what}"
    for patterns, contradicts, what in MODEL_VARIANTS:
        if contradicts in (None, parameterization) and \
                any(_matches(key, patterns) for key in state_dict if key not in expected):
            return f"is {what}"
    integer = next((k for k, v in state_dict.items() if k in expected
                    and expected[k].is_floating_point() and not v.is_floating_point()), None)
    if integer:
        dtype = state_dict[integer].dtype
        kind = "complex" if dtype.is_complex else "integer (quantized)"
        return (f"holds {kind} weights, e.g. {integer} is "
                f"{str(dtype).replace('torch.', '')}: such files are not supported; use an "
                f"fp16 or fp32 file")
    return ""


def is_sdxl_refiner(keys) -> bool:
    """sgm's layout with one text tower (bigG) and the UNet's label_emb: the SDXL refiner."""
    embedders = [k for k in keys if k.startswith("conditioner.embedders.")]
    return any(k.startswith("conditioner.embedders.0.model.") for k in embedders) \
        and all(k.startswith("conditioner.embedders.0.") for k in embedders) \
        and any(k.startswith("model.diffusion_model.label_emb.") for k in keys)


def describe_missing(missing: List[str], needed=(), present=()) -> str:
    """How a file fails the config (CheckpointMismatch's detail): the first few weights it
    lacks; the model part it lacks whole among the `needed` keys (some community files ship
    without their VAE), or, when the file's `present` keys are another family's, the config
    to use instead."""
    count = f"{len(missing)} missing key" + ("s" if len(missing) != 1 else "")
    line = f": {count} ({_key_list(missing)})"
    what = what_the_file_is(needed, present)
    if what:  # (its missing keys would say nothing more)
        return what
    family = _other_family(needed, present)
    if family:
        return line + f": the file looks like {family[0]} checkpoint, use --config {family[1]}"
    if all(_matches(key, DISTILLED_GAPS) for key in missing):
        return line + (": its UNet has fewer transformer blocks than the config builds (a "
                       "distilled model such as SSD-1B or Vega?), which this tool does not run")
    parts = {key.split(".", 1)[0] for key in missing}
    if len(parts) == 1 and needed:
        part = parts.pop()
        lacks_all = len(missing) == sum(k.startswith(part + ".") for k in needed)
        if part in PART_NAMES and lacks_all and not any(k.startswith(part + ".") for k in present):
            line += f": the file has none of {PART_NAMES[part]} ({part}.*)" + PART_HINTS.get(
                part, "")
    return line


def _other_family(needed, present):
    """(family, config) of the marker the file has and the model lacks, if any."""
    def has(keys, marker):
        return any(k.startswith(marker) for k in keys)
    return next((family for marker, family in FAMILY_MARKERS.items()
                 if has(present, marker) and not has(needed, marker)), None)


def rebuildable_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{state-dict key: value} of every buffer a module can derive from its own config (modules
    say so with a `rebuildable_buffers()` method)."""
    found = {}
    for prefix, module in model.named_modules():
        own = getattr(module, "rebuildable_buffers", None)
        if callable(own):
            found.update({f"{prefix}.{k}" if prefix else k: v for k, v in own().items()})
    return found


def unread_keys(model: nn.Module) -> List[str]:
    """State-dict key patterns of the weights the published files carry and the model was built
    without, since it never reads them (modules say so with an `unread_keys()` method): dropped
    like the known extras, and not asked for."""
    found = []
    for prefix, module in model.named_modules():
        own = getattr(module, "unread_keys", None)
        if callable(own):
            found.extend(f"{prefix}.{k}" if prefix else k for k in own())
    return found


DtypeChoice = Union[torch.dtype, Callable[[str], torch.dtype]]


def _placed(value: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """`value` on `device` in `dtype`: moved first, then cast, since a cast on a GPU is far
    faster than on the host (and a half weight crosses the bus once, in fp32, never twice)."""
    placed = value.to(device=device).to(dtype=dtype)
    source = value.untyped_storage()
    if placed.untyped_storage().data_ptr() == source.data_ptr() and not source.resizable():
        # a memory-mapped file's pages (a zip checkpoint's, already in place): the model would
        # change with the file, and crash if it were cut short; it gets its own copy
        placed = placed.clone()
    return placed


# Device types whose loads move the file's tensors in a background thread while the model is
# built (CUDA: host-to-device copies release the GIL, and building imports the text encoder's
# packages, seconds of Python); measured by scripts/gpu_speed.py's load probe.
STAGED_LOADS = {"cuda": True}


def _dtype_for(key: str, value: torch.Tensor, dtype: "DtypeChoice") -> torch.dtype:
    if not value.is_floating_point():
        return value.dtype
    return dtype(key) if callable(dtype) else dtype


class StagedStateDict(InBackground):
    """A file's tensors moved to `device` and their dtype by a thread started at once, so that
    the copies overlap whatever the caller does meanwhile (building the model on the meta
    device). Known extras, always-rebuilt keys and those matching `unread` (patterns of what
    the model will be built without, as far as the caller knows before building it: the VAE
    encoder, not a text tower's unread weights) are left where they are. `result()` waits for
    the thread (re-raising its error) and returns the state dict, its values replaced."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], device, dtype: "DtypeChoice",
                 unread=()):
        super().__init__(_place_all, state_dict, device, dtype, tuple(unread),
                         name="weights-to-device")


def _place_all(state: Dict[str, torch.Tensor], device, dtype: "DtypeChoice", unread):
    left = (*KNOWN_EXTRAS, *ALWAYS_REBUILT, *unread)
    for key in list(state):  # nobody else touches the dict until the result is asked for
        if not _matches(key, left):
            state[key] = _placed(state[key], device, _dtype_for(key, state[key], dtype))
    return state


def without_wrapper_prefix(state_dict: Dict[str, torch.Tensor], parts) -> Dict[str, torch.Tensor]:
    """A file whose every key carries extra leading components that the model's keys lack (a
    DataParallel `module.`, a trainer's `model.`): the same tensors under the model's names,
    with one warning line; any other file as it is. `parts`: the first components of the
    model's keys (`ldm.util.model_part_names`). Done before the weights are staged onto the
    device, whose dtype policy goes by those names."""
    def known(keys):  # the parts named, then the keys under them
        firsts = [key.split(".", 1)[0] for key in keys]
        return len(set(firsts) & set(parts)), sum(first in parts for first in firsts)

    # (a known extra saved beside the wrapper, e.g. a bare model_ema.decay, need not carry it)
    weights = [key for key in state_dict if not _matches(key, KNOWN_EXTRAS)] or list(state_dict)
    keys, prefix, best = weights, "", ("", known(weights))
    while keys and all("." in key for key in keys):
        firsts = {key.split(".", 1)[0] for key in keys}
        if len(firsts) != 1:
            break
        prefix += firsts.pop() + "."
        keys = [key[len(prefix):] for key in weights]
        if known(keys) > best[1]:
            best = (prefix, known(keys))
    if not best[0]:
        return state_dict
    renamed = {key[len(best[0]):] if key.startswith(best[0]) else key: value
               for key, value in state_dict.items()}
    if len(renamed) != len(state_dict):  # an extra's name is a stripped one's: leave it be
        return state_dict
    state_dict.clear()  # no tensor held under two names
    warn(f"checkpoint keys carry the prefix {best[0]!r}, which the model's lack: stripped")
    return renamed


def _mismatch(state_dict, expected, missing, wrong, rebuilt):
    """The CheckpointMismatch of a file that lacks weights or has others' shapes."""
    from ldm.checkpoint import CheckpointMismatch

    if missing:
        return CheckpointMismatch(describe_missing(
            missing, [k for k in expected if k not in rebuilt], state_dict))
    k = wrong[0]
    kind = IMAGE_CONDITIONED.get(state_dict[k].shape[1]) if k == UNET_INPUT else None
    if kind and wrong == [k]:
        return CheckpointMismatch(f"is {kind} model (its UNet takes {state_dict[k].shape[1]} "
                                  f"input channels): txt2img needs a text-to-image checkpoint",
                                  about_file=True)
    return CheckpointMismatch(f": {len(wrong)} tensors have other shapes, e.g. {k} is "
                              f"{tuple(state_dict[k].shape)}, the config wants "
                              f"{tuple(expected[k].shape)}")


def fit_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                   dtype: DtypeChoice = torch.float32, device="cpu") -> Dict[str, torch.Tensor]:
    """The tensors to load into `model` (built on the meta device) from a file's `state_dict`.

    Consumes `state_dict` tensor by tensor, so the file's tensors never exist twice over.
    Floating tensors become `dtype` (a dtype, or a callable key -> dtype such as
    ldm.precision.weight_dtype_policy), others the model's dtype. Raises CheckpointMismatch
    (one line) when a needed weight is missing or has another shape."""
    from ldm.checkpoint import CheckpointMismatch

    if is_sdxl_refiner(state_dict):  # no config here runs it
        state_dict.clear()
        raise CheckpointMismatch("is an SDXL refiner, which refines images (image-to-image) "
                                 "and cannot make them: use the SDXL base model", about_file=True)
    expected: Mapping[str, torch.Tensor] = model.state_dict()
    unread = unread_keys(model)
    state_dict = renamed(state_dict, expected, unread)
    unusable = _unusable(state_dict, expected, getattr(model, "parameterization", None))
    if unusable:
        state_dict.clear()
        raise CheckpointMismatch(unusable, about_file=True)
    rebuilt = rebuildable_buffers(model)
    missing = [k for k in expected if k not in state_dict and k not in rebuilt]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
             and not _matches(k, ALWAYS_REBUILT)]  # (never read: any shape does)
    if missing or wrong:
        error = _mismatch(state_dict, expected, missing, wrong, rebuilt)
        state_dict.clear()  # a refused file's tensors (on CUDA already staged there) go now
        raise error
    extras = (*KNOWN_EXTRAS, *unread)
    if _looks_v_predicting(model, state_dict):
        warn("the weights look like a v-prediction model (SD 2.x 768-v), but the config "
             "predicts eps, which makes noise: use configs/stable-diffusion/v2-inference-v.yaml")
    unknown = [k for k in state_dict if k not in expected and not _matches(k, extras)]
    baked = [k for k in unknown if k.split(".", 1)[0] in VAE_PARTS]
    if baked and any(k.startswith(VAE_PREFIX) for k in expected):
        # sd-webui-model-converter's "bake in VAE" wrote the new VAE without its prefix
        warn(f"checkpoint also carries a VAE without the first_stage_model. prefix ("
             f"{len(baked)} keys, a baked-in VAE?), ignored: the first_stage_model.* one "
             f"decodes; to decode with the other, save it as a file of its own and give it "
             f"with --vae")
        unknown = [k for k in unknown if k not in baked]
    if unknown:
        warn(f"checkpoint has {len(unknown)} keys this model does not use, ignored: "
             f"{_key_list(unknown)}")
    fitted = {}
    for key, target in expected.items():
        take_rebuilt = key in rebuilt and (
            key not in state_dict or _matches(key, ALWAYS_REBUILT)
            or _is_rounded_copy(state_dict[key], rebuilt[key]))
        value = rebuilt[key] if take_rebuilt else state_dict.pop(key)
        wanted = _dtype_for(key, target, dtype) if target.is_floating_point() else target.dtype
        fitted[key] = _placed(value, device, wanted)
        state_dict.pop(key, None)
    state_dict.clear()  # the extras: nothing of the file outlives the load
    return fitted


# What else a standalone VAE file carries (the training loss's discriminator and perceptual
# net, EMA buffers): dropped without a word.
VAE_EXTRAS = ("loss.*", "model_ema.*")
# Below this cosine between the file's encoder.conv_in and the checkpoint's own, the two VAEs
# are unrelated (fine-tunes such as ft-MSE keep the encoder; SD's and SDXL's were trained apart)
RELATED_ENCODERS = 0.5


def unet_weight(key: str) -> bool:
    """A whole model's UNet weight, never needed of a file given for its VAE (most of its
    bytes: load_state_dict(..., skip=unet_weight) does not read them)."""
    return key.startswith("model.diffusion_model.")


def vae_weights(vae: Dict[str, torch.Tensor], vae_name="the VAE file"):
    """(weights, family) of a standalone VAE file: its weights under the VAE's own names
    (`decoder.conv_in.weight`), as such files have them, under a whole model's
    `first_stage_model.` or a wrapper's prefix, or in diffusers' layout; the family a whole
    model's text towers tell ('an SD 1.x', ...; '' for a VAE alone). CheckpointError (one
    line) for a file that is no VAE."""
    from ldm.checkpoint import CheckpointError
    from ldm.diffusers_layout import is_diffusers_vae, vae_from_diffusers

    whole_model = {k for k in vae if k.startswith(VAE_PREFIX)}
    if whole_model:  # (or a VAE saved under that name)
        vae = {k[len(VAE_PREFIX):] if k in whole_model else k: v for k, v in vae.items()}
    else:
        vae = without_wrapper_prefix(vae, VAE_PARTS)
    if is_diffusers_vae(vae):
        vae = vae_from_diffusers(vae)
    weights = {k: v for k, v in vae.items() if k.split(".", 1)[0] in VAE_PARTS}
    if not any(k.startswith("decoder.") for k in weights):
        raise CheckpointError(f"{vae_name} is not a VAE: it has no decoder.* weights")
    others = [k for k in vae if k not in weights and not _matches(k, VAE_EXTRAS)]
    family = _family_of(others) if whole_model else ""
    if others and not family:
        warn(f"{vae_name} has {len(others)} keys no VAE uses, ignored: {_key_list(others)}")
    vae.clear()
    return weights, family


def with_vae(state_dict: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor],
             family: str = "", vae_name="the VAE file") -> Dict[str, torch.Tensor]:
    """The model file's tensors with each VAE part the VAE file has (`vae_weights`' answer)
    in place of the file's own; the parts it lacks (a decoder-only file's encoder) stay the
    model file's. The merged keys then meet the model's rules like any file's. The VAE of a
    whole model of another `family` is refused; one whose encoder is unrelated to the model
    file's own VAE gets one warning line (another family's latents?)."""
    from ldm.checkpoint import CheckpointError

    checkpoint_family = _family_of(state_dict)
    if family and checkpoint_family and family != checkpoint_family:
        raise CheckpointError(f"{vae_name} is the VAE of {family} model, and the checkpoint is "
                              f"{checkpoint_family} model: their latents differ")
    ours, theirs = state_dict.get(VAE_PREFIX + "encoder.conv_in.weight"), \
        weights.get("encoder.conv_in.weight")
    if ours is not None and theirs is not None and ours.shape == theirs.shape:
        cosine = float(torch.nn.functional.cosine_similarity(
            ours.double().flatten(), theirs.double().flatten(), dim=0))
        if cosine < RELATED_ENCODERS:
            warn(f"{vae_name}'s encoder is unrelated to the checkpoint's own VAE (cosine "
                 f"{cosine:.2f} of encoder.conv_in.weight): the VAE of another family? SD 1.x "
                 f"/ 2.x and SDXL latents differ, and images decode wrong")
    given = {k.split(".", 1)[0] for k in weights}
    merged = {k: v for k, v in state_dict.items()
              if not (k.startswith(VAE_PREFIX) and k[len(VAE_PREFIX):].split(".", 1)[0] in given)}
    merged.update((VAE_PREFIX + k, v) for k, v in weights.items())
    state_dict.clear()
    weights.clear()
    return merged


def _family_of(keys) -> str:
    """The family a file's FAMILY_MARKERS say ('an SD 1.x', ...; SD-Turbo's sgm layout is
    SD 2.x's), or ''."""
    return next((family.split(" (")[0] for marker, (family, _config) in FAMILY_MARKERS.items()
                 if any(k.startswith(marker) for k in keys)), "")
