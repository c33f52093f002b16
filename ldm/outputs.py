"""Writing samples: atomically (temp file + link/rename), never over an existing file, each PNG
with its generation parameters in a `parameters` text chunk (the form image tools read)."""
import io
import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.pipeline import to_pil

SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "dpm": "DPM-Solver++ 2M"}


def ensure_writable_dir(path: Path):
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create output folder {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {path} is not writable")


def write_new_file(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, or to the next free NNNNN name beside it if `path` exists. The
    file appears complete or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        while True:
            try:
                os.link(tmp, path)  # fails instead of overwriting
                return path
            except FileExistsError:
                path = _bump(path)
    finally:
        os.unlink(tmp)


def _bump(path: Path) -> Path:
    match = re.fullmatch(r"(.*?)(\d+)", path.stem)
    if not match:
        return path.with_stem(path.stem + "-1")
    prefix, digits = match.groups()
    return path.with_stem(f"{prefix}{int(digits) + 1:0{len(digits)}d}")


def next_index(folder: Path, pattern=r"(\d{5})\.(png|npy|json)") -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return max(numbers) + 1 if numbers else 0


def png_bytes(image: Image.Image, text: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def parameters_text(prompt, args, opts, ckpt_hash) -> str:
    """A1111-style parameters: the prompt, then `Key: value` pairs on one line."""
    fields = {
        "Steps": opts.steps, "Sampler": SAMPLERS[opts.sampler], "CFG scale": opts.scale,
        "Seed": opts.seed, "Size": f"{opts.W}x{opts.H}", "Eta": opts.ddim_eta,
        "Precision": opts.precision,
        "Model hash": ckpt_hash, "Model": Path(args.ckpt).name, "Config": Path(args.config).name,
    }
    scalecrafter = {k: v for k, v in asdict(opts).items()
                    if k.startswith(("dilate", "progressive", "ndcfg", "disperse", "inflate",
                                     "tiled", "overlap", "sync_gn", "tile_size"))
                    and v not in (None, False)}
    fields["ScaleCrafter"] = json.dumps(scalecrafter, sort_keys=True)
    return prompt + "\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


class OutputWriter:
    def __init__(self, outdir, args, opts):
        from ldm.checkpoint import short_hash

        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        ensure_writable_dir(self.sample_dir)
        self.args, self.opts = args, opts
        self.ckpt_hash = short_hash(args.ckpt)
        self.count = 0

    def save_batch(self, prompts, decoded: torch.Tensor, latents: torch.Tensor):
        paths = []
        for prompt, image, latent in zip(prompts, to_pil(decoded), latents):
            index = next_index(self.sample_dir)
            params = parameters_text(prompt, self.args, self.opts, self.ckpt_hash)
            path = write_new_file(self.sample_dir / f"{index:05}.png",
                                  png_bytes(image, {"parameters": params}))
            stem = path.with_suffix("")
            if self.args.save_latent:
                buffer = io.BytesIO()
                np.save(buffer, latent.float().numpy())
                write_new_file(stem.with_suffix(".npy"), buffer.getvalue())
            if self.args.metadata == "json":
                sidecar = {"prompt": prompt, "parameters": params, "options": asdict(self.opts),
                           "ckpt": str(self.args.ckpt), "ckpt_hash": self.ckpt_hash,
                           "config": str(self.args.config)}
                write_new_file(stem.with_suffix(".json"),
                               json.dumps(sidecar, indent=2).encode())
            self.count += 1
            paths.append(path)
        return paths

    def save_grid(self, batches, n_rows):
        from torchvision.utils import make_grid

        if not batches:
            return None
        images = torch.cat(batches, 0)
        grid = make_grid(torch.clamp((images + 1) / 2, 0, 1), nrow=n_rows)
        array = (255.0 * grid.permute(1, 2, 0).numpy()).astype(np.uint8)
        grids = [p for p in self.outdir.glob("grid-*.png")]
        return write_new_file(self.outdir / f"grid-{len(grids):04}.png",
                              png_bytes(Image.fromarray(array), {}))
