"""Models in diffusers' layout, as diffusers' own converters write them (tests/data/diffusers/
make.py): a pipeline folder loads to exactly the weights of the single file it came from."""
import json
from pathlib import Path

import pytest
import torch

from conftest import (DIFFUSERS, DIFFUSERS_VAE, REF, TINY_MODELS, diffusers_folder,
                      diffusers_parts)
from ldm.checkpoint import CheckpointError, save_safetensors
from ldm.pipeline import Pipeline
from test_layouts import SCHEDULE


def assert_same_weights(pipe, single_file):
    ours, theirs = pipe.model.state_dict(), single_file.model.state_dict()
    assert set(ours) == set(theirs)
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize("model", ["sd21", "sd15", "sdxl"])
def test_a_pipeline_folder_loads_as_its_single_file(tmp_path, capsys, model, tiny_pipe):
    config, single_file, _ = TINY_MODELS[model]
    folder = diffusers_folder(tmp_path, model)
    pipe = Pipeline.load(config, folder)
    assert capsys.readouterr().err == ""
    assert_same_weights(pipe, tiny_pipe if model == "sd21" else Pipeline.load(config, single_file))


def test_a_folder_as_transformers_and_diffusers_save_it(tmp_path, capsys, tiny_pipe):
    """Pickled .bin weights (older snapshots), a sharded fp16-variant UNet (its index named
    `diffusion_pytorch_model.safetensors.index.fp16.json`, as diffusers names it), the
    `position_ids` buffer transformers saved before 4.31, an fp16 variant beside full precision
    (not taken), diffusers' VAE attention names before 0.17."""
    parts = diffusers_parts("sd21")
    text = parts["text_encoder"]
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    vae = parts["vae"]
    for ours, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                      ("to_out.0", "proj_attn")):
        for key in [k for k in vae if f".attentions.0.{ours}." in k]:
            vae[key.replace(f".{ours}.", f".{old}.")] = vae.pop(key)
    folder = diffusers_folder(tmp_path, "sd21", parts)
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(text, folder / "text_encoder" / "pytorch_model.bin")
    unet = folder / "unet"
    weights = parts["unet"]
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(weights)
    shards = {f"diffusion_pytorch_model.fp16-0000{i + 1}-of-00002.safetensors": keys[i::2]
              for i in range(2)}  # (fp32 numbers here: exact; the names are the point)
    for shard, names in shards.items():
        save_safetensors({k: weights[k] for k in names}, unet / shard)
    (unet / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, names in shards.items() for k in names}}))
    save_safetensors({"conv_in.weight": torch.zeros(1)},
                     folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    assert_same_weights(Pipeline.load(TINY_MODELS["sd21"][0], folder), tiny_pipe)
    assert capsys.readouterr().err == ""


def test_a_folder_that_cannot_load_is_named(tmp_path):
    config = TINY_MODELS["sdxl"][0]
    folder = diffusers_folder(tmp_path, "sdxl")
    (folder / "text_encoder_2" / "config.json").write_text('{"hidden_act": "quick_gelu"}')
    with pytest.raises(CheckpointError, match="SDXL's second text tower should be OpenCLIP's"):
        Pipeline.load(config, folder)
    (folder / "text_encoder_2" / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"text_encoder_2/config\.json holds no JSON obj"):
        Pipeline.load(config, folder)
    (folder / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"cannot read .*text_encoder_2/config\.json: "):
        Pipeline.load(config, folder)
    (folder / "text_encoder_2" / "config.json").write_text('{"hidden_act": "gelu"}')
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('"v_prediction"')
    with pytest.raises(CheckpointError, match=r"scheduler_config\.json holds no JSON object"):
        Pipeline.load(config, folder)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    (folder / "text_encoder_2" / "model.safetensors").rename(tmp_path / "te2.safetensors")
    with pytest.raises(CheckpointError, match=r"has no text_encoder_2 weights"):
        Pipeline.load(config, folder)
    (tmp_path / "te2.safetensors").rename(folder / "text_encoder_2" / "model.safetensors")
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"is an SDXL refiner \(text_encoder_2/ alone\)"):
        Pipeline.load(config, folder)
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"diffusers folder .* has no text_encoder "
                                              r"weights \(text_encoder/model\.safetensors"):
        Pipeline.load(config, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"weight_map": ')  # (cut short)
    with pytest.raises(CheckpointError, match=r"cannot read .*unet/diffusion_pytorch_model\."
                                              r"safetensors\.index\.json: "):
        Pipeline.load(config, folder)
    index.write_text('{"weight_map": {"conv_in.weight": 3}}')
    with pytest.raises(CheckpointError, match=r"index .* has no weight_map of file names"):
        Pipeline.load(config, folder)


MANIFESTS = {"sd21": ("sd21-v2-inference.keys.json", [*SCHEDULE,
                 "cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection",
                 *(f"cond_stage_model.model.transformer.resblocks.23.{layer}" for layer in (
                     "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias",
                     "attn.out_proj.weight", "ln_1.bias", "ln_1.weight", "ln_2.bias",
                     "ln_2.weight", "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias",
                     "mlp.c_proj.weight"))]),
             "sd15": ("sd15-v1-inference.keys.json", list(SCHEDULE)),
             "sdxl": ("sdxl-base.keys.json", ["conditioner.embedders.1.model.logit_scale",
                                              "denoiser.sigmas"])}


@pytest.mark.parametrize("model", MANIFESTS)
def test_the_full_size_folders_names_are_the_real_files(model):
    """The real models' diffusers folders (their keys and shapes, from diffusers' converters
    over the full-size manifests) under our names are the real single files' weights, in the
    same shapes up to trailing 1s; what they lack is what the tool rebuilds (the schedule) or
    never reads (SD 2.x's last text block, projection and logit scale; SDXL's logit scale)."""
    from ldm.diffusers_layout import single_file_state
    from ldm.layouts import _trailing_ones_dropped
    manifest, lacking = MANIFESTS[model]
    folder = json.loads((DIFFUSERS / f"full-{model}.keys.json").read_text())
    parts = {part: {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
             for part, keys in folder.items()}
    ours = single_file_state(parts, TINY_MODELS[model][2])
    real = json.loads((REF / manifest).read_text())
    assert set(ours) <= set(real) and sorted(set(real) - set(ours)) == sorted(lacking)
    assert all(_trailing_ones_dropped(v.shape) == _trailing_ones_dropped(real[k])
               for k, v in ours.items())


def test_a_folder_converts_to_a_single_file(tmp_path, tiny_pipe):
    """scripts/convert_checkpoint.py FOLDER OUT.safetensors: the single file loads as the one
    the folder came from."""
    from conftest import load_script
    out = tmp_path / "converted.safetensors"
    assert load_script("convert_checkpoint").main([str(diffusers_folder(tmp_path, "sd21")),
                                                   str(out)]) == 0
    assert_same_weights(Pipeline.load(TINY_MODELS["sd21"][0], out), tiny_pipe)


@pytest.mark.parametrize("scheduler, says", [
    ({"prediction_type": "v_prediction"}, "is a v-prediction model"),
    ({"prediction_type": "epsilon", "rescale_betas_zero_snr": True}, "is a zero-terminal-SNR"),
])
def test_a_folders_scheduler_tells_what_its_weights_cannot(tmp_path, capsys, scheduler, says):
    """A folder's scheduler_config.json says what single files say by marker keys (v_pred,
    ztsnr): a v-prediction model is refused under an eps config and loads under a v config;
    zero terminal SNR is refused."""
    import yaml
    config, _, _ = TINY_MODELS["sd21"]
    folder = diffusers_folder(tmp_path, "sd21")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(CheckpointError, match=says):
        Pipeline.load(config, folder)
    v_config = yaml.safe_load(config.read_text())
    v_config["model"]["params"]["parameterization"] = "v"
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(v_config))
    if "v_prediction" in scheduler.values():
        assert Pipeline.load(tmp_path / "v.yaml", folder).model.parameterization == "v"
        assert capsys.readouterr().err == ""


def test_a_model_id_is_found_in_the_hugging_face_cache(tmp_path, monkeypatch, tiny_pipe):
    """`org/name`, as the authors' scripts name models for from_pretrained: the cache's
    snapshot (refs/main's, else the only one), named so in the images; nothing downloads."""
    from ldm.diffusers_layout import checkpoint_path, model_name, vae_file, vae_name
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny-sd"
    (repo / "snapshots").mkdir(parents=True)
    snapshot = diffusers_folder(repo / "snapshots", "sd21").rename(repo / "snapshots" / "abc1")
    assert checkpoint_path("org/tiny-sd") == snapshot  # (its only snapshot)
    (repo / "snapshots" / "0old").mkdir()
    assert checkpoint_path("org/tiny-sd") == Path("org/tiny-sd")  # (which one? none)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc1\n")
    assert checkpoint_path("org/tiny-sd") == snapshot and model_name(snapshot) == "org/tiny-sd"
    assert_same_weights(Pipeline.load(TINY_MODELS["sd21"][0], "org/tiny-sd"), tiny_pipe)
    assert checkpoint_path("org/other") == Path("org/other")
    (repo / "refs" / "main").write_text("0old")  # (a partial download, say)
    with pytest.raises(CheckpointError, match=r"org/tiny-sd is in the Hugging Face cache, but "
                                              r"its snapshot .*0old holds neither a diffusers "
                                              r"pipeline \(unet/, ...\) nor a \.safetensors"):
        checkpoint_path("org/tiny-sd")
    single = repo / "snapshots" / "0old"  # a repository of single files (hf_hub_download)
    (single / "v2-1_512-ema-pruned.ckpt").symlink_to(TINY_MODELS["sd21"][1])
    assert checkpoint_path("org/tiny-sd") == single / "v2-1_512-ema-pruned.ckpt"
    assert model_name(single / "v2-1_512-ema-pruned.ckpt") == \
        "org/tiny-sd/v2-1_512-ema-pruned.ckpt"
    for name in ("a.safetensors", "b.safetensors"):
        (single / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"org/tiny-sd in the Hugging Face cache holds 2 "
                                              r"checkpoints: give one \(.*a\.safetensors, "):
        checkpoint_path("org/tiny-sd")
    (single / "b.safetensors").unlink()
    assert checkpoint_path("org/tiny-sd") == single / "a.safetensors"  # (before the .ckpt)
    monkeypatch.chdir(snapshot)
    assert model_name(".") == "org/tiny-sd"
    vae = tmp_path / "hub" / "models--org--tiny-vae" / "snapshots" / "f00"  # (--vae org/name)
    vae.mkdir(parents=True)
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(DIFFUSERS_VAE.read_bytes())
    assert vae_file("org/tiny-vae") == vae / "diffusion_pytorch_model.safetensors"
    assert vae_name(vae_file("org/tiny-vae")) == "org/tiny-vae"
    assert vae_name(snapshot / "vae" / "diffusion_pytorch_model.fp16.safetensors") == \
        "org/tiny-sd"  # (a pipeline's VAE)
    assert vae_file("org/no-vae") == Path("org/no-vae")  # (then: does not exist)
    original = tmp_path / "hub" / "models--org--vae-original" / "snapshots" / "b1"
    original.mkdir(parents=True)  # a single-file VAE repository (sd-vae-ft-mse-original)
    (original / "vae-ft-mse-840000-ema-pruned.ckpt").write_bytes(b"")
    assert vae_file("org/vae-original") == original / "vae-ft-mse-840000-ema-pruned.ckpt"
    (original / "vae.safetensors").write_bytes(b"")
    assert vae_file("org/vae-original") == original / "vae.safetensors"
    monkeypatch.chdir(snapshot / "vae")  # (--vae . in a pipeline's vae/)
    assert vae_name("diffusion_pytorch_model.safetensors") == "org/tiny-sd"


@pytest.mark.parametrize("env, cache", [
    ({"HF_HUB_CACHE": "~/hub-cache"}, "{home}/hub-cache"),
    ({"HUGGINGFACE_HUB_CACHE": "/old/cache", "HF_HOME": "/hf"}, "/old/cache"),
    ({"HF_HOME": "$SOMEWHERE/hf"}, "/there/hf/hub"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub"),
    ({}, "{home}/.cache/huggingface/hub"),
])
def test_the_hugging_face_cache_is_where_huggingface_hub_puts_it(monkeypatch, env, cache):
    """huggingface_hub's rules (constants.py): HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub; `~` and $VARs
    expanded."""
    from ldm.diffusers_layout import hub_cache
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("SOMEWHERE", "/there")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub_cache() == Path(cache.format(home="/home/someone"))
