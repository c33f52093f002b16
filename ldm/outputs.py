"""Writing samples: atomically (temp file + link), never over an existing file, each PNG with its
generation parameters in a `parameters` text chunk (the form image tools read).

A file appears under its final name complete or not at all: the bytes go to a `.partial-*` temp
file in the same folder, which is then hard-linked to the first free name (a link fails instead
of replacing a file) and removed. Ctrl-C in the middle leaves the earlier files as they were and
no temp file behind."""
import errno
import io
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.cli import SETTINGS_FILES, device_type, repository_fallback
from ldm.diffusers_layout import model_name, vae_name
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.precision import AUTOCAST_DTYPES
from ldm.pipeline import eight_bit, to_pil

PARTIAL_PREFIX = ".partial-"
# GenerationOptions fields written as ScaleCrafter settings, in this order, each under its flag name
SCALECRAFTER_FIELDS = ("dilate", "dilate_tau", "dilate_skip", "progressive_dilate",
                       "dilate_settings", "ndcfg_dilate_settings", "ndcfg_tau",
                       "disperse_settings", "disperse_transform", "inflate_tau", "freeu",
                       "tiled_decoding", "overlap", "sync_gn", "tile_size")
# errnos of file systems without hard links (vfat, some network and FUSE mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_pending = set()  # temp files of the writes in progress
_file_mode = None


class OutputError(OSError):
    """An output folder that cannot be used; the message is one line for the user."""


def ensure_writable_dir(path, created: Optional[List[Path]] = None) -> Path:
    """Create `path` (and its parents) and check that files can be created in it. `created`
    gets the folders this made, deepest first (see ldm.cli.remove_if_empty)."""
    path = Path(path)
    if created is not None:
        created.extend(p for p in (path, *path.parents) if not p.exists())
    # A regular file on the way: name it (mkdir would only say "Not a directory").
    try:
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    except OSError:  # e.g. a parent that cannot be searched: mkdir reports it below
        existing = None
    if existing is not None and not existing.is_dir():
        raise OutputError(f"cannot create output folder {path}: {existing} exists and is not a "
                          "folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path}: {err.strerror or err}") from None
    try:  # os.access says yes to root everywhere, and knows nothing of read-only mounts
        with tempfile.TemporaryFile(dir=path, prefix=PARTIAL_PREFIX):
            pass
    except OSError as err:
        raise OutputError(f"output folder {path} is not writable: {err.strerror or err}") from None
    return path


def _new_file_mode() -> int:
    """The mode open() would give a new file (mkstemp's is 0600)."""
    global _file_mode
    if _file_mode is None:
        umask = os.umask(0o022)
        os.umask(umask)
        _file_mode = 0o666 & ~umask
    return _file_mode


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _publish(tmp: str, path: Path):
    """Give the complete file `tmp` the name `path`; FileExistsError if that name is taken."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    # No hard links here: claim the name with O_EXCL, then move the complete file over the claim.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _new_file_mode()))
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(path)  # the empty claim, never a file of someone else's
        raise


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a quota, ...); says which."""


def write_new_file(path, data: bytes) -> Path:
    """Write `data` to `path`, or to the next free name beside it if `path` exists (00007.png
    becomes 00008.png); returns the path written. The file appears complete or not at all, and
    no existing file is ever replaced. WriteError names the file where the system refuses."""
    try:
        return _write_new_file(Path(path), data)
    except OSError as err:
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from err


def _write_new_file(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL_PREFIX, suffix=path.suffix)
    _pending.add(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        while True:
            try:
                _publish(tmp, path)
                return path
            except FileExistsError:
                path = _bump(path)
    finally:
        _remove(tmp)
        _pending.discard(tmp)


def discard_partial_files():
    """Remove the temp files of writes that were cut short (call after a KeyboardInterrupt)."""
    for tmp in list(_pending):
        _remove(tmp)
        _pending.discard(tmp)


def _bump(path: Path) -> Path:
    match = re.fullmatch(r"(.*?)(\d+)", path.stem)
    if not match:
        return path.with_stem(path.stem + "-1")
    prefix, digits = match.groups()
    return path.with_stem(f"{prefix}{int(digits) + 1:0{len(digits)}d}")


def next_index(folder: Path, pattern=r"(\d{5,})\.(png|npy|json)") -> int:
    """One more than the highest number among the names in `folder` that match `pattern`."""
    numbers = [int(m.group(1)) for p in Path(folder).iterdir()
               if (m := re.fullmatch(pattern, p.name))]
    return max(numbers) + 1 if numbers else 0


def png_bytes(image: Image.Image, text: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _infotext_value(value) -> str:
    """A value as the A1111 infotext parser reads it back: quoted when it has a , : or newline."""
    if isinstance(value, (tuple, list)):
        value = " ".join(str(v) for v in value)
    text = str(value)
    if any(c in text for c in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def tile_text(tile) -> str:
    """A latent tile (h, w) as --tile_size takes it: HxW (height first, unlike Size's WxH)."""
    return f"{tile[0]}x{tile[1]}"


def run_fields(args, opts, kernels=None, file_hashes=None) -> dict:
    """What else a rerun needs: the device and the dtype autocast meant there (bf16 on the
    CPU, fp16 on CUDA), the kernel and layout switches on (Pipeline.kernels; none: the
    reference kernels), the batch size the seeded stream was drawn in, the preset, and the
    short hashes of the files the run read (`input_file_hashes`)."""
    device = getattr(args, "device", None)
    device = device and device_type(device)  # cuda:1's numbers are cuda's
    fields = {"Device": device} if device else {}
    dtype = AUTOCAST_DTYPES.get(device) if opts.precision == "autocast" else None
    if dtype is not None:
        fields["Autocast dtype"] = str(dtype).replace("torch.", "")
    switched_on = [name for name, on in (kernels or {}).items() if on]
    if switched_on:
        fields["Kernels"] = " ".join(switched_on)
    if getattr(args, "n_samples", None):
        fields["n_samples"] = args.n_samples
    if getattr(args, "preset", None):
        fields["Preset"] = args.preset
    if getattr(args, "vae", None):
        fields["VAE"] = vae_name(args.vae)
    if getattr(args, "from_file", None):
        fields["Prompt file"] = Path(args.from_file).name
        fields["repeat"] = getattr(args, "repeat", 1)
    if file_hashes:
        fields["File hashes"] = ", ".join(f"{k}: {v}" for k, v in file_hashes.items())
    return fields


def input_file_hashes(args) -> dict:
    """{flag name: short SHA-256} of the files a run reads besides the checkpoint (hashed
    apart): the config, a --vae file (hashed in a background thread, like the checkpoint: a
    BackgroundShortHash), the prompt file, the ScaleCrafter settings files and transform
    given.
    Their paths alone would not tell an edited file from the one an image was made with.
    The CLI takes them before loading, when it has just read them; one it cannot read is
    'unreadable' (the run itself says why, where it reads it)."""
    from ldm.hashing import BackgroundShortHash, short_hash

    hashes = {}
    for name in ("config", "vae", "from_file", *SETTINGS_FILES):
        path = getattr(args, name, None)
        if path and name == "vae":  # weights, maybe a whole model's: hashed while it loads
            hashes[name] = BackgroundShortHash(path)
        elif path:
            try:
                digest = short_hash(repository_fallback(path))
            except OSError:
                digest = "unreadable"
            hashes[name.replace("from_file", "from-file")] = digest  # as the flags are named
    return hashes


def _resolved(hashes: dict) -> dict:
    """input_file_hashes' answer with its background hashes' results ('unreadable' for one
    that failed)."""
    done = {}
    for name, digest in hashes.items():
        if not isinstance(digest, str):
            try:
                digest = digest.result()
            except OSError:
                digest = "unreadable"
        done[name] = digest
    return done


def parameters_text(prompt, args, opts, ckpt_hash, batch_size=None, batch_pos=None,
                    batch_index=None, tiles=None, run=None) -> str:
    """A1111-style parameters: the prompt, then `Key: value` pairs on one line. Every
    ScaleCrafter setting follows under its flag name (`dilate: 2.0, dilate_tau: 20, ...`).
    `Batch index` counts the run's batches from 0: with --prompt, the seeded stream's batch k
    is reached by running k + 1 of them; with --from-file, whose last batch of a round can be
    short, by running the same file. `Tiles`: the (h, w) latent tile the decode used,
    `--tile_size`'s HxW (what `auto` chose depends on the free memory). `decode_budget_gb`
    where given: a budget that makes the decode recompute layers can move the last bits.
    run: `run_fields`' answer, made once for the run (default: made here, without kernels
    or file hashes)."""
    fields = {
        "Steps": opts.steps, "Sampler": SAMPLERS[opts.sampler].label, "CFG scale": opts.scale,
        "Seed": opts.seed, "RNG": opts.rng, "Size": f"{opts.W}x{opts.H}", "Eta": opts.ddim_eta,
        "Precision": opts.precision, "Fixed code": opts.fixed_code,
        "Model hash": ckpt_hash, "Model": model_name(args.ckpt), "Config": Path(args.config).name,
    }
    if SAMPLERS[opts.sampler].spaced:  # (DPM-Solver++ keeps its own time grid)
        fields["Timestep spacing"] = opts.timestep_spacing
    fields.update(run if run is not None else run_fields(args, opts))
    if batch_size is not None:
        fields["Batch size"] = batch_size
    if batch_pos is not None:
        fields["Batch pos"] = batch_pos
    if batch_index is not None:
        fields["Batch index"] = batch_index
    options = asdict(opts)
    if isinstance(opts.tile_size, (tuple, list)):  # as --tile_size takes it
        options["tile_size"] = tile_text(opts.tile_size)
    fields.update((name, options[name]) for name in SCALECRAFTER_FIELDS)
    if tiles is not None:
        fields["Tiles"] = tile_text(tiles)
    if opts.decode_budget_gb is not None:
        fields["decode_budget_gb"] = opts.decode_budget_gb
    negative = f"Negative prompt: {opts.negative_prompt}\n" if opts.negative_prompt else ""
    return (prompt + "\n" + negative
            + ", ".join(f"{k}: {_infotext_value(v)}" for k, v in fields.items()))


class OutputWriter:
    """Numbered samples (outdir/samples/NNNNN.png) and grids (outdir/grid-NNNN.png); numbering
    goes on from the files already there, so runs into one folder never overwrite each other."""

    def __init__(self, outdir, args, opts, ckpt_hash=None, kernels=None, file_hashes=None):
        """ckpt_hash: the checkpoint's short hash, or a BackgroundShortHash computing it (the
        CLI starts one before loading); None: hashed here when the first file is written.
        kernels: the pipeline's kernel and layout switches (Pipeline.kernels). file_hashes:
        input_file_hashes' answer, taken when the files were read (default: taken here)."""
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        ensure_writable_dir(self.sample_dir)
        self.args, self.opts = args, opts
        self.file_hashes = _resolved(input_file_hashes(args) if file_hashes is None
                                     else file_hashes)
        self.run_fields = run_fields(args, opts, kernels, self.file_hashes)
        self._ckpt_hash = ckpt_hash
        self.count = self.batches = 0  # images and batches written by this run
        self.prompts = []
        self.paths: List[Path] = []  # the samples written by this run
        self.images: List[torch.Tensor] = []  # their 8-bit pixels, for a grid (a quarter of
        # the decoded floats' memory: 50 MB, not 200, per 4096² image kept)
        self.grid_path = None  # the grid save_batch wrote, if it was given one

    @property
    def ckpt_hash(self) -> str:
        from ldm.hashing import short_hash

        if self._ckpt_hash is None:
            self._ckpt_hash = short_hash(self.args.ckpt)
        elif not isinstance(self._ckpt_hash, str):
            self._ckpt_hash = self._ckpt_hash.result()
        return self._ckpt_hash

    def save_batch(self, prompts, decoded: torch.Tensor, latents: torch.Tensor,
                   grid_rows: Optional[int] = None, tiles=None):
        """The batch's samples (and their latents / sidecars); with grid_rows, the grid of every
        image of the run too, written after them: the last batch's images and the grid are
        encoded side by side. tiles: the decode's (h, w) tile (Pipeline.decode_tiles), if
        tiled. Returns the samples' paths."""
        texts = [parameters_text(prompt, self.args, self.opts, self.ckpt_hash, len(prompts), pos,
                                 self.batches, tiles, self.run_fields)
                 for pos, prompt in enumerate(prompts)]
        self.batches += 1
        pixels = eight_bit(decoded)  # (once: the samples, their grid and the kept images)
        # PNG encoding (zlib) releases the GIL: the images are encoded side by side (3 s for
        # one 4096² image); the files are still written one by one, in order
        jobs = [partial(png_bytes, image, {"parameters": text})
                for image, text in zip(to_pil(pixels), texts)]
        if grid_rows is not None:
            jobs.append(partial(self._grid_png, self.images + [pixels], grid_rows,
                                self.prompts + list(prompts)))
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            encoded = list(pool.map(lambda job: job(), jobs))
        grid_png = encoded.pop() if grid_rows is not None else None
        paths = []
        for i, (prompt, params, data, latent) in enumerate(zip(prompts, texts, encoded, latents)):
            paths.append(self._write_sample(prompt, params, data, latent, tiles))
            self.images.append(pixels[i:i + 1])  # each image as it is kept
        if grid_png is not None:
            self.grid_path = self._write_grid(grid_png)
        return paths

    def _write_sample(self, prompt, params, data: bytes, latent, tiles=None) -> Path:
        index = next_index(self.sample_dir)
        path = write_new_file(self.sample_dir / f"{index:05}.png", data)
        stem = path.with_suffix("")
        if getattr(self.args, "save_latent", False):
            buffer = io.BytesIO()
            np.save(buffer, latent.detach().float().cpu().numpy())
            write_new_file(stem.with_suffix(".npy"), buffer.getvalue())
        if getattr(self.args, "metadata", "png") == "json":
            sidecar = {"prompt": prompt, "parameters": params, "options": asdict(self.opts),
                       "tiles": tile_text(tiles) if tiles is not None else None,
                       "ckpt": str(self.args.ckpt), "ckpt_hash": self.ckpt_hash,
                       "vae": str(self.args.vae) if getattr(self.args, "vae", None) else None,
                       "config": str(self.args.config), "file_hashes": self.file_hashes,
                       "image": path.name}
            write_new_file(stem.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
        self.count += 1
        self.prompts.append(prompt)
        self.paths.append(path)
        return path

    def _grid_png(self, batches, n_rows, prompts) -> bytes:
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat(batches, 0), nrow=n_rows)  # uint8 in, the same pixels out
        array = grid.permute(1, 2, 0).numpy()
        prompts = list(dict.fromkeys(prompts))  # each prompt once, in order
        params = parameters_text("\n".join(prompts), self.args, self.opts, self.ckpt_hash,
                                 run=self.run_fields)
        return png_bytes(Image.fromarray(array), {"parameters": params})

    def _write_grid(self, data: bytes) -> Path:
        index = next_index(self.outdir, r"grid-(\d{4,})\.png")
        return write_new_file(self.outdir / f"grid-{index:04}.png", data)

    def save_grid(self, n_rows):
        """The grid of every image this run wrote (e.g. when it was interrupted before its
        last batch), unless it wrote one already."""
        if not self.images or self.grid_path is not None:
            return None
        self.grid_path = self._write_grid(self._grid_png(self.images, n_rows, self.prompts))
        return self.grid_path

    def summary(self) -> str:
        """Which files this run wrote, e.g. 'samples/00008.png to 00010.png (with .npy
        latents), grid-0004.png'."""
        if not self.paths:
            return "no images"
        first, last = self.paths[0], self.paths[-1]
        text = f"{first.relative_to(self.outdir)}" + (f" to {last.name}" if last != first else "")
        extras = [what for what, on in ((".npy latents", getattr(self.args, "save_latent", False)),
                                        (".json sidecars",
                                         getattr(self.args, "metadata", "png") == "json")) if on]
        if extras:
            text += f" (with {' and '.join(extras)})"
        if self.grid_path is not None:
            text += f", {self.grid_path.name}"
        return text

    @staticmethod
    def discard_partial_files():
        discard_partial_files()
