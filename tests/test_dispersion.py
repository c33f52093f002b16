"""Tests for the dispersed-convolution transform (ldm/scalecrafter/dispersion.py)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.signal
import torch
import torch.nn.functional as F

from conftest import our_stderr
from ldm.scalecrafter.dispersion import (
    disperse_kernel,
    load_dispersion_transform,
    solve_dispersion_transform,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
REF_MAT = REFERENCE / "dispersion" / "R20to1_new.mat"


def _reference_R():
    # The reference is required: a missing file must fail, not skip.
    assert REF_MAT.is_file(), f"reference transform missing: {REF_MAT}"
    return scipy.io.loadmat(str(REF_MAT))["R"]


def _centre_tap_R(small=3, large=5):
    """R that embeds the small kernel in the centre of a zero large kernel."""
    off = (large - small) // 2
    R = np.zeros((large * large, small * small))
    for u in range(small):
        for v in range(small):
            R[(u + off) * large + (v + off), u * small + v] = 1.0
    return R


def _brute_force_system(small, large, n, scale, eta):
    """Equations built by evaluating the error maps on unit inputs and unit kernels.

    Uses scipy.signal.correlate2d for conv and torch's align_corners bilinear
    interpolation for up(); independent of the matrix construction in the module.
    """
    m = scale * (n - 1) + 1

    def up(img):
        t = torch.from_numpy(img)[None, None]
        return F.interpolate(t, size=(m, m), mode="bilinear", align_corners=True)[0, 0].numpy()

    def conv(img, k):
        return scipy.signal.correlate2d(img, k, mode="same", boundary="fill", fillvalue=0.0)

    def units(side):
        return [np.eye(side * side)[t].reshape(side, side) for t in range(side * side)]

    xs = units(n)
    # Row index = (x basis j, output entry); column = kernel tap.
    lhs_s = np.array([[conv(up(x), e).ravel() for e in units(large)] for x in xs])
    rhs_s = np.array([[up(conv(x, e)).ravel() for e in units(small)] for x in xs])
    lhs_p = np.array([[conv(x, e).ravel() for e in units(large)] for x in xs])
    rhs_p = np.array([[conv(x, e).ravel() for e in units(small)] for x in xs])

    def rows(a):  # (x, tap, out) -> (x*out, tap)
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])

    lhs = np.vstack([rows(lhs_s), eta * rows(lhs_p)])
    rhs = np.vstack([rows(rhs_s), eta * rows(rhs_p)])
    return lhs, rhs


def test_matches_reference_mat():
    R = solve_dispersion_transform(small=3, large=5, input_size=3, scale=2, eta=0.05)
    ref = _reference_R()
    assert R.dtype == np.float64 and R.shape == (25, 9)
    assert np.abs(R - ref).max() <= 1e-10


def test_load_reference_and_npy(tmp_path):
    ref = _reference_R()
    np.testing.assert_array_equal(load_dispersion_transform(REF_MAT), ref)
    np.save(tmp_path / "R.npy", ref)
    np.testing.assert_array_equal(load_dispersion_transform(tmp_path / "R.npy"), ref)
    # A .mat without key 'R' falls back to its single array.
    scipy.io.savemat(str(tmp_path / "other.mat"), {"W": ref})
    np.testing.assert_array_equal(load_dispersion_transform(tmp_path / "other.mat"), ref)


def test_load_rejects_bad_files(tmp_path):
    for kind in (FileNotFoundError, ValueError):  # bad input, as a missing settings file
        with pytest.raises(kind, match="not found"):
            load_dispersion_transform(tmp_path / "missing.npy")
    np.save(tmp_path / "bad_shape.npy", np.zeros((24, 9)))
    with pytest.raises(ValueError, match="square"):
        load_dispersion_transform(tmp_path / "bad_shape.npy")
    np.save(tmp_path / "even.npy", np.zeros((16, 9)))  # 4x4 kernels: no centre pixel
    with pytest.raises(ValueError, match=re.escape(
            "even.npy: the transform maps 3x3 kernels to 4x4; both sides must be odd")):
        load_dispersion_transform(tmp_path / "even.npy")
    np.save(tmp_path / "bad_ndim.npy", np.zeros(25))
    with pytest.raises(ValueError, match="2-D"):
        load_dispersion_transform(tmp_path / "bad_ndim.npy")
    scipy.io.savemat(str(tmp_path / "two.mat"), {"A": np.zeros((25, 9)), "B": np.zeros((25, 9))})
    with pytest.raises(ValueError, match="no key 'R'"):
        load_dispersion_transform(tmp_path / "two.mat")
    (tmp_path / "R.txt").write_text("1")
    with pytest.raises(ValueError, match="extension"):
        load_dispersion_transform(tmp_path / "R.txt")
    np.save(tmp_path / "nan.npy", np.full((25, 9), np.nan))
    with pytest.raises(ValueError, match="nan.npy: transform has NaN or infinite entries"):
        load_dispersion_transform(tmp_path / "nan.npy")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(small=4, large=5),
        dict(small=5, large=5),
        dict(small=3, large=6),
        dict(input_size=0),
        dict(scale=0),
        dict(scale=1.5),
        dict(eta=-0.1),
        dict(eta=float("nan")),
        dict(input_size=64, scale=4),  # a 172 GiB dense system: refused before it is built
        dict(large=51),  # minutes of conv matrices
    ],
)
def test_solver_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        solve_dispersion_transform(**kwargs)


def test_a_system_too_large_names_every_size_that_makes_it():
    with pytest.raises(ValueError, match=r"^small=3, large=5, input_size=64 and scale=4 build a "
                                         r"17\d\.\d GiB dense system"):
        solve_dispersion_transform(input_size=64, scale=4)


@pytest.mark.parametrize("name, data", [("text.npy", b"garbage"), ("text.mat", b"MATLAB junk")])
def test_a_file_that_is_no_transform_is_one_line_naming_it(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"{name} is not a valid") as error:
        load_dispersion_transform(tmp_path / name)
    assert "pickle" not in str(error.value)  # numpy's hint to load it unsafely is not passed on


@pytest.mark.parametrize("name", ["R.npy", "R.NPY"])
def test_cli_writes_matching_npy(tmp_path, name):
    out = tmp_path / name
    cmd = [sys.executable, str(REPO / "scripts" / "solve_dispersion.py"), "--small", "3", "--large", "5",
           "--input-size", "3", "--scale", "2", "--eta", "0.05", "--out", str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # (np.save adds .npy to R.NPY)
    R = np.load(out)
    assert R.dtype == np.float64
    assert np.abs(R - _reference_R()).max() <= 1e-10


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "solve_dispersion.py"), "--small", "4",
           "--out", str(tmp_path / "R.npy")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len(our_stderr(res.stderr)) == 1
    assert not (tmp_path / "R.npy").exists()


def test_centre_tap_dispersion_is_exact_conv():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    big = disperse_kernel(w, _centre_tap_R())
    assert big.shape == (4, 3, 5, 5) and big.dtype == w.dtype
    torch.testing.assert_close(F.conv2d(x, big, padding=2), F.conv2d(x, w, padding=1), rtol=0, atol=1e-12)


def test_disperse_kernel_is_row_major_matmul():
    torch.manual_seed(1)
    R = _reference_R()
    w = torch.randn(2, 5, 3, 3)
    big = disperse_kernel(w, R)
    assert big.dtype == torch.float32
    expected = np.einsum("ij,abj->abi", R, w.double().flatten(-2).numpy()).reshape(2, 5, 5, 5)
    np.testing.assert_allclose(big.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        disperse_kernel(torch.randn(2, 5, 5, 5), R)


def test_solution_satisfies_normal_equations():
    # The constant-input response (sum of taps) is NOT preserved by the solved R:
    # the reference's column sums range from 1.0 to ~1.127.  What holds exactly is
    # that the least-squares residual is orthogonal to the columns of the system.
    lhs, rhs = _brute_force_system(3, 5, 3, 2, 0.05)
    R = solve_dispersion_transform()
    residual = lhs @ R - rhs
    assert np.abs(lhs.T @ residual).max() <= 1e-12
    # And the centre tap maps to the centre tap: a 1x1 kernel needs no dispersion.
    np.testing.assert_allclose(R[:, 4], _centre_tap_R()[:, 4], atol=1e-12)


def test_other_parameters_match_brute_force():
    params = dict(small=3, large=7, input_size=4, scale=3, eta=0.1)
    lhs, rhs = _brute_force_system(3, 7, 4, 3, 0.1)
    assert np.linalg.matrix_rank(lhs) == lhs.shape[1]  # unique least-squares solution
    expected = np.linalg.solve(lhs.T @ lhs, lhs.T @ rhs)
    R = solve_dispersion_transform(**params)
    assert R.shape == (49, 9)
    assert np.abs(R - expected).max() <= 1e-9


def test_brute_force_reproduces_reference():
    # Cross-check that the independent construction also lands on the authors' file.
    lhs, rhs = _brute_force_system(3, 5, 3, 2, 0.05)
    expected, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    assert np.abs(expected - _reference_R()).max() <= 1e-10


@pytest.mark.parametrize("kwargs, message", [
    (dict(dilation={"a": 2}, dilate_tau=5, disperse=frozenset({"a"})), "needs a transform"),
    (dict(dilation={"a": 2}, dilate_tau=5, disperse=frozenset({"a"}), transform=np.eye(25, 9),
          inflate_tau=6), r"--inflate_tau \(6\) must not exceed --dilate_tau \(5\)"),
    (dict(dilation={"a": 2}, dilate_tau=5, disperse=frozenset({"b"}), transform=np.eye(25, 9),
          inflate_tau=5), "dispersed conv b has no dilation factor"),
])
def test_settings_that_cannot_disperse_are_refused(kwargs, message):
    from ldm.scalecrafter.schedule import ScaleCrafterSettings

    with pytest.raises(ValueError, match=message):
        ScaleCrafterSettings(**kwargs)
    ScaleCrafterSettings(**{**kwargs, "disperse": frozenset({"a"}), "transform": np.eye(25, 9),
                            "inflate_tau": 5})  # the same, made right, is accepted


def test_cli_ctrl_c_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from conftest import load_script

    script = load_script("solve_dispersion")

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(script, "solve_dispersion_transform", interrupted)
    out = tmp_path / "R.npy"
    assert script.main(["--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted: nothing was written"]
    assert not out.exists()
