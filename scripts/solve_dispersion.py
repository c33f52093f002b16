#!/usr/bin/env python
"""Solve ScaleCrafter's dispersion transform R and save it (.npy, or .mat with key 'R').

Example: python scripts/solve_dispersion.py --small 3 --large 5 --input-size 3 \
             --scale 2 --eta 0.05 --out R.npy
"""

import argparse
import sys
from pathlib import Path

# Let the script run from a plain checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ldm.scalecrafter.dispersion import solve_dispersion_transform  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=3, help="small kernel side (odd)")
    parser.add_argument("--large", type=int, default=5, help="large kernel side (odd, > small)")
    parser.add_argument("--input-size", type=int, default=3, help="side of the input feature map")
    parser.add_argument("--scale", type=int, default=2, help="integer upsampling factor")
    parser.add_argument("--eta", type=float, default=0.05, help="weight of the pixel-level equations")
    parser.add_argument("--out", required=True, help="output path, .npy or .mat")

    def one_line_error(message):  # argparse's default also prints the usage block
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".mat"):
        print(f"error: --out must end with .npy or .mat, got {args.out!r}", file=sys.stderr)
        return 2
    try:
        R = solve_dispersion_transform(args.small, args.large, args.input_size, args.scale, args.eta)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130

    try:
        if out.suffix.lower() == ".mat":
            import scipy.io

            scipy.io.savemat(str(out), {"R": R})
        else:
            with open(out, "wb") as f:  # (np.save given a path adds .npy to R.NPY)
                np.save(f, R)
    except OSError as exc:
        print(f"error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote R {R.shape[0]}x{R.shape[1]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
