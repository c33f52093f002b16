"""Dispersed convolution: map a small (3x3) kernel to a large (5x5) one.

ScaleCrafter widens the receptive field of a pretrained convolution by replacing
its k_s x k_s kernel A with a k_l x k_l kernel B = R @ A (kernels flattened
row-major).  R is the least-squares solution of two wishes for every input x:

* structure level: conv(up(x), B) ~= up(conv(x, A))   (the large kernel on an
  upsampled input acts like the small kernel at the original resolution);
* pixel level:     conv(x, B)     ~= conv(x, A)        (weighted by eta, so the
  kernel still behaves on unscaled features).

up() is bilinear upsampling with aligned corners (n -> s(n-1)+1) and conv() is
zero-padded "same" cross-correlation.  Every error entry is linear in x, and
its coefficient on each x entry is one linear equation in (A, B).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so the solver CLI starts fast without it
    import torch

__all__ = ["solve_dispersion_transform", "load_dispersion_transform", "disperse_kernel"]


def _conv_matrix(kernel: np.ndarray, size: int) -> np.ndarray:
    """Matrix of zero-padded "same" cross-correlation on a flattened size x size input."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    mat = np.zeros((size * size, size * size))
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for u in range(k):
        for v in range(k):
            r, c = i + u - pad, j + v - pad
            # Taps falling outside the input read the zero padding. For one tap each
            # output row gets one entry, so the fancy-indexed += never collides.
            inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            mat[(i * size + j)[inside], (r * size + c)[inside]] += kernel[u, v]
    return mat


def _upsample_matrix(size: int, scale: int) -> np.ndarray:
    """Bilinear, corners-aligned upsampling size -> scale*(size-1)+1, on flattened images."""
    out = scale * (size - 1) + 1
    one_d = np.zeros((out, size))
    for i in range(out):
        # Aligned corners: output i sits at input coordinate i / scale exactly.
        lo, frac = divmod(i, scale)
        one_d[i, lo] += 1.0 - frac / scale
        if frac:
            one_d[i, lo + 1] += frac / scale
    # Separable: rows and columns are interpolated independently (row-major flattening).
    return np.kron(one_d, one_d)


def _unit_kernels(side: int):
    """The side*side unit kernels E_t, in row-major order of t."""
    for t in range(side * side):
        e = np.zeros(side * side)
        e[t] = 1.0
        yield e.reshape(side, side)


def _check_args(small, large, input_size, scale, eta) -> None:
    for name, val in (("small", small), ("large", large), ("input_size", input_size), ("scale", scale)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {val!r}")
        if val <= 0:
            raise ValueError(f"{name} must be positive, got {val}")
    if small % 2 == 0 or large % 2 == 0:
        raise ValueError(f"kernel sides must be odd (same padding), got small={small}, large={large}")
    if large <= small:
        raise ValueError(f"large ({large}) must be greater than small ({small})")
    if large > MAX_LARGE:
        raise ValueError(f"large ({large}) must be at most {MAX_LARGE}: the solver builds one "
                         f"conv matrix per large-kernel entry (large 51 ran for minutes)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise ValueError(f"eta must be a real number, got {eta!r}")
    if not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    need = _system_bytes(small, large, input_size, scale)
    if need > MAX_SYSTEM_BYTES:
        raise ValueError(
            f"small={small}, large={large}, input_size={input_size} and scale={scale} build a "
            f"{need / 2**30:.1f} GiB dense system (limit {MAX_SYSTEM_BYTES / 2**30:.0f} GiB); the "
            f"authors' transform is small 3, large 5, input_size 3, scale 2")


# The solver is dense: refuse sizes that would take minutes and many GiB before failing.
MAX_SYSTEM_BYTES = 4 * 2**30
MAX_LARGE = 15  # the published transform disperses 3x3 to 5x5


def _system_bytes(small, large, input_size, scale) -> int:
    """float64 bytes of the largest arrays the solver holds at once (conv matrix and the system)."""
    n2 = input_size ** 2
    m2 = (scale * (input_size - 1) + 1) ** 2
    rows = m2 * n2 + n2 * n2
    return 8 * (m2 * m2 + 2 * rows * (large ** 2 + small ** 2))


def solve_dispersion_transform(small: int = 3, large: int = 5, input_size: int = 3,
                               scale: int = 2, eta: float = 0.05) -> np.ndarray:
    """Solve for R (shape (large**2, small**2), float64) with large_kernel = R @ small_kernel."""
    _check_args(small, large, input_size, scale, eta)
    n = input_size
    m = scale * (n - 1) + 1
    up = _upsample_matrix(n, scale)

    # Each error's coefficient matrix (rows: output entries, cols: x entries) is
    # linear in the kernels, so its vectorisation is a column per unit kernel.
    # Structure: C_m(B) U - U C_n(A);  pixel: C_n(B) - C_n(A).
    lhs_struct = np.stack([(_conv_matrix(e, m) @ up).ravel() for e in _unit_kernels(large)], axis=1)
    rhs_struct = np.stack([(up @ _conv_matrix(e, n)).ravel() for e in _unit_kernels(small)], axis=1)
    lhs_pixel = np.stack([_conv_matrix(e, n).ravel() for e in _unit_kernels(large)], axis=1)
    rhs_pixel = np.stack([_conv_matrix(e, n).ravel() for e in _unit_kernels(small)], axis=1)

    lhs = np.vstack([lhs_struct, eta * lhs_pixel])
    rhs = np.vstack([rhs_struct, eta * rhs_pixel])
    # One lstsq for all small-kernel basis vectors at once: column a of R is B for A = E_a.
    # lstsq returns the minimum-norm solution if the system is rank deficient.
    R, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    return np.ascontiguousarray(R, dtype=np.float64)


def _is_square(v: int) -> bool:
    r = int(round(v ** 0.5))
    return v > 0 and r * r == v


class MissingTransform(FileNotFoundError, ValueError):
    """A transform path that names no file: bad input, as the settings files' errors are."""


def load_dispersion_transform(path) -> np.ndarray:
    """Load R from a .npy file or a MATLAB .mat file (key 'R', else its only array)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise MissingTransform(f"dispersion transform file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            R = np.load(path, allow_pickle=False)
        except (ValueError, EOFError):  # not an array file, or pickled objects (never loaded)
            raise ValueError(f"{path} is not a valid .npy file of numbers") from None
    elif suffix == ".mat":
        import scipy.io  # only needed for MATLAB files

        try:
            data = scipy.io.loadmat(str(path))
        except OSError:
            raise
        except Exception:  # scipy's MatReadError and the parsers' own errors
            raise ValueError(f"{path} is not a valid MATLAB .mat file") from None
        if "R" in data:
            R = data["R"]
        else:
            arrays = [k for k in data if not k.startswith("__")]
            if len(arrays) != 1:
                raise ValueError(f"{path}: no key 'R' and {len(arrays)} arrays ({arrays}); cannot pick one")
            R = data[arrays[0]]
    else:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r} (expected .npy or .mat)")

    R = np.asarray(R)
    if R.ndim != 2:
        raise ValueError(f"{path}: transform must be 2-D, got shape {R.shape}")
    if not (_is_square(R.shape[0]) and _is_square(R.shape[1])):
        raise ValueError(f"{path}: both dims must be square numbers (k*k), got shape {R.shape}")
    sides = [int(round(n ** 0.5)) for n in R.shape]
    if any(side % 2 == 0 for side in sides):  # a kernel centred on its pixel has an odd side
        raise ValueError(f"{path}: the transform maps {sides[1]}x{sides[1]} kernels to "
                         f"{sides[0]}x{sides[0]}; both sides must be odd, got shape {R.shape}")
    if not np.issubdtype(R.dtype, np.number) or np.iscomplexobj(R):
        raise ValueError(f"{path}: transform must be real numeric, got dtype {R.dtype}")
    if not np.isfinite(R).all():  # else every dispersed conv, and so every latent, is NaN
        raise ValueError(f"{path}: transform has NaN or infinite entries")
    return R.astype(np.float64)


def disperse_kernel(weight: torch.Tensor, R) -> torch.Tensor:
    """Map conv weights (out, in, k, k) to (out, in, K, K) via R (K*K, k*k), row-major."""
    import torch

    R = torch.as_tensor(R)
    if R.ndim != 2:
        raise ValueError(f"R must be 2-D, got shape {tuple(R.shape)}")
    if weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must be (out, in, k, k), got shape {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k * k != R.shape[1]:
        raise ValueError(f"weight kernel {k}x{k} does not match R with {R.shape[1]} columns")
    big = int(round(R.shape[0] ** 0.5))
    if big * big != R.shape[0]:
        raise ValueError(f"R rows ({R.shape[0]}) is not a square number")
    # Matmul in weight's dtype/device so the result can drop straight into F.conv2d.
    R = R.to(device=weight.device, dtype=weight.dtype)
    flat = weight.flatten(-2) @ R.T  # (out, in, k*k) @ (k*k, K*K) == R @ w per kernel
    return flat.reshape(*weight.shape[:2], big, big)
