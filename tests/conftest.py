"""Shared paths and the tiny reference model (loaded once per test session)."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REF = SHARED / "reference"
TINY = REF / "tiny"
TINY_CKPT = TINY / "tiny-sd21.ckpt"
TINY_CONFIG = TINY / "tiny-sd21.yaml"
SETTINGS = REF / "scalecrafter-settings"
# diffusers' layout as its converters write it (tests/data/diffusers/make.py): the tiny SD 2.1
# model's VAE, and each tiny model's folder as a map from the reference file
DIFFUSERS = REPO / "tests" / "data" / "diffusers"
DIFFUSERS_VAE = DIFFUSERS / "tiny-sd21-vae.safetensors"
# the tiny models: (config, file, their text towers' config.json hidden_act, as the real ones')
TINY_MODELS = {
    "sd21": (TINY_CONFIG, TINY_CKPT, {"text_encoder": "gelu"}),
    "sd15": (REF / "tiny-sd1" / "tiny-sd15.yaml", REF / "tiny-sd1" / "tiny-sd15.ckpt",
             {"text_encoder": "quick_gelu"}),
    "sdxl": (REF / "tiny-sdxl" / "tiny-sdxl.yaml", REF / "tiny-sdxl" / "tiny-sdxl.safetensors",
             {"text_encoder": "quick_gelu", "text_encoder_2": "gelu"}),
}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def sdxl_vector_err(ours, ref, size, text_width=64):
    """SDXL's vector against sgm's: (relative error of the pooled text part, absolute error of the
    size embeddings over its float32 bound). cos/sin of v * f for sizes v up to max(size) are only
    as exact as float32 rounds that argument, and kernels round it differently (torch 2.14 here
    is 1.1e-4 from the reference at 4096; both are 1.2e-4 from float64), so a few ulps of the
    largest argument are allowed there."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    bound = max(size) * 2.0 ** -22
    size_err = float(np.abs(ours[:, text_width:] - ref[:, text_width:]).max())
    text, ref_text = ours[:, :text_width], ref[:, :text_width]
    if not ref_text.any():  # the unconditional branch: exactly zero
        return float(np.abs(text).max()), size_err / bound
    return rel_err(text, ref_text), size_err / bound


# A Python warning raised in an installed package: "<.../site-packages/...>:<line>: XWarning: ..."
# (its source line follows, indented)
_LIBRARY_WARNING = re.compile(r"^\S*[/\\](site|dist)-packages[/\\]\S*:\d+: \w*Warning: ")


def our_stderr(stderr: str) -> list:
    """A subprocess's stderr lines less the Python warnings that installed libraries raise (a
    torch or torchvision release may add one at import; ours are "warning: ..." lines, kept)."""
    lines, in_warning = [], False
    for line in stderr.strip().splitlines():
        if _LIBRARY_WARNING.match(line):
            in_warning = True
        elif not (in_warning and line.startswith(" ")):
            in_warning = False
            lines.append(line)
    return lines


def reference(name):
    path = TINY / name
    assert path.is_file(), f"reference data {path} is missing (../shared/reference)"
    return np.load(path)


def cases():
    return json.loads((TINY / "cases.json").read_text())["models"][0]


def ultra_cases():
    return json.loads((TINY / "ultra-cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_pipe():
    from ldm.pipeline import Pipeline
    assert TINY_CKPT.is_file(), "the tiny reference checkpoint is missing"
    return Pipeline.load(TINY_CONFIG, TINY_CKPT, device="cpu")


def load_script(name, module_name=None):
    """A module of scripts/, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(module_name or f"script_{name}",
                                                  REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def txt2img():
    return load_script("txt2img", "txt2img_cli")


@pytest.fixture(scope="module")
def bench():
    """scripts/benchmark.py as a module (its GPU half: bench.benchmark_gpu)."""
    return load_script("benchmark", "benchmark_script")


def check_preset_against_authors(txt2img, name, authors_yaml):
    """Our preset `name` has the authors' preset file's size, steps, taus, progressive and
    settings files (an ndcfg file beside ndcfg_tau 0 is unused); dispersion is ours (their
    _disperse presets set inflate_tau 0: README, Presets). Returns the parsed flags."""
    import yaml

    theirs = yaml.safe_load(Path(authors_yaml).read_text())
    args = txt2img.parse_args(["--preset", name, "--ckpt", "x"])
    assert (args.H, args.W) == (8 * theirs["latent_height"], 8 * theirs["latent_width"])
    assert (args.dilate_tau, args.ndcfg_tau, args.progressive_dilate, args.steps) == \
        (theirs["dilate_tau"], theirs["ndcfg_tau"], theirs["progressive"],
         theirs["num_inference_steps"])
    used = ["dilate_settings", "disperse_settings"] + \
        (["ndcfg_dilate_settings"] if theirs["ndcfg_tau"] else [])
    for key in used:
        names = [Path(v).name if v else None for v in (getattr(args, key), theirs.get(key))]
        assert names[0] == names[1], key
    assert (args.inflate_tau > 0) == name.endswith("_disperse")
    assert 0 <= args.inflate_tau <= args.dilate_tau
    return args


@pytest.fixture
def cuda_graph_plumbing(monkeypatch):
    """CUDA graphs' plumbing on the CPU whatever the torch: before 2.8 compile_unet_in_place
    refuses CUDA graphs, as the planned-conv op cannot forbid their replay there
    (tests/test_compat.py); the stand-in backends of these tests never replay a real one."""
    import ldm.precision

    if ldm.precision.CUDAGRAPH_UNSAFE is None:
        monkeypatch.setattr(ldm.precision, "CUDAGRAPH_UNSAFE", "stand-in")


def diffusers_parts(model):
    """The tiny `model`'s diffusers folder's parts ({part: {key: tensor}}), from the reference
    file through the map made with diffusers' converters."""
    from ldm.checkpoint import load_state_dict
    state = load_state_dict(TINY_MODELS[model][1])
    parts = json.loads((DIFFUSERS / f"tiny-{model}.map.json").read_text())
    return {part: {name: state[key].t().contiguous() if transposed else
                   state[key].flatten()[first:first + int(np.prod(shape))].reshape(shape).clone()
                   for name, (key, first, shape, transposed) in names.items()}
            for part, names in parts.items()}


def diffusers_folder(root, model, parts=None):
    """The tiny `model` as a diffusers pipeline folder under `root`, as `from_pretrained`
    caches one: each part's weights file, the text towers' config.json, model_index.json."""
    from ldm.checkpoint import save_safetensors
    parts = parts or diffusers_parts(model)
    folder = root / f"tiny-{model}-diffusers"
    for part, tensors in parts.items():
        (folder / part).mkdir(parents=True)
        text = part.startswith("text_encoder")
        if text:
            (folder / part / "config.json").write_text(
                json.dumps({"hidden_act": TINY_MODELS[model][2][part]}))
        name = "model.safetensors" if text else "diffusion_pytorch_model.safetensors"
        save_safetensors(tensors, folder / part / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Pipeline"}))
    return folder
