"""Fast checks of scripts/benchmark.py: its cases, JSON report and table on the tiny model.

The cases run in this process (the script runs each in a fresh subprocess for its peak memory);
no timing is asserted, only the report's shape and types."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REF

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine every OpenMP barrier of a tiny op can wait
    for a time slice, which makes the tiny cases many times slower (nothing here is timed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_process(bench):
    return lambda name, params, device: bench.run_case(name, params, device)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_tiny_run_writes_json_and_table(bench, tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--sides", "8", "--ratio-side", "8", "--decode-side", "8", "--overlap", "2",
            "--json", str(out)]
    assert bench.main(argv, runner=_in_process(bench)) == 0
    report = json.loads(out.read_text())
    for key in ("redilation_step_ratio", "ndcfg_step_ratio", "tiled_decode_time_ratio",
                "tiled_decode_time_ratio_seed_tiling"):
        assert _number(report[key]) and report[key] > 0, key
    # peaks above the baseline are a few pages at this size, or none (the peak starts over at
    # the baseline, and freed memory is reused): in-process, a ratio or none is all that holds
    ratio = report["tiled_decode_peak_ratio"]
    assert _number(ratio) or (ratio is None and report["details"]["decode_full"][
        "peak_above_baseline_gb"] <= 0)
    assert report["device"] == "cpu"
    assert list(report["unet_cfg_call"]) == ["8"]
    call = report["unet_cfg_call"]["8"]
    assert _number(call["seconds"]) and call["seconds"] > 0
    assert _number(call["peak_gb"]) and call["peak_gb"] > 0
    guidance = report["details"]["guidance"]
    # the seam really ran CFG (2B rows), and ndcfg added B more rows (in one call or two)
    batches = guidance["unet_batches"]
    assert batches["plain"] == [2] and batches["dilated"] == [2]
    assert sum(batches["ndcfg"]) == 3
    assert guidance["dilated_convs"] > 0
    assert report["details"]["decode_tiled_seed"]["tiles"] == 9  # half-side + overlap: 3 x 3
    assert report["tiled_decode_area_ratio_seed_tiling"] == (3 * 4 / 8) ** 2  # 3 tiles of 4 on 8
    assert report["details"]["decode_tiled"]["tiles"] == 1  # auto: the whole latent fits
    assert report["details"]["decode_tiled_2x2"]["tiles"] == 4
    table = capsys.readouterr().out
    assert "| re-dilated / plain CFG call" in table
    assert "| 8 | 64² |" in table
    # the targets are for full-size models: a tiny run gives no verdict
    assert "MISSED" not in table and " met |" not in table and "– (tiny model)" in table
    _check_decode_verdicts(bench, report)


def _row(table, start):
    (row,) = [line for line in table.splitlines() if line.startswith(start)]
    return row


def _check_decode_verdicts(bench, report):
    """Each tiling is judged by its own target: auto by <= 1.3x time and a lower peak, the
    seed's tiling by 1.15x its decoded-area ratio (2.25x here: 3 tiles of 4 on 8), its peak
    only reported."""
    report["meta"]["tiny"] = False  # read as a full-size run's figures
    report.update(tiled_decode_time_ratio=1.25, tiled_decode_peak_ratio=0.9,
                  tiled_decode_time_ratio_seed_tiling=2.55,
                  tiled_decode_peak_ratio_seed_tiling=1.2)
    table = bench.markdown_table(report)
    auto_time = _row(table, "| tiled SyncGN (auto) / full decode, time")
    assert auto_time.endswith("| ≤ 1.3 | met |")
    assert "the whole latent fits the budget" in auto_time
    assert _row(table, "| tiled SyncGN (auto) / full decode, peak").endswith("| < 1 | met |")
    seed_time = "| tiled SyncGN (seed tiling) / full decode, time"
    assert _row(table, seed_time).endswith("| ≤ 1.15 × area = 2.59 | met |")
    assert _row(table, "| tiled SyncGN (seed tiling) / full decode, peak").endswith(
        "| – (reported) | – |")
    report.update(tiled_decode_time_ratio=1.35, tiled_decode_time_ratio_seed_tiling=2.6)
    table = bench.markdown_table(report)
    assert _row(table, "| tiled SyncGN (auto) / full decode, time").endswith("| MISSED |")
    assert _row(table, seed_time).endswith("| MISSED |")


def test_report_of_failed_case_keeps_keys(bench):
    results = {"unet_256": {"error": "case unet failed: killed by signal 9 (out of memory?)"}}
    report = bench.build_report(results, "cpu")
    assert report["redilation_step_ratio"] is None
    assert report["unet_cfg_call"]["256"]["seconds"] is None
    assert "out of memory" in report["unet_cfg_call"]["256"]["error"]
    assert "killed by signal 9" in bench.markdown_table(report)


def test_two_by_two_tile_covers_with_two_tiles(bench):
    from ldm.scalecrafter.tiled_decode import plan_axis

    for side, overlap in ((64, 8), (128, 8), (96, 0), (256, 16)):
        assert len(plan_axis(side, bench.two_by_two_tile(side, overlap), overlap)) == 2


@pytest.mark.parametrize("argv, message", [
    (["--sides", "0"], "positive multiples of 8"),
    (["--sides", "60"], "positive multiples of 8"),
    (["--only", "decode,foo"], "--only takes"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--overlap", "3"], "--overlap must be even"),
    (["--decode-side", "16", "--overlap", "8"], "must be smaller than the tile"),
    (["--tile-size", "2x8", "--overlap", "4"], "must be smaller than the tile (2 latent"),
    (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["--json", "/tmp"], "--json: /tmp is a folder; name the file to write"),
    (["--decode-budget-gb", "nan"], "--decode-budget-gb must be a positive number of GiB"),
    (["--decode-budget-gb", "0"], "got 0"),
    (["--decode-budget-gb", "1e300"], "--decode-budget-gb must be a positive number of GiB"),
])
def test_bad_flags_are_one_line_errors(bench, capsys, argv, message):
    assert bench.main(argv, runner=None) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unparseable_flag_is_one_line(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sides", "a,b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def _txt2img_in_process(txt2img):
    """subprocess.run for the CLI case, run in this process (its imports are done already)."""
    import contextlib
    import io
    import subprocess

    def run(cmd, **_):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = txt2img.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, code, "", err.getvalue())
    return run


def test_gpu_cases_run_on_the_tiny_model(bench, one_thread, tmp_path, txt2img, monkeypatch):
    """The --device cuda cases, on the CPU with the tiny model and tiny sizes, in this process
    (the CLI case too): they run, and the table names every row of issue 11 (nothing is timed
    here)."""
    gpu = bench.benchmark_gpu
    monkeypatch.setattr(gpu.subprocess, "run", _txt2img_in_process(txt2img))
    run = lambda name, **p: bench.run_case(name, {"tiny": True, **p}, "cpu")
    results = {
        "sample_1024": run("sample", side=8, steps=3, warmup_steps=1, variants={
            **gpu.SWITCH_VARIANTS, "plain": {}, "dilated": {"dilate_tau": 1}}),
        "sample_1024_channels_last": run("sample", side=8, steps=3, warmup_steps=1,
                                         channels_last=True, variants={
                                             "channels_last": gpu.REFERENCE_KERNELS,
                                             "all_channels_last": {}}),
        "sample_4096_preset": run("whole", side=16, steps=2, warmup_steps=1,
                                  preset="sd2.1_4096x4096_experimental", budget_gb=1e-4),
        "sample_sdxl_4096_preset": run("whole", side=16, steps=2, warmup_steps=1,
                                       preset="sdxl_4096x4096", budget_gb=1e-4,
                                       config=str(REF / "tiny-sdxl" / "tiny-sdxl.yaml")),
        # a budget the plain decoder's estimate exceeds: the banded one runs
        "decode_256_full": run("decode", side=8, mode="full", repeats=1, budget_gb=1e-6),
        "decode_256_plain": run("decode", side=8, mode="plain", repeats=1, budget_gb=1e-6),
        "sdxl_unet_128": run("sdxl_unet", side=8, repeats=1, warmup=False),
        "cli_1024": run("cli", workdir=str(tmp_path),
                        extra=["--H", "64", "--W", "64", "--steps", "2", "--overlap", "2"]),
    }
    assert set(results["sample_1024"]["seconds"]) == {*gpu.SWITCH_VARIANTS, "plain", "dilated"}
    assert results["sample_1024"]["kernels"]["native_norms"] == {
        "cudnn_benchmark": False, "native_norms": True, "cudnn_attention": False}
    assert results["sample_1024"]["channels_last"] is False  # txt2img's layout
    assert set(results["sample_1024_channels_last"]["seconds"]) == {
        "channels_last", "all_channels_last"}
    assert results["sample_4096_preset"]["decode_seconds"] > 0
    assert results["sample_4096_preset"]["channels_last"] is False  # the device's default
    assert results["cli_1024"]["seconds"] > 0, results["cli_1024"]
    assert results["cli_1024"]["first_run"]["seconds"] > 0  # two runs: the figure is the second
    table = gpu.markdown(results, "cpu")
    assert "re-dilated / plain 1024² run (1 of 3 steps dilated)" in table
    assert "plain 1024² 3-step sample, native-norms / reference kernels" in table
    assert "plain 1024² 3-step sample, all together / reference kernels" in table
    assert set(results["cli_1024"]["phases"]) == {"startup", "load", "sample", "decode", "write",
                                                  "total"}
    assert "plain 1024² 3-step sample, cudnn-attention / reference kernels" in table
    assert "plain 1024² 3-step sample, all + channels-last / reference kernels" in table
    assert "plain 1024² 3-step sample (default kernels: none)" in table  # the CPU's
    assert len(gpu.rows(results)) == 20 and "CLI wall time" in table
    # `--only cli` prints its own row, not the other items' dashes
    only_cli = gpu.markdown(results, "cpu", ("cli",)).splitlines()[4:]
    assert len(only_cli) == 1 and only_cli[0].startswith("| CLI wall time, the seed's 1024² ")
    assert [label for label, *_ in gpu.rows(results, ("decode", "sample", "cli", "sdxl"))] == [
        label for label, *_ in gpu.rows(results)]
    assert "| SDXL UNet CFG call, 1024² (fp16 weights under autocast) | " in table
    assert "(random full-size .ckpt, the second run; the first took " in table
    assert results["decode_256_full"]["path"] == "lean"
    assert results["decode_256_plain"]["path"] == "plain"
    assert "full decode 2048², time / peak (lean decoder)" in table
    assert "banded / plain decoder, time" in table
    assert "SDXL sdxl_4096x4096 preset, whole-run peak (2 steps" in table
    assert results["sample_sdxl_4096_preset"]["weights_gb"]["conditioner"] > 0
    assert results["sample_sdxl_4096_preset"]["peak_gb"] > 0


def test_sdxl_unet_case_on_a_card_is_laid_out_as_txt2img(bench):
    """On CUDA the SDXL UNet case runs as txt2img would (`prepare_for_inference`, autocast, the
    sampling kernel switches); the same helper on the CPU, under the CPU's bf16 autocast,
    gives the fp32 call's numbers to half-precision tolerance."""
    from omegaconf import OmegaConf

    from ldm.util import load_config

    node = load_config(bench.SDXL_CONFIG).model.params.network_config
    node.params = OmegaConf.merge(node.params, bench.TINY_SDXL_UNET)
    torch.manual_seed(0)
    unet, kernels = bench._as_txt2img(node, torch.device("cpu"))
    reference = bench._build(node, "cpu")
    reference.load_state_dict(unet.state_dict())
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, node.params.context_dim)
    y, t = torch.randn(2, node.params.adm_in_channels), torch.tensor([500, 500])
    with torch.no_grad():
        with kernels():
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
            got = unet(x, t, context=ctx, y=y).float()
        want = reference(x, t, context=ctx, y=y)
    assert (got - want).norm() / want.norm() < 3e-2  # bf16 keeps 8 bits: 1.4e-2 here


def test_sample_rows_time_txt2img_s_defaults(bench):
    """The plain and re-dilated 1024² runs, and the compiled one, use txt2img's layout (the
    device's default); channels-last is timed in a case of its own."""
    gpu = bench.benchmark_gpu
    planned = {key: p for key, _, p in gpu.plan(SimpleNamespace(
        only=["sample"], decode_budget_gb=None, sample_steps=50, preset_steps=3, compile=True))}
    assert {"plain", "dilated", *gpu.SWITCH_VARIANTS} == set(planned["sample_1024"]["variants"])
    assert planned["sample_1024"]["variants"]["dilated"] == {"dilate_tau": 20}
    for key in ("sample_1024", "sample_1024_compile"):
        assert planned[key].get("channels_last") is None, key
    assert planned["sample_1024_channels_last"]["channels_last"] is True


def test_card_cases_keep_the_presets_share_of_dilated_steps(bench, one_thread):
    """`--only card24` (opt-in, on CUDA): the 4096² preset's taus scaled to its 5 steps; its
    case runs on the tiny model (no compile, no limit on the CPU) and fills the card rows."""
    gpu = bench.benchmark_gpu
    eager, graphs = gpu.card_cases()
    # --compile's own mode on CUDA (channels-last since run 7), with CUDA graphs on top
    assert graphs[2]["compile_modes"] == {"channels_last": True, "cuda_graphs": True}
    assert not eager[2].get("compile")
    planned = gpu.plan(SimpleNamespace(only=["card24"], decode_budget_gb=None))
    assert [key for key, *_ in planned] == ["card24_4096", "card24_4096_graphs"]
    opts = gpu._options(eager[2])
    assert (opts.dilate_tau, opts.ndcfg_tau, opts.inflate_tau, opts.steps) == (2, 2, 2, 3)
    assert gpu._options(gpu.card_cases(5)[0][2]).inflate_tau == 3  # 35 of 50: rounded down
    params = {**eager[2], "tiny": True, "side": 16}
    result = bench.run_case("whole", params, "cpu")
    assert result["decode_tiles"] >= 1 and result["decode_budget_gb"] > 0, result
    assert result["card_gb"] == gpu.CARD_GB
    # a whole run: the text encoder is held with the UNet and the VAE
    assert set(result["weights_gb"]) == {"model", "first_stage_model", "cond_stage_model"}
    assert min(result["weights_gb"].values()) > 0
    rows = gpu.rows({"card24_4096": result}, ("card24",))
    assert [r[0].split(":")[0] for r in rows] == [
        "4096² experimental preset within 24 GB, eager",
        "4096² experimental preset within 24 GB, compiled, CUDA graphs"]
    assert "decode 1 tiles" in rows[0][0] and rows[0][3] is None  # no reserved peak on a CPU
    encoder = result["weights_gb"]["cond_stage_model"]
    assert "of them text encoder(s)" in rows[0][0] and f"{encoder:.1f} of them" in rows[0][0]
    assert gpu.rows({"card24_4096": result}) == gpu.rows({})  # not among the default rows


def test_the_compiled_sample_is_an_opt_in_item_with_the_sample_target(bench):
    """`--only compiled` (on CUDA): the plain 1024² sample's whole loop with `--compile`'s UNet,
    judged by the sample target; `--only sample --compile` plans the same case once."""
    gpu = bench.benchmark_gpu
    args = SimpleNamespace(only=["compiled"], sample_steps=50, decode_budget_gb=None,
                           compile=False)
    ((key, name, params),) = gpu.plan(args)
    assert (key, name, params["compile"], params["steps"], params["side"]) == (
        "sample_1024_compile", "sample", True, 50, 128)
    args = SimpleNamespace(only=["sample", "compiled"], sample_steps=50, decode_budget_gb=None,
                           compile=True, preset_steps=3)
    assert [k for k, *_ in gpu.plan(args)].count("sample_1024_compile") == 1
    results = {"sample_1024_compile": {"steps": 50, "seconds": {"plain": 1.25}}}
    ((label, text, target, value, _),) = gpu.rows(results, ("compiled",))
    assert "--compile (the whole loop" in label and (text, target, value) == (
        "1.25 s", "≤ 1.3 s (50 steps)", 1.25)
    assert all("--compile (the whole" not in row[0] for row in gpu.rows(results))  # opt-in


def test_a_compiled_sample_is_laid_out_as_compile_lays_it_out(bench, monkeypatch):
    """The compiled case times what `--compile` runs: the device's COMPILE_MODES layout
    (CUDA: channels-last), not the eager default (run 7 adopted it for 1.22 s against 1.41)."""
    from ldm import precision

    gpu, seen = bench.benchmark_gpu, []

    class Built(Exception):
        pass

    def capture(device, layout, config):
        seen.append(layout["channels_last"])
        raise Built

    monkeypatch.setitem(precision.COMPILE_MODES, "cpu", {"channels_last": True})
    monkeypatch.setattr(gpu, "_unet_and_schedule", capture)
    for compiled in (True, False):
        with pytest.raises(Built):
            gpu.case_sample({"compile": compiled, "side": 8, "steps": 1}, bench.Meter("cpu"))
    assert seen == [True, False]


def test_saved_gpu_report_shows_the_items_it_ran(bench, tmp_path):
    """`benchmark_gpu.py report.json` prints the rows of the items the report ran (older
    reports, without the list: the default items)."""
    gpu = bench.benchmark_gpu
    results = {"card24_4096": {"steps": 3, "reserved_peak_gb": 20.5, "peak_gb": 18.25}}
    report = bench._report(results, "cuda", {}, True, ["card24"])
    path = tmp_path / "card24.json"
    path.write_text(json.dumps(report))
    rows = gpu.saved_table(path).splitlines()[4:]
    assert len(rows) == 2 and "| 20.50 GB / 18.25 GB | runs |" in rows[0]
    del report["items"]
    path.write_text(json.dumps(report))
    assert len(gpu.saved_table(path).splitlines()[4:]) == len(gpu.rows({}))


def test_the_saved_report_script_takes_help_and_refuses_a_missing_file(bench, tmp_path, capsys):
    gpu = bench.benchmark_gpu
    with pytest.raises(SystemExit) as done:
        gpu.main(["--help"])
    assert done.value.code == 0 and "report" in capsys.readouterr().out
    assert gpu.main([str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read the report")


def test_a_card_limit_names_the_cuda_device_by_index(bench, monkeypatch):
    """torch refuses `set_per_process_memory_fraction(..., torch.device("cuda"))` (no index):
    the 24 GB card limit of `card24` passes the current device's index (run 7 found the same
    call failing in gpu_check)."""
    import torch

    calls = []

    def by_index(name, value):
        def record(*args):
            device = args[-1]
            if not isinstance(device, int):
                raise ValueError(f"Expected a torch.device with a specified index, got {device}")
            calls.append((name, *args))
            return value
        return record

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", by_index("info", (10, 48 * 2 ** 30)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", by_index("limit", None))
    bench.benchmark_gpu._as_card(torch.device("cuda"), {"card_gb": 24})
    assert calls == [("info", 3), ("limit", 0.5, 3)]


def test_ctrl_c_is_one_line_and_status_130(bench, capsys):
    def runner(*args, **kwargs):
        raise KeyboardInterrupt

    assert bench.main(["--tiny", "--only", "decode"], runner=runner) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: no figures were written"


def test_ctrl_c_after_finished_cases_names_the_json_that_holds_them(bench, capsys, tmp_path):
    out, calls = tmp_path / "bench.json", []

    def runner(name, params, device):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"side": params["side"], "seconds": 1.0, "peak_above_baseline_gb": 0.1}

    argv = ["--tiny", "--only", "decode", "--decode-side", "8", "--overlap", "2",
            "--json", str(out)]
    assert bench.main(argv, runner=runner) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: the 1 finished case(s) are in {out}")
    assert list(json.loads(out.read_text())["details"]) == ["decode_full"]


def test_each_case_runs_in_a_fresh_process(bench, monkeypatch, tmp_path):
    """A case's peak memory is its own only in a process of its own: the default runner
    starts one interpreter per case, and its JSON line comes back."""
    started, run = [], bench.subprocess.run

    def spy(cmd, **kwargs):
        started.append(cmd[cmd.index("--case") + 1])
        return run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", spy)
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--only", "guidance", "--ratio-side", "8", "--repeats", "1",
            "--json", str(out)]
    assert bench.main(argv) == 0
    assert started == ["guidance"]
    assert _number(json.loads(out.read_text())["redilation_step_ratio"])


def test_a_case_out_of_memory_is_its_result_not_a_failed_process(bench, monkeypatch, capsys):
    """card24 asks whether a run fits 24 GB: running out of memory is an answer, the row's
    note, not a bare 'exit status 1' with the reason left in a log."""
    import torch

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(bench, "run_case", out_of_memory)
    assert bench.main(["--case", "whole", "--case-params", "{}"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_a_gpu_check_part_stopped_by_its_timeout_still_reports_its_cases(bench, tmp_path):
    """gpu_check.sh: when a benchmark part meets its timeout (no table printed), the cases its
    JSON holds are rendered into the summary all the same."""
    import os
    import stat
    import subprocess
    import sys

    results = {"card24_4096": {"steps": 3, "reserved_peak_gb": 20.5, "peak_gb": 18.25}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps(bench._report(results, "cuda", {}, True, ["card24"])))
    fake = tmp_path / "python"  # benchmark.py "timed out" after writing its JSON
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = - ]; then cat >/dev/null; exit 0; fi  # the script's import check: skipped here
if [ "$1" = scripts/benchmark.py ]; then
  while [ $# -gt 0 ]; do [ "$1" = --json ] && cp {report} "$2"; shift; done
  exit 124
fi
exec {sys.executable} "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out)}
    run = subprocess.run(["bash", str(REPO / "shellscripts" / "gpu_check.sh"), "card24"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| 20.50 GB / 18.25 GB | runs |" in (out / "summary.txt").read_text()
