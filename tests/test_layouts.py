"""Published checkpoint layouts load as they are on disk: tiny look-alikes of the real files
(their extras, missing buffers, dtypes and containers) give the main weights' numbers."""
import json

import numpy as np
import pytest
import torch

from conftest import (DIFFUSERS_VAE, REF, REPO, TINY_CKPT, TINY_CONFIG, rel_err,
                      sdxl_vector_err)
from ldm.checkpoint import CheckpointError, CheckpointMismatch, load_state_dict, save_safetensors
from ldm.pipeline import Pipeline

SD1 = REF / "tiny-sd1"
SD1_CONFIG, SD1_CKPT = SD1 / "tiny-sd15.yaml", SD1 / "tiny-sd15.ckpt"
XL_FILE = REF / "tiny-sdxl" / "tiny-sdxl.safetensors"
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
            "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def unet_error(pipe, case="tiny-sd15-unet-vanilla.npz"):
    ref = np.load(SD1 / case)
    with torch.no_grad():
        out = pipe.model.apply_model(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]),
                                     torch.from_numpy(ref["context"]))
    return rel_err(out, ref["out"])


def write(tmp_path, name, state, lightning=True):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_safetensors(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 0} if lightning else state, path)
    return path


def test_the_reference_file_carries_the_real_extras():
    state = load_state_dict(SD1_CKPT)
    assert {POSITION_IDS, "model_ema.decay", "model_ema.num_updates"} <= set(state)


def test_non_pruned_file_with_ema_copies_uses_the_main_weights(tmp_path, capsys):
    """v1-5-pruned.ckpt: `model_ema.` + the UNet key without `model.` and dots, for every UNet
    weight, with values other than the main ones."""
    state = load_state_dict(SD1_CKPT)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    for key in unet_keys:
        state["model_ema." + key[len("model."):].replace(".", "")] = state[key].float() + 1.0
    assert "model_ema.diffusion_modelinput_blocks00weight" in state
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "v1-5-pruned.ckpt", state))
    assert unet_error(pipe) <= 1e-4
    assert capsys.readouterr().err == ""  # known extras go without a word


def test_an_sd1_file_saved_by_older_comfyui_loads_silently(tmp_path, capsys):
    """ComfyUI saved SD 1.x text encoders with CLIP's projection and logit scale until it
    dropped them on saving: harmless extras (SD 1.x never projects)."""
    state = load_state_dict(SD1_CKPT)
    width = state["cond_stage_model.transformer.text_model.final_layer_norm.weight"].shape[0]
    state["cond_stage_model.transformer.text_projection.weight"] = torch.eye(width)
    state["cond_stage_model.logit_scale"] = torch.tensor(4.6052)
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "comfyui.safetensors", state))
    assert capsys.readouterr().err == ""
    assert unet_error(pipe) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_converted_file_without_schedule_or_position_ids(tmp_path, dtype):
    """Community conversions: safetensors, any float dtype, no schedule buffers, no position
    ids. The buffers are rebuilt from the config and equal the original file's."""
    original = load_state_dict(SD1_CKPT)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in original.items()
             if k not in SCHEDULE and k != POSITION_IDS and not k.startswith("model_ema.")}
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "converted.safetensors", state))
    model = pipe.model
    for name in SCHEDULE:
        assert torch.allclose(getattr(model, name), original[name].float(), rtol=1e-6, atol=0)
    assert torch.equal(model.cond_stage_model.transformer.text_model.embeddings.position_ids,
                       torch.arange(77)[None])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the reference's weights are exactly fp16 values; bf16 keeps 8 bits of them (4.8e-3)
    assert unet_error(pipe) <= (1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_damaged_float_position_ids_are_rebuilt(tmp_path):
    state = load_state_dict(SD1_CKPT)
    # rounding damage: cast to int64 as they stand, the ids would be 0, 0, 1, ..., 75
    state[POSITION_IDS] = torch.arange(77, dtype=torch.float32)[None] - 0.001
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "damaged.ckpt", state, lightning=False))
    ids = pipe.model.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    ref = np.load(SD1 / "tiny-sd15-cond-basic.npz")
    cond = pipe.model.get_learned_conditioning(["a photograph of an astronaut riding a horse", ""])
    assert rel_err(cond, ref["cond"]) <= 1e-4


def test_sd21_file_with_ema_buffers_loads(tmp_path, capsys):
    """v2-1_512-ema-pruned.ckpt: the model's keys plus model_ema.decay / num_updates."""
    state = load_state_dict(TINY_CKPT)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    path = write(tmp_path, "v2-1_512-ema-pruned.ckpt", state)
    pipe = Pipeline.load(TINY_CONFIG, path)
    ref = np.load(REF / "tiny" / "tiny-sd21-unet-vanilla.npz")
    with torch.no_grad():
        out = pipe.model.apply_model(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]),
                                     torch.from_numpy(ref["context"]))
    assert rel_err(out, ref["out"]) <= 1e-4
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("prefix", ["module.", "module.model."])
def test_a_wrapper_prefix_on_every_key_is_stripped(tmp_path, capsys, prefix):
    """Files saved from a DataParallel or trainer wrapper: every key carries `module.` (and
    more) that the model's keys lack. They load, with one line that says so."""
    state = {prefix + key: value for key, value in load_state_dict(SD1_CKPT).items()}
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "wrapped.ckpt", state, lightning=False))
    assert unet_error(pipe) <= 1e-4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: checkpoint keys carry the prefix {prefix!r}, which the model's "
                   "lack: stripped"]


def test_a_unet_saved_compiled_loads(tmp_path, capsys):
    """A trainer that saved a torch.compile'd UNet: `_orig_mod.` inside its keys, where the
    compiled module sat; no prefix common to every key, so it is dropped where it is."""
    state = load_state_dict(SD1_CKPT)
    unet = "model.diffusion_model."
    compiled = {(unet + "_orig_mod." + k[len(unet):] if k.startswith(unet) else k): v
                for k, v in state.items()}
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "compiled.ckpt", compiled))
    assert capsys.readouterr().err == ""
    assert unet_error(pipe) <= 1e-4


def test_a_prefix_is_stripped_though_a_known_extra_lacks_it(tmp_path, capsys):
    """A wrapper's file with its training extras saved bare beside its weights
    (model_ema.decay, model_ema.num_updates)."""
    state = {("" if key.startswith("model_ema.") else "module.") + key: value
             for key, value in load_state_dict(SD1_CKPT).items()}
    assert "model_ema.decay" in state
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "wrapped.ckpt", state, lightning=False))
    assert unet_error(pipe) <= 1e-4
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: checkpoint keys carry the prefix 'module.', which the model's lack: stripped"]


def test_a_prefix_is_stripped_before_the_weights_are_staged(tmp_path, monkeypatch, capsys):
    """On CUDA the weights are staged in their final dtypes, chosen by name (half for the UNet
    and text encoder, fp32 for the VAE and the schedule): a prefixed file must be named right
    before that, or its VAE would pass through fp16. The CUDA policy, staged, on the CPU."""
    from ldm import precision

    monkeypatch.setitem(precision.HALF_WEIGHTS, "cpu", torch.float16)
    state = load_state_dict(SD1_CKPT)
    state["first_stage_model.decoder.conv_in.bias"] += 1e-3  # not an fp16 value any more
    plain = write(tmp_path, "plain.ckpt", state, lightning=False)
    wrapped = write(tmp_path, "wrapped.ckpt", {"module." + k: v for k, v in state.items()},
                    lightning=False)
    loaded = [Pipeline.load(SD1_CONFIG, path, precision="autocast", staged_load=True).model
              for path in (plain, wrapped)]
    for name in ("first_stage_model.decoder.conv_in.bias", "alphas_cumprod"):
        a, b = (dict(m.named_parameters(), **dict(m.named_buffers()))[name] for m in loaded)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    assert "stripped" in capsys.readouterr().err


def test_a_file_with_its_optimizer_state_loads(tmp_path):
    """{"model": weights, "optimizer": state, "step": n}, as many trainers save: the weights
    are found (an optimizer's state is keyed by parameter index, not by module path)."""
    sd = load_state_dict(SD1_CKPT)
    path = tmp_path / "trainer.ckpt"
    torch.save({"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                           "param_groups": [{"lr": 1e-4}]},
                "step": torch.tensor(10)}, path)
    assert unet_error(Pipeline.load(SD1_CONFIG, path)) <= 1e-4


@pytest.mark.parametrize("wrap", [lambda sd: {"model": sd},
                                  lambda sd: {"module": {"state_dict": sd}},
                                  lambda sd: {"state_dict": {"state_dict": sd}, "epoch": 3}],
                         ids=["model", "module-state_dict", "state_dict-twice"])
def test_weights_nested_under_another_key_load(tmp_path, capsys, wrap):
    path = tmp_path / "nested.ckpt"
    torch.save(wrap(load_state_dict(SD1_CKPT)), path)
    assert unet_error(Pipeline.load(SD1_CONFIG, path)) <= 1e-4
    assert capsys.readouterr().err == ""


def test_odd_shaped_position_ids_are_rebuilt_not_refused(tmp_path):
    """They are never read (always rebuilt): a file storing them flat, or longer, loads."""
    for ids in (torch.arange(77), torch.arange(512)[None]):
        state = load_state_dict(SD1_CKPT)
        state[POSITION_IDS] = ids
        pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "ids.ckpt", state, lightning=False))
        embeddings = pipe.model.cond_stage_model.transformer.text_model.embeddings
        assert torch.equal(embeddings.position_ids, torch.arange(77)[None])
        assert unet_error(pipe) <= 1e-4


def test_a_loaded_model_is_independent_of_its_memory_mapped_file(tmp_path):
    """An fp32 zip checkpoint on the CPU needs no cast: without a copy its weights would be the
    mapped file's pages, changed by a rewrite of the file (and a crash if it is cut short)."""
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in load_state_dict(TINY_CKPT).items()}
    path = write(tmp_path, "fp32.ckpt", state)
    pipe = Pipeline.load(TINY_CONFIG, path, precision="full")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    with open(path, "r+b") as fh:  # rewritten in place, as `cp other.ckpt` does
        fh.write(bytes(path.stat().st_size))
    after = pipe.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_file_of_several_state_dicts_or_meta_tensors_is_named_so(tmp_path):
    state = load_state_dict(SD1_CKPT)
    torch.save({"model": state, "ema": state}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match="holds several state dicts \\('model', 'ema'\\): "
                                              "save the one to use alone"):
        Pipeline.load(SD1_CONFIG, tmp_path / "two.ckpt")
    torch.save({k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                for k, v in state.items()}, tmp_path / "meta.ckpt")
    with pytest.raises(CheckpointError, match=f"holds {len(state)} tensors without data "
                                              "\\(meta tensors\\)"):
        Pipeline.load(SD1_CONFIG, tmp_path / "meta.ckpt")


def test_a_file_without_its_vae_is_refused_naming_the_part(tmp_path):
    """Some community files ship without their VAE: refused, and the line says so."""
    from ldm.checkpoint import CheckpointError

    state = {k: v for k, v in load_state_dict(SD1_CKPT).items()
             if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError) as error:
        Pipeline.load(SD1_CONFIG, write(tmp_path, "no-vae.ckpt", state))
    assert str(error.value).endswith(": the file has none of the VAE (first_stage_model.*): "
                                     "give a VAE file (txt2img --vae, Pipeline.load(vae_path=))")


def _vae_file(tmp_path, name="vae.safetensors", shift=0.0, prefix="", extras=()):
    """The tiny SD 1.x model's VAE as a standalone file (as vae-ft-mse-840000-ema-pruned
    holds one: encoder, decoder, quant convs), its decoder's output bias moved by `shift`."""
    state = load_state_dict(SD1_CKPT)
    vae = {prefix + k[len("first_stage_model."):]: v.float() for k, v in state.items()
           if k.startswith("first_stage_model.")}  # (fp32, as such files are: exact shifts)
    vae[prefix + "decoder.conv_out.bias"] += shift
    vae.update((prefix + key, torch.zeros(2)) for key in extras)
    return write(tmp_path, name, vae, lightning=name.endswith(".ckpt"))


def _decoded(pipe):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return pipe.model.decode_first_stage(z)


@pytest.fixture(scope="module")
def sd1_own():
    return Pipeline.load(SD1_CONFIG, SD1_CKPT)


@pytest.mark.parametrize("prefix, load", [
    ("", {}), ("first_stage_model.", {}),
    ("module.", {"staged_load": True, "vae_encoder": False})])  # (txt2img's load on CUDA)
def test_a_vae_file_replaces_the_models_own(tmp_path, capsys, prefix, load, sd1_own):
    """vae_path (txt2img --vae): a standalone VAE file's weights replace the checkpoint's own,
    in any container, under a whole model's prefix or a wrapper's; its training extras (loss.*,
    EMA buffers) go without a word; a file without its VAE loads with one."""
    own = sd1_own
    vae = _vae_file(tmp_path, "vae.ckpt", shift=0.5, prefix=prefix,
                    extras=("loss.logvar", "loss.discriminator.main.0.weight",
                            "model_ema.decay", "model_ema.num_updates"))
    swapped = Pipeline.load(SD1_CONFIG, SD1_CKPT, vae_path=vae, **load)
    err = capsys.readouterr().err
    assert err == ("warning: checkpoint keys carry the prefix 'module.', which the model's "
                   "lack: stripped\n" if prefix == "module." else "")
    assert swapped.vae_path == vae
    assert torch.allclose(_decoded(swapped), _decoded(own) + 0.5, atol=1e-5)  # (the shift)
    assert unet_error(swapped) <= 1e-4  # the rest is the checkpoint's


def test_a_file_without_its_vae_loads_with_a_vae_file(tmp_path, sd1_own):
    state = {k: v for k, v in load_state_dict(SD1_CKPT).items()
             if not k.startswith("first_stage_model.")}
    without = write(tmp_path, "no-vae.ckpt", state)
    same = _vae_file(tmp_path, "same.safetensors")
    assert torch.equal(_decoded(Pipeline.load(SD1_CONFIG, without, vae_path=same)),
                       _decoded(sd1_own))


def test_a_decoder_only_vae_file_keeps_the_checkpoints_encoder(tmp_path, sd1_own):
    own = sd1_own
    vae = load_state_dict(_vae_file(tmp_path, shift=0.5))
    decoder_only = {k: v for k, v in vae.items() if k.startswith(("decoder.", "post_quant"))}
    path = write(tmp_path, "decoder.safetensors", decoder_only)
    swapped = Pipeline.load(SD1_CONFIG, SD1_CKPT, vae_path=path)
    assert torch.allclose(_decoded(swapped), _decoded(own) + 0.5, atol=1e-5)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(swapped.model.encode_first_stage(image),
                           own.model.encode_first_stage(image))


def test_another_familys_vae_is_refused_or_warned(tmp_path, capsys):
    """SD 1.x / 2.x and SDXL VAEs have the same keys and shapes but not the same latents. A
    whole model's VAE says its family by its text towers: refused. A VAE alone whose encoder
    is unrelated to the checkpoint's own (fine-tunes such as ft-MSE keep the encoder): one
    warning line. The tiny SD 1.x and SDXL VAEs are random, hence unrelated."""
    from ldm.checkpoint import CheckpointError
    xl = REF / "tiny-sdxl" / "tiny-sdxl.yaml"
    with pytest.raises(CheckpointError, match=r"VAE file .*tiny-sd15\.ckpt is the VAE of an SD "
                                              r"1\.x model, and the checkpoint is an SDXL model"):
        Pipeline.load(xl, XL_FILE, vae_path=SD1_CKPT)
    Pipeline.load(xl, XL_FILE, vae_path=_vae_file(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: VAE file ") and \
        "encoder is unrelated to the checkpoint's own VAE (cosine " in err[0]
    Pipeline.load(SD1_CONFIG, SD1_CKPT, vae_path=SD1_CKPT)  # its own family: taken, silently
    Pipeline.load(xl, XL_FILE, vae_path=XL_FILE)  # (a .safetensors: its UNet left unread)
    assert capsys.readouterr().err == ""


# diffusers' names before 0.17 (the VAE files the hub holds from 2022 to mid-2023)
OLD_DIFFUSERS_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value",
                           "to_out.0": "proj_attn"}


def _old_diffusers_names(vae):
    out = {}
    for key, value in vae.items():
        head, _, tail = key.partition(".attentions.0.")
        layer, _, kind = tail.rpartition(".")
        out[f"{head}.attentions.0.{OLD_DIFFUSERS_ATTENTION.get(layer, layer)}.{kind}"
            if tail else key] = value
    return out


@pytest.mark.parametrize("given", ["file", "file-before-0.17", "folder", "pipeline-folder",
                                   "bin-fp16-folder"])
def test_a_diffusers_vae_file_or_folder_loads(tmp_path, tiny_pipe, given):
    """A VAE in diffusers' layout, as diffusers' own converter wrote the tiny model's
    (tests/data/diffusers/make.py), given to a checkpoint without a VAE: it encodes and
    decodes as the checkpoint's own VAE. Under diffusers' names before 0.17 too; given as a
    VAE folder (its file by preference: .safetensors before .bin, each full precision before
    fp16) or a pipeline's."""
    state = {k: v for k, v in load_state_dict(TINY_CKPT).items()
             if not k.startswith("first_stage_model.")}
    without = write(tmp_path, "no-vae.ckpt", state)
    vae = load_state_dict(DIFFUSERS_VAE)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in vae  # (diffusers' layout)
    if given == "file-before-0.17":
        vae = _old_diffusers_names(vae)
        assert "decoder.mid_block.attentions.0.proj_attn.weight" in vae
    folder = tmp_path / "sd-vae"
    if given == "pipeline-folder":
        folder = tmp_path / "stable-diffusion"
        (folder / "unet").mkdir(parents=True)
        write(folder / "unet", "diffusion_pytorch_model.safetensors", {"x": torch.zeros(1)})
        (folder / "vae").mkdir()
        path = write(folder / "vae", "diffusion_pytorch_model.safetensors", vae)
    elif given == "bin-fp16-folder":  # (no .safetensors: a .bin; full precision first)
        folder.mkdir()
        write(folder, "diffusion_pytorch_model.fp16.bin", {"x": torch.zeros(1)}, lightning=False)
        path = write(folder, "diffusion_pytorch_model.bin", vae, lightning=False)
    else:
        folder.mkdir()
        path = write(folder, "diffusion_pytorch_model.safetensors", vae)
    pipe = Pipeline.load(TINY_CONFIG, without, vae_path=path if "file" in given else folder)
    assert pipe.vae_path == path
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pipe.model.decode_first_stage(z), tiny_pipe.model.decode_first_stage(z))
        assert torch.equal(pipe.model.encode_first_stage(image),
                           tiny_pipe.model.encode_first_stage(image))


@pytest.mark.parametrize("manifest", ["sd21-v2-inference.keys.json", "sdxl-base.keys.json"])
def test_the_full_size_diffusers_vae_names_are_ours(manifest):
    """Every key of the full-size VAE as diffusers' AutoencoderKL holds it
    (tests/data/diffusers/sd-vae.keys.json) is a key of the real files' VAE, of the same
    shape up to trailing 1s (the attention's Linear weights), and none is left out."""
    from ldm.diffusers_layout import vae_from_diffusers
    from ldm.layouts import VAE_PREFIX, _trailing_ones_dropped
    theirs = json.loads((DIFFUSERS_VAE.parent / "sd-vae.keys.json").read_text())
    ours = {k[len(VAE_PREFIX):]: shape for k, shape in
            json.loads((REF / manifest).read_text()).items() if k.startswith(VAE_PREFIX)}
    named = vae_from_diffusers(theirs)
    assert len(named) == len(theirs) == len(ours) == 248 and set(named) == set(ours)
    assert all(_trailing_ones_dropped(named[k]) == _trailing_ones_dropped(ours[k]) for k in ours)


def test_a_vae_file_that_is_none_is_refused_naming_it(tmp_path):
    from ldm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"VAE folder .* holds no VAE weights file "
                                              r"\(diffusion_pytorch_model\.safetensors"):
        Pipeline.load(SD1_CONFIG, SD1_CKPT, vae_path=tmp_path)
    with pytest.raises(CheckpointError, match=r"VAE file .*model\.ckpt is not a VAE: it has no "
                                              r"decoder\.\* weights"):
        Pipeline.load(SD1_CONFIG, SD1_CKPT,
                      vae_path=write(tmp_path, "model.ckpt", {"encoder.x": torch.ones(1)}))
    vae = load_state_dict(_vae_file(tmp_path))
    del vae["decoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match=r"with VAE .*broken\.safetensors does not fit .*"
                                              r"1 missing key .*decoder\.conv_in\.weight"):
        Pipeline.load(SD1_CONFIG, SD1_CKPT, vae_path=write(tmp_path, "broken.safetensors", vae))


def test_unknown_extras_load_with_one_warning_line(tmp_path, capsys):
    state = load_state_dict(SD1_CKPT)
    extras = [f"lora_unet_down.{i}.alpha" for i in range(7)]
    state.update({k: torch.ones(1) for k in extras})
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "with-extras.ckpt", state))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "7 keys" in err[0]
    assert "lora_unet_down.0.alpha" in err[0] and "and 2 more" in err[0]
    assert unet_error(pipe) <= 1e-4


def test_missing_weight_is_refused_with_its_name(tmp_path):
    state = load_state_dict(SD1_CKPT)
    del state["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    with pytest.raises(CheckpointError, match="1 missing key.*final_layer_norm.weight"):
        Pipeline.load(SD1_CONFIG, write(tmp_path, "broken.ckpt", state))



def test_staged_load_gives_the_same_model(tiny_pipe):
    """Weights copied by a background thread while the model is built (CUDA's default; forced
    here on the CPU) load exactly as the plain load does."""
    staged = Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu", staged_load=True)
    ours, plain = staged.model.state_dict(), tiny_pipe.model.state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_staging_leaves_extras_and_hands_over_its_error():
    from ldm.layouts import StagedStateDict

    ema, weight = torch.tensor(0.9999), torch.ones(2, dtype=torch.float64)
    state = StagedStateDict({"model_ema.decay": ema, "w": weight}, "cpu", torch.float32).result()
    assert state["model_ema.decay"] is ema and state["w"].dtype == torch.float32
    state = StagedStateDict({"vae.encoder.w": weight, "w": weight}, "cpu", torch.float32,
                            unread=["vae.encoder.*"]).result()
    assert state["vae.encoder.w"] is weight and state["w"].dtype == torch.float32

    def no_dtype(key):
        raise ValueError(f"no dtype for {key}")
    with pytest.raises(ValueError, match="no dtype for w"):
        StagedStateDict({"w": weight}, "cpu", no_dtype).result()


def test_a_768_v_file_loads_with_the_v_config(tmp_path):
    """v2-1_768-ema-pruned.ckpt has the base file's layout; of its config (v2-inference-v.yaml)
    what the weights' reading depends on is `parameterization: v`, which the loaded model
    follows: its output is v, x0 = sqrt(a) x - sqrt(1 - a) v."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.parameterization = "v"
    path = tmp_path / "tiny-sd21-v.yaml"
    OmegaConf.save(config, path)
    pipe = Pipeline.load(path, TINY_CKPT)
    assert pipe.model.parameterization == "v"
    ref = np.load(REF / "tiny" / "tiny-sd21-unet-vanilla.npz")
    with torch.no_grad():  # the network is the same; only the meaning of its output differs
        out = pipe.model.apply_model(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]),
                                     torch.from_numpy(ref["context"]))
    assert rel_err(out, ref["out"]) <= 1e-4
    x, a = torch.from_numpy(ref["x"]), torch.tensor(0.3)
    x0 = pipe.model.split_prediction(x, out, a).x0
    assert torch.allclose(x0, a.sqrt() * x - (1 - a).sqrt() * out, atol=1e-6)


def test_a_v_prediction_file_under_the_eps_config_is_warned(tmp_path, capsys):
    """The 768-v file with v2-inference.yaml (the seed's config) makes noise; nothing in the
    file says v, but v training widens one norm bias's spread (ComfyUI's test, std > 0.09).
    One warning under the eps config, none under the v one or for the base-like tiny file."""
    from omegaconf import OmegaConf

    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    threshold = 0.09  # (ComfyUI's)
    assert key in json.loads((REF / "sd21-v2-inference.keys.json").read_text())
    state = load_state_dict(TINY_CKPT)
    bias = state[key].float()
    spread = float(bias.std(unbiased=False))
    assert spread < threshold  # (the tiny file: eps-like)
    # just under the threshold, as ComfyUI computes the spread (the sample std is above it)
    state[key] = bias * (0.9995 * threshold / spread)
    assert float(state[key].std()) > threshold
    Pipeline.load(TINY_CONFIG, write(tmp_path, "v2-1_512-base-like.ckpt", state))
    assert capsys.readouterr().err == ""
    state[key] = bias * (1.0005 * threshold / spread)
    path = write(tmp_path, "v2-1_768-ema-pruned.ckpt", state)
    Pipeline.load(TINY_CONFIG, path)
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: the weights look like a v-prediction model (SD 2.x 768-v), but the config "
        "predicts eps, which makes noise: use configs/stable-diffusion/v2-inference-v.yaml"]
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.parameterization = "v"
    OmegaConf.save(config, tmp_path / "tiny-v.yaml")
    Pipeline.load(tmp_path / "tiny-v.yaml", path)
    Pipeline.load(TINY_CONFIG, TINY_CKPT)
    assert capsys.readouterr().err == ""


def test_an_sdxl_file_without_sigmas_or_position_ids_loads(tmp_path, capsys):
    """Newer SDXL conversions drop denoiser.sigmas and the CLIP position ids: both follow from
    the config; the conditioning is the reference's."""
    xl = REF / "tiny-sdxl"
    state = {k: v for k, v in load_state_dict(xl / "tiny-sdxl.safetensors").items()
             if k != "denoiser.sigmas" and not k.endswith("position_ids")}
    pipe = Pipeline.load(xl / "tiny-sdxl.yaml", write(tmp_path, "converted.safetensors", state))
    assert capsys.readouterr().err == ""
    assert _sdxl_conditioning_errors(pipe) == (True, True)


def _sdxl_conditioning_errors(pipe):
    """(context within 1e-4 of the reference, pooled and size vector within its bounds)."""
    xl = REF / "tiny-sdxl"
    files = json.loads((xl / "cases.json").read_text())["files"]
    name, case = next((n, c) for n, c in files.items() if c["kind"] == "cond")
    ref = np.load(xl / name)
    size = (case["H"], case["W"])
    with torch.no_grad():
        cond = pipe.model.get_conditioning(case["prompts"], size)
    text_err, size_err = sdxl_vector_err(cond.vector, ref["vector"], size)
    return rel_err(cond.context, ref["crossattn"]) <= 1e-4, text_err <= 1e-4 and size_err <= 1


def test_an_sdxl_file_with_its_projection_saved_as_a_linear_weight_loads(tmp_path, capsys):
    """diffusers' SDXL conversion (before it transposed) and other tools save the big tower's
    text_projection as CLIPTextModelWithProjection's Linear: `text_projection.weight`, the
    transpose, square like the parameter; without logit_scale. Taken transposed, silently."""
    xl = REF / "tiny-sdxl"
    tower = "conditioner.embedders.1.model."
    state = load_state_dict(xl / "tiny-sdxl.safetensors")
    projection = state.pop(tower + "text_projection")
    assert projection.shape[0] == projection.shape[1]  # (as the real one: only names tell)
    state[tower + "text_projection.weight"] = projection.t().contiguous()
    del state[tower + "logit_scale"]
    pipe = Pipeline.load(xl / "tiny-sdxl.yaml", write(tmp_path, "linear.safetensors", state))
    assert capsys.readouterr().err == ""
    assert _sdxl_conditioning_errors(pipe) == (True, True)
    assert torch.equal(pipe.model.cond_model.embedders[1].model.text_projection,
                       projection.float())


@pytest.mark.parametrize("config, ckpt, stored", [
    ("v2-inference.yaml", TINY_CKPT, "alphas_cumprod"),
    ("v1-inference.yaml", SD1_CKPT, "alphas_cumprod"),
    ("sd_xl_base.yaml", REF / "tiny-sdxl" / "tiny-sdxl.safetensors", "denoiser.sigmas")])
def test_each_shipped_config_names_the_schedule_the_published_files_carry(config, ckpt, stored):
    """What a config's model class reads from its params (benchmarks build a bare UNet from it)
    is the schedule in the published code's files: LDM's alphas_cumprod, sgm's sigmas
    sqrt((1 - a) / a)."""
    from ldm.models.diffusion.ddpm import schedule_buffers
    from ldm.util import get_obj_from_str, load_config

    model = load_config(REPO / "configs" / "stable-diffusion" / config).model
    args = get_obj_from_str(model.target).schedule_arguments(model.params)
    acp = schedule_buffers(**args)["alphas_cumprod"].double()
    got = acp if stored == "alphas_cumprod" else ((1 - acp) / acp).sqrt()
    # sigmas come from float32 alphas_cumprod here: 1 - a loses digits where a is near 1
    rtol = 1e-6 if stored == "alphas_cumprod" else 2e-5
    assert torch.allclose(got, load_state_dict(ckpt)[stored].double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "fp16 then bf16"])
def test_a_half_precision_files_rounded_schedule_gives_way_to_the_exact_one(tmp_path, dtype):
    """All-half files round the schedule buffers too (in bf16 alphas_cumprod starts at exactly
    1: every latent NaN); the config's exact schedule is used instead, on either load path."""
    from ldm.pipeline import GenerationOptions

    original = load_state_dict(SD1_CKPT)
    cast = (lambda v: v.half().bfloat16()) if dtype == "fp16 then bf16" else \
        (lambda v: v.to(dtype))
    state = {k: (cast(v) if v.is_floating_point() else v) for k, v in original.items()}
    if dtype != torch.float16:
        assert state["alphas_cumprod"][:2].float().eq(1).all()  # the damage, as on disk
    path = write(tmp_path, "half.safetensors", state)
    for staged in (False, True):
        pipe = Pipeline.load(SD1_CONFIG, path, staged_load=staged)
        for name in SCHEDULE:
            assert torch.allclose(getattr(pipe.model, name), original[name].float(), rtol=1e-6,
                                  atol=0), name
    opts = GenerationOptions(H=64, W=64, steps=2, precision="full")
    assert torch.isfinite(pipe.generate(["a cat"], opts, progress=False).latents).all()


def test_a_schedule_of_its_own_in_full_precision_is_kept(tmp_path):
    """Only rounded copies give way: a file whose fp32 schedule differs is taken as it is."""
    state = load_state_dict(SD1_CKPT)
    state["betas"] = state["betas"] * 1.01
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "own.ckpt", state))
    assert torch.equal(pipe.model.betas, state["betas"].float())


def _conditioning(pipe):
    with torch.no_grad():
        return pipe.model.get_learned_conditioning(["a red cube on a table"])


def test_an_sd1_file_saved_by_transformers_3_loads(tmp_path):
    """CLIPTextModel without `text_model.` in its keys (community SD 1.x files): renamed."""
    state = load_state_dict(SD1_CKPT)
    inner = "cond_stage_model.transformer.text_model."
    old = {("cond_stage_model.transformer." + k[len(inner):] if k.startswith(inner) else k): v
           for k, v in state.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "old.ckpt", old))
    assert unet_error(pipe) <= 1e-4
    assert torch.equal(_conditioning(pipe), _conditioning(Pipeline.load(SD1_CONFIG, SD1_CKPT)))


def test_an_sdxl_file_with_flat_clip_names_loads(tmp_path, capsys):
    """SDXL's CLIP tower without `text_model.` (transformers' flat names, as for SD 1.x)."""
    state = load_state_dict(XL_FILE)
    inner = "conditioner.embedders.0.transformer.text_model."
    flat = {("conditioner.embedders.0.transformer." + k[len(inner):] if k.startswith(inner)
             else k): v for k, v in state.items()}
    assert "conditioner.embedders.0.transformer.encoder.layers.0.mlp.fc1.weight" in flat
    pipe = Pipeline.load(REF / "tiny-sdxl" / "tiny-sdxl.yaml", write(tmp_path, "flat.safetensors",
                                                                     flat))
    assert capsys.readouterr().err == ""
    assert _sdxl_conditioning_errors(pipe) == (True, True)


def test_an_sd2_file_in_sgm_layout_loads(tmp_path, capsys):
    """SD-Turbo's layout: the OpenCLIP tower as sgm's conditioner.embedders.0."""
    state = load_state_dict(TINY_CKPT)
    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model.", 1): v
           for k, v in state.items()}
    pipe = Pipeline.load(TINY_CONFIG, write(tmp_path, "turbo.safetensors", sgm))
    assert torch.equal(_conditioning(pipe), _conditioning(Pipeline.load(TINY_CONFIG, TINY_CKPT)))
    assert capsys.readouterr().err == ""


def test_an_sd2_file_converted_back_from_diffusers_loads(tmp_path, capsys):
    """diffusers' convert_diffusers_to_original_stable_diffusion.py on an SD 2.x model: its text
    encoder (one block short: the penultimate layer is its last) comes back without the last
    block, text_projection and logit_scale, none of which SD 2.x reads, and with transformers'
    position ids; no schedule buffers. It loads silently and conditions as the full file."""
    state = load_state_dict(TINY_CKPT)
    tower = "cond_stage_model.model."
    last_block = tower + "transformer.resblocks.2."  # the tiny tower has 3
    dropped = [k for k in state if k.startswith(last_block) or k in SCHEDULE
               or k in (tower + "text_projection", tower + "logit_scale")]
    assert len(dropped) == 12 + 2 + len(SCHEDULE)
    converted = {k: v.half() if v.is_floating_point() else v for k, v in state.items()
                 if k not in dropped}
    converted[tower + "transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    pipe = Pipeline.load(TINY_CONFIG, write(tmp_path, "converted.ckpt", converted))
    assert capsys.readouterr().err == ""
    full = Pipeline.load(TINY_CONFIG, TINY_CKPT)
    assert torch.equal(_conditioning(pipe), _conditioning(full))
    assert len(pipe.model.cond_stage_model.model.transformer.resblocks) == 2  # (not held)
    # a block the tower reads is still asked for by name
    del converted[tower + "transformer.resblocks.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointMismatch, match=r"1 missing key .*resblocks\.1\.mlp\.c_fc"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "broken.ckpt", converted))


@pytest.mark.parametrize("era", ["diffusers-names-2d", "3d-biases"])
@pytest.mark.parametrize("vae_encoder", [True, False])
def test_a_vae_attention_converted_back_from_diffusers_loads(tmp_path, capsys, tiny_pipe, era,
                                                              vae_encoder):
    """diffusers' SD 1.x / 2.x back-conversion passed the VAE's mid attention through under
    diffusers >= 0.17's names (to_q, to_k, to_v, to_out.0) as Linear weights [C, C] in
    mid-2023; its fix of December 2023 wrote the biases as [C, 1, 1] until February 2024. Both
    load silently and decode as the file they came from."""
    state = load_state_dict(TINY_CKPT)
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    converted = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".mid.attn_1.")
        layer, _, kind = tail.partition(".")
        if not head or layer not in names:
            converted[key] = value
        elif era == "3d-biases":
            converted[key] = value.reshape(-1, 1, 1) if kind == "bias" else value
        else:
            converted[f"{head}.mid.attn_1.{names[layer]}.{kind}"] = value.flatten(1) \
                if kind == "weight" else value
    sample = "first_stage_model.decoder.mid.attn_1." + (
        "to_q.weight" if era == "diffusers-names-2d" else "q.bias")
    assert len(converted) == len(state) and converted[sample].dim() in (2, 3)
    pipe = Pipeline.load(TINY_CONFIG, write(tmp_path, "vae.ckpt", converted),
                         vae_encoder=vae_encoder)
    assert capsys.readouterr().err == ""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pipe.model.decode_first_stage(z), tiny_pipe.model.decode_first_stage(z))
        if vae_encoder:
            image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
            assert torch.equal(pipe.model.encode_first_stage(image),
                               tiny_pipe.model.encode_first_stage(image))


def test_a_weight_of_another_shape_is_reshaped_only_where_the_table_says(tmp_path):
    """RESHAPED is narrow: a UNet 1x1 conv given as [C, C] is still another model's shape."""
    state = load_state_dict(TINY_CKPT)
    key = next(k for k, v in state.items()
               if k.startswith("model.diffusion_model.") and v.dim() == 4 and v.shape[-1] == 1)
    state[key] = state[key].flatten(1)
    with pytest.raises(CheckpointMismatch, match="other shapes, e.g. " + key.replace(".", r"\.")):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "odd.ckpt", state))


def test_a_baked_in_vae_without_its_prefix_is_named(tmp_path, capsys, sd1_own):
    """sd-webui-model-converter's "bake in VAE" added the new VAE's keys without the
    first_stage_model. prefix, beside the old VAE: the prefixed one decodes (as A1111 loads
    it), and one warning line says what the other keys are."""
    state = load_state_dict(SD1_CKPT)
    state.update((k[len("first_stage_model."):], v.float() + 1) for k, v in list(state.items())
                 if k.startswith("first_stage_model."))
    pipe = Pipeline.load(SD1_CONFIG, write(tmp_path, "baked.safetensors", state))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "warning: checkpoint also carries a VAE without the first_stage_model. prefix (")
    assert torch.equal(_decoded(pipe), _decoded(sd1_own))


def test_a_decoding_only_load_goes_without_the_vae_encoder(tmp_path, capsys, tiny_pipe,
                                                            monkeypatch):
    """vae_encoder=False (txt2img's load): no encoder weights are held (nor staged onto the
    device), a file's are dropped without a word, the decode is the same, and encoding says
    why it cannot; a file without the encoder loads so, and is refused by name otherwise."""
    import ldm.layouts

    lean = Pipeline.load(TINY_CONFIG, TINY_CKPT, vae_encoder=False)
    placed, place = [], ldm.layouts._placed
    monkeypatch.setattr(ldm.layouts, "_placed",
                        lambda value, *args: placed.append(value.shape) or place(value, *args))
    staged = Pipeline.load(TINY_CONFIG, TINY_CKPT, vae_encoder=False, staged_load=True)
    monkeypatch.undo()
    # each weight staged, then fitted; of the rest only the text tower's 14 unread ones
    # (its last block, projection and logit scale) were staged, as the model was built
    assert len(placed) == 2 * len(staged.model.state_dict()) + 14
    assert capsys.readouterr().err == ""
    assert all(torch.equal(a, b) for a, b in zip(lean.model.state_dict().values(),
                                                   staged.model.state_dict().values()))
    vae = lean.model.first_stage_model
    assert not hasattr(vae, "encoder") and not hasattr(vae, "quant_conv")
    full = {k for k in tiny_pipe.model.state_dict() if k.startswith("first_stage_model.")}
    held = {k for k in lean.model.state_dict() if k.startswith("first_stage_model.")}
    assert full - held == {k for k in full if k.startswith(("first_stage_model.encoder.",
                                                            "first_stage_model.quant_conv."))}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lean.model.decode_first_stage(z), tiny_pipe.model.decode_first_stage(z))
        with pytest.raises(RuntimeError, match="without its encoder.*vae_encoder=True"):
            lean.model.encode_first_stage(torch.zeros(1, 3, 64, 64))
    state = load_state_dict(TINY_CKPT)
    decoder_only = {k: v for k, v in state.items()
                    if not k.startswith(("first_stage_model.encoder.",
                                         "first_stage_model.quant_conv."))}
    path = write(tmp_path, "no-encoder.ckpt", decoder_only)
    assert Pipeline.load(TINY_CONFIG, path, vae_encoder=False).model.decode_first_stage(z) \
        .equal(tiny_pipe.model.decode_first_stage(z))
    with pytest.raises(CheckpointMismatch, match="missing keys.*first_stage_model.encoder"):
        Pipeline.load(TINY_CONFIG, path)


def _refiner_state():
    """sd_xl_refiner's layout: one text tower (bigG) as embedder 0, the UNet's label_emb."""
    state = load_state_dict(REF / "tiny-sdxl" / "tiny-sdxl.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")}
    return {k.replace("conditioner.embedders.1.", "conditioner.embedders.0.", 1): v
            for k, v in state.items()}


@pytest.mark.parametrize("config", [REF / "tiny-sdxl" / "tiny-sdxl.yaml", TINY_CONFIG])
def test_the_sdxl_refiner_is_named_and_refused(tmp_path, config):
    path = write(tmp_path, "refiner.safetensors", _refiner_state())
    with pytest.raises(CheckpointError, match="is an SDXL refiner, which refines images"):
        Pipeline.load(config, path)


def test_a_distilled_sdxl_is_named(tmp_path):
    """SSD-1B, Vega: SDXL's layout with transformer blocks taken out of the UNet."""
    state = {k: v for k, v in load_state_dict(XL_FILE).items()
             if ".1.transformer_blocks.1." not in k}
    with pytest.raises(CheckpointError, match=r"missing keys .*: its UNet has fewer transformer "
                                              r"blocks than the config builds \(a distilled"):
        Pipeline.load(REF / "tiny-sdxl" / "tiny-sdxl.yaml", write(tmp_path, "ssd.safetensors",
                                                                  state))
    del state["model.diffusion_model.out.2.weight"]  # another gap too: no such guess
    with pytest.raises(CheckpointError) as error:
        Pipeline.load(REF / "tiny-sdxl" / "tiny-sdxl.yaml", write(tmp_path, "cut.safetensors",
                                                                  state))
    assert "fewer transformer blocks" not in str(error.value)


@pytest.mark.parametrize("markers, says", [
    (("edm_mean", "edm_std"), "is a Playground v2.5 model"),
    (("edm_vpred.sigma_max", "edm_vpred.sigma_min"), "is a v-prediction model sampled by EDM"),
    (("v_pred", "ztsnr"), "is a zero-terminal-SNR model"),
    (("v_pred",), r"is a v-prediction model \(v_pred; a diffusers folder.s scheduler: "
                  r"prediction_type v_prediction\), and the config predicts eps"),
])
def test_sdxl_variants_that_sample_otherwise_are_named_and_refused(tmp_path, markers, says):
    """Their weights fit sd_xl_base.yaml, and eps sampling would make wrong images (ComfyUI's
    and diffusers' markers: empty tensors or scalars)."""
    state = load_state_dict(XL_FILE)
    state.update((marker, torch.tensor([])) for marker in markers)
    with pytest.raises(CheckpointError, match=says):
        Pipeline.load(REF / "tiny-sdxl" / "tiny-sdxl.yaml", write(tmp_path, "xl.safetensors",
                                                                  state))


def test_a_v_prediction_marker_with_a_v_config_loads(tmp_path, capsys):
    from omegaconf import OmegaConf
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.parameterization = "v"
    OmegaConf.save(config, tmp_path / "tiny-v.yaml")
    state = dict(load_state_dict(TINY_CKPT), v_pred=torch.tensor([]))
    with pytest.raises(CheckpointError, match="the config predicts eps"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "v.ckpt", state))
    pipe = Pipeline.load(tmp_path / "tiny-v.yaml", write(tmp_path, "v.ckpt", state))
    assert pipe.model.parameterization == "v"
    assert capsys.readouterr().err == ""  # (the marker agrees with the config)


def test_an_sd21_unclip_file_is_named_and_refused(tmp_path):
    """SD 2.1 unCLIP: the SD 2.x layout plus its CLIP image embedder (`embedder.model.*`) and
    the UNet's label_emb; with v2-inference.yaml it would run without its image input."""
    state = load_state_dict(TINY_CKPT)
    state["embedder.model.ln_final.weight"] = torch.ones(64)
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match="is an SD 2.1 unCLIP model"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "unclip.ckpt", state))


def test_an_inpainting_file_is_named_and_refused(tmp_path):
    state = load_state_dict(TINY_CKPT)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.cat([state[key]] * 3, dim=1)[:, :9]  # the latent, a mask, an image
    with pytest.raises(CheckpointError, match="is an inpainting model .* 9 input channels"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "inpainting.ckpt", state))


@pytest.mark.parametrize("keys, says", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "a LoRA"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",  # PEFT's pair, with its base
      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", "unet.conv_in.weight"],
     "a LoRA"),
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "in diffusers' layout"),
    (["model_ema.diffusion_modelinput_blocks00weight", "first_stage_model.decoder.conv_in.weight"],
     "one whose UNet is there only as EMA copies"),
    (["first_stage_model.decoder.conv_in.weight"], "a VAE alone"),
    (["decoder.up_blocks.0.resnets.0.conv1.weight", "encoder.conv_in.weight"], "a VAE alone"),
    (["decoder.conv_in.weight", "encoder.conv_in.weight"], "a VAE alone"),
    (["cond_stage_model.model.token_embedding.weight"], "a text encoder alone"),
])
def test_a_file_that_is_no_whole_model_is_named(tmp_path, keys, says):
    """(Named as the API's caller gave the files: they may try several.)"""
    state = {key: torch.zeros(2, 2) for key in keys}
    path = write(tmp_path, "part.safetensors", state)
    with pytest.raises(CheckpointMismatch) as refused:
        Pipeline.load(TINY_CONFIG, path)
    assert str(refused.value).startswith(f"checkpoint {path} does not fit the config "
                                         f"{TINY_CONFIG}: the file is {says}")


def test_a_file_of_known_extras_only_is_not_called_a_part(tmp_path):
    """EMA buffers alone (no weights) are no VAE alone: the file is said to lack the model."""
    state = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    with pytest.raises(CheckpointError) as error:
        Pipeline.load(TINY_CONFIG, write(tmp_path, "extras.safetensors", state))
    assert "does not fit the config" in str(error.value) and "the file is" not in str(error.value)


@pytest.mark.parametrize("staged_load", [False, True], ids=["plain", "staged"])
def test_quantized_and_scaled_fp8_files_are_refused_by_name(tmp_path, staged_load):
    """Weights that cannot be used as stored would make noise, not an image; also when the
    weights are staged (cast while the model is built: CUDA's default load)."""
    state = load_state_dict(TINY_CKPT)
    key = "model.diffusion_model.out.2.weight"
    quantized = dict(state, **{key: state[key].to(torch.int8)})
    with pytest.raises(CheckpointError, match=f"integer .*weights, e.g. {key} is int8"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "int8.safetensors", quantized),
                      staged_load=staged_load)
    complex_ = dict(state, **{key: state[key].to(torch.complex64)})
    with pytest.raises(CheckpointError, match=f"holds complex weights, e.g. {key} is complex64"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "complex.ckpt", complex_),
                      staged_load=staged_load)
    scaled = dict(state, scaled_fp8=torch.zeros(0, dtype=torch.float8_e4m3fn),
                  **{key[:-len("weight")] + "scale_weight": torch.ones(())})
    with pytest.raises(CheckpointError, match="is a scaled-fp8 file"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "scaled.safetensors", scaled),
                      staged_load=staged_load)


def test_a_whole_model_without_its_unet_is_not_called_a_part(tmp_path):
    """A file with the VAE and the text encoder but no UNet lacks the UNet: it is no VAE
    alone."""
    state = {k: v for k, v in load_state_dict(TINY_CKPT).items()
             if not k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match=r"the file has none of the UNet \(model\.\*\)$"):
        Pipeline.load(TINY_CONFIG, write(tmp_path, "no-unet.ckpt", state))


def test_an_sdxl_file_lacking_one_tower_is_no_refiner(tmp_path):
    """The refiner's only tower is OpenCLIP bigG (embedders.0.model); an SDXL base file short
    of its second tower keeps CLIP-L there and is told what it lacks."""
    state = {k: v for k, v in load_state_dict(REF / "tiny-sdxl" / "tiny-sdxl.safetensors").items()
             if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(CheckpointError, match="missing keys") as refused:
        Pipeline.load(REF / "tiny-sdxl" / "tiny-sdxl.yaml", write(tmp_path, "base.safetensors",
                                                                  state))
    assert "refiner" not in str(refused.value)


def test_an_sd2_file_in_sgm_layout_with_another_config_is_pointed_to_sd2(tmp_path):
    state = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model.", 1): v
             for k, v in load_state_dict(TINY_CKPT).items()}
    with pytest.raises(CheckpointError, match="looks like an SD 2.x .*v2-inference.yaml"):
        Pipeline.load(SD1_CONFIG, write(tmp_path, "turbo.safetensors", state))


def test_a_load_holds_each_file_tensor_only_until_it_is_converted(monkeypatch):
    """fit_state_dict consumes the file's dict as it goes: when a half file's tensor has been
    converted to fp32, the file's copy is gone before the next is converted, so a file never
    exists twice over (SDXL: 6.9 GB in fp16, 13.9 GB as fp32)."""
    import weakref

    from ldm import layouts

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: torch.ones(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()}
    files = [weakref.ref(t) for t in state.values()]
    placed, alive = layouts._placed, []

    def counting(value, device, dtype):
        alive.append(sum(ref() is not None for ref in files))
        return placed(value, device, dtype)

    monkeypatch.setattr(layouts, "_placed", counting)
    fitted = layouts.fit_state_dict(model, state)
    assert state == {} and {t.dtype for t in fitted.values()} == {torch.float32}
    assert alive == list(range(len(files), 0, -1))  # the one converted and those still to come
    assert not any(ref() is not None for ref in files)
