#!/usr/bin/env python
"""Convert a PyTorch / Lightning checkpoint, or a diffusers pipeline folder, to a .safetensors
state dict.

    python scripts/convert_checkpoint.py IN.ckpt OUT.safetensors [--half] [--trust-pickle] [--force]

A diffusers pipeline folder (unet/, vae/, text_encoder/, ...) is written under a single file's
names (ldm.diffusers_layout), as the tool itself reads one.

The input is read with the same safe loader the project uses everywhere
(ldm.checkpoint.load_state_dict): tensors and known training extras load, a
pickle that would call anything else is refused.  Only the state dict
(``ckpt["state_dict"]`` of a Lightning checkpoint, else the top-level dict of
tensors) is written; optimizer state, callbacks, hyper-parameters etc. are
dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TRUST_HELP = (
    "DANGEROUS: if the safe loader refuses the input because its pickle would "
    "call something outside the whitelist, load it with full pickle instead. "
    "Unpickling runs any code the file contains (it can delete files, install "
    "malware, ...), so use this only for a file from a source you trust "
    "completely. Without this flag the input is read with the safe loader only."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=(
            "Write the state dict of a .ckpt/.pt/.pth/.bin (or .safetensors) checkpoint,\n"
            "or of a diffusers pipeline folder under a single file's names, to a\n"
            ".safetensors file (optimizer state, callbacks, hyper-parameters are\n"
            "dropped). The input is loaded safely: a pickle that would run code is\n"
            "refused unless --trust-pickle is given."
        ),
        epilog=(
            "examples:\n"
            "  python scripts/convert_checkpoint.py v2-1_512-ema-pruned.ckpt v2-1_512.safetensors\n"
            "  python scripts/convert_checkpoint.py model.ckpt model-fp16.safetensors --half\n"
            "  python scripts/convert_checkpoint.py stable-diffusion-2-1-base/ sd21.safetensors\n"
            "  # only for a file you trust, whose pickle the safe loader refused:\n"
            "  python scripts/convert_checkpoint.py trusted.ckpt trusted.safetensors --trust-pickle"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def one_line_error(message):  # argparse's default also prints the usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    parser.add_argument("input", metavar="IN", help="input checkpoint (.ckpt, .pt, .pth, "
                        ".bin, .safetensors) or diffusers pipeline folder")
    parser.add_argument("output", metavar="OUT", help="output file, must end in .safetensors")
    parser.add_argument(
        "--half",
        action="store_true",
        help=(
            "store floating-point weights as float16; top-level buffers (keys without "
            "a '.', e.g. the diffusion schedule: betas, alphas_cumprod, ...) keep "
            "their precision"
        ),
    )
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src = Path(args.input)
    dst = Path(args.output)

    if dst.suffix.lower() != ".safetensors":
        return _fail(f"output {dst} must end in .safetensors")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        return _fail("input and output are the same file")
    if dst.exists() and not args.force:
        return _fail(f"output {dst} exists: pass --force to replace it")
    out_dir = dst.parent if str(dst.parent) else Path(".")
    if not out_dir.is_dir():
        missing = "is a file, not a folder" if out_dir.exists() else "does not exist"
        return _fail(f"output directory {out_dir} {missing}")

    import torch

    from ldm.checkpoint import CheckpointError, load_state_dict, save_safetensors
    from ldm.diffusers_layout import is_pipeline_folder, load_pipeline_folder

    if args.trust_pickle:
        print(
            f"warning: --trust-pickle: {src} may be unpickled with full pickle, "
            "which runs any code it contains",
            file=sys.stderr,
        )
    try:
        state_dict = load_pipeline_folder(src) if is_pipeline_folder(src) else \
            load_state_dict(src, trust_pickle=args.trust_pickle)
    except CheckpointError as exc:
        return _fail(str(exc))

    if args.half:
        state_dict = {
            key: (
                value.to(torch.float16)
                if value.is_floating_point() and "." in key
                else value
            )
            for key, value in state_dict.items()
        }

    metadata = {"format": "pt", "converted_from": src.name}
    try:
        save_safetensors(state_dict, dst, metadata=metadata)
    except OSError as exc:
        return _fail(f"cannot write {dst}: {exc.strerror or exc}")

    n_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    print(f"wrote {len(state_dict)} tensors ({n_bytes / 2**20:.1f} MiB) to {dst}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # never show a traceback to the user
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: unexpected failure: {type(exc).__name__}: {first}", file=sys.stderr)
        sys.exit(1)
