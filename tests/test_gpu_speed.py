"""scripts/gpu_speed.py, the GPU time diagnosis, runs its parts on the tiny model (CPU)."""
import json
import time

import pytest
import torch

from conftest import TINY_CKPT, TINY_CONFIG, load_script, reference, rel_err
from ldm.precision import unet_of


@pytest.fixture(scope="module")
def speed():
    return load_script("gpu_speed")


@pytest.mark.parametrize("name,kind", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128", "conv"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>", "norm"),
    ("void at::native::group_norm_kernel<c10::Half>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
     "elementwise"),
    ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", "copy"),
    ("triton_red_fused_convolution_native_group_norm_silu_3", "triton"),
])
def test_kernels_are_sorted_by_kind(speed, name, kind):
    assert speed.kind_of(name) == kind


def test_tflops_by_kind(speed):
    assert speed.kind_tflops({"attention": 4e12, "conv": 3e12, "gemm": 1e12},
                             {"attention": 10.0, "conv": 0.0, "norm": 2.0}) == {"attention": 400.0}


def test_profile_and_cold_decode_parts_run_on_the_tiny_model(speed):
    cpu = torch.device("cpu")
    prof = speed.part_profile({"side": 8, "tiny": True, "rounds": 1}, cpu)
    assert prof["flops_per_call"] > 0 and prof["seconds_per_call"] > 0
    # (the CPU's fused attention op has no FLOP formula in PyTorch's counter; CUDA's have)
    assert {"conv", "gemm"} <= set(prof["flops_by_kind"]) <= {"attention", "conv", "gemm"}
    assert sum(prof["flops_by_kind"].values()) == prof["flops_per_call"]
    assert set(prof["variants_seconds"]) == {"default", "cudnn_attention", "flash_only",
                                             "channels_last"}
    cold = speed.part_cold_decode({"side": 8, "tiny": True, "overlap": 2}, cpu)
    assert cold["cold_seconds"] > 0 and cold["warm_seconds"] > 0
    assert cold["top_host_ops_cold_ms"]
    lines = speed.summary({"profile": prof, "cold_decode": cold, "compile": {"error": "x"}})
    assert lines[0].startswith("- 64² CFG UNet call:")
    assert any(line.startswith("- 64² tiled decode (cold_decode): cold") for line in lines)
    assert cold["conv_calls"] >= cold["conv_shapes"] > 0
    assert "- compile: x" in lines


def test_eager_layouts_part_lays_out_the_tiny_model_three_ways(speed, tiny_pipe):
    """`eager_layouts`: the call as it runs turns channels-last at the first SpatialTransformer
    (its output is a channels-last view, which the convs after it keep); the NCHW copy has no
    channels-last conv input, the channels-last one more than as run; all give the same
    numbers."""
    got = speed.part_eager_layouts({"side": 8, "tiny": True, "rounds": 1}, torch.device("cpu"))
    inputs = got["conv_inputs"]
    assert inputs["as_run"]["convs"] == inputs["nchw"]["convs"] == inputs["channels_last"]["convs"]
    assert inputs["nchw"]["channels_last"] == 0
    assert 0 < inputs["as_run"]["channels_last"] < inputs["channels_last"]["channels_last"]
    assert set(got["rel_err_vs_as_run"]) == {"nchw", "channels_last"}
    # the part's calls run random weights in bf16 on the CPU (2-3e-2 apart); in float32 every
    # layout of the tiny checkpoint's UNet gives the published code's numbers
    data = reference("tiny-sd21-unet-vanilla.npz")
    with torch.no_grad():
        outs = {name: net(*(torch.from_numpy(data[k]) for k in ("x", "t")),
                          context=torch.from_numpy(data["context"]))
                for name, net in speed._eager_layout_nets(unet_of(tiny_pipe.model)).items()}
    assert outs["nchw"].is_contiguous() and not outs["as_run"].is_contiguous()
    for name, out in outs.items():
        assert rel_err(out, data["out"]) <= 1e-4, name  # the bound of every reference check
    assert set(got["seconds"]) == set(speed.EAGER_LAYOUTS)
    got["seconds"] = {"as_run": 0.0383, "nchw": 0.0361, "channels_last": 0.0450}
    got.update(kernel_ms_nchw={"conv": 7.0, "norm": 5.0}, gpu_busy_ms_nchw=12.0,
               top_kernels_nchw=[
                   ["void cudnn::engines_precompiled::nchwToNhwcKernel<__half>", 2.5],
                   ["sm90_xmma_fprop_implicit_gemm_f16f16", 1.0],
                   ["void cudnn::engines_precompiled::nhwcToNchwKernel<__half>", 0.5]])
    lines = speed.summary({"eager_layouts": got})
    assert (f"- eager call, layout nchw: 36.1 ms, 0 of {inputs['nchw']['convs']} conv inputs "
            "channels-last; GPU busy 12.0 ms (conv 7.0, norm 5.0), layout conversions 3.00 ms"
            ) in lines
    got["gpu_busy_ms_as_run"] = 13.0
    assert speed.decisions({"eager_layouts": got})["nchw_transformer_outputs"] == (
        True, "+2.20 ms a step, GPU busy +1.00 ms")
    # run 6 on an H200, the second of two runs: less GPU time but a slower wall time (host
    # noise) is no verdict for the change
    got["seconds"] = {"as_run": 0.0440, "nchw": 0.0471, "channels_last": 0.0444}
    got.update(gpu_busy_ms_as_run=35.2, gpu_busy_ms_nchw=34.2)
    assert speed.decisions({"eager_layouts": got})["nchw_transformer_outputs"] == (
        False, "-3.10 ms a step, GPU busy +1.00 ms")


def test_compiled_call_kernels_are_profiled_and_reported(speed):
    """The compile part profiles the compiled plain call on CUDA; on the CPU the profile has
    no GPU kernels, which must still give a well-formed (empty) table."""
    got = speed._kernels_of(lambda: torch.ones(4) * 2, torch.device("cpu"), "compiled")
    assert got == {"kernel_ms_compiled": {}, "top_kernels_compiled": [],
                   "gpu_busy_ms_compiled": 0}
    comp = {"compile_seconds": 98.0, "routed_compile_seconds": 101.0, "rel_err_vs_eager": 2e-3,
            "redilated_rel_err_vs_eager": 2e-3, "first_routed_plain_call_seconds": 0.03,
            "seconds": {"eager": 0.0444, "compiled": 0.0279, "compiled_routed": 0.0303,
                        "eager_redilated": 0.0549, "compiled_redilated": 0.0363},
            "kernel_ms_compiled": {"conv": 8.7, "triton": 9.1}, "gpu_busy_ms_compiled": 25.0,
            "top_kernels_compiled": [["triton_poi_fused_0", 1.25]]}
    lines = speed.summary({"compile": comp})
    assert "- GPU ms per compiled plain call by kind: conv 8.7, triton 9.1 (busy 25.0)" in lines
    assert "  - 1.25 ms triton_poi_fused_0" in lines


def test_load_probe_times_every_step_of_the_load(speed, capsys):
    speed.load_probe(str(TINY_CKPT), str(TINY_CONFIG), "cpu", 8)
    seconds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds"]
    assert list(seconds)[:5] == ["import_torch", "cuda_start", "import_open_clip", "import_ldm",
                                 "meta_build"]
    assert {"read_checkpoint", "weights_to_device", "first_text_encode",
            "2_steps_autotune_first", "2_steps_cudnn_attention_first"} <= set(seconds)


def test_parts_have_a_function_and_a_timeout_within_the_shell_budget(speed):
    assert set(speed.PART_FUNCTIONS) == set(speed.TIMEOUTS) == set(speed.PARTS)
    sets = speed.PART_SETS.values()
    assert {p for parts in sets for p in parts} == set(speed.PARTS)  # each in a set
    for parts in sets:  # gpu_check.sh's timeout for one part set
        assert sum(speed.TIMEOUTS[p] for p in parts) <= 530


def test_a_part_stopped_by_its_timeout_keeps_what_it_reported(speed, monkeypatch):
    def stopped(cmd, **kwargs):
        raise speed.subprocess.TimeoutExpired(cmd, kwargs["timeout"],
                                              output=b'{"compile_seconds": 80.5}\nW1127 x\n')
    monkeypatch.setattr(speed.subprocess, "run", stopped)
    got = speed.run_part("compile", {}, "cpu", 240)
    assert got == {"compile_seconds": 80.5, "error": "stopped at its 240 s timeout"}
    lines = speed.summary({"compile": got})
    assert "- torch.compile, seconds to compile: compile_seconds 80" in lines
    assert "- compile: stopped at its 240 s timeout" in lines

    def silent(cmd, **kwargs):
        raise speed.subprocess.TimeoutExpired(cmd, kwargs["timeout"])
    monkeypatch.setattr(speed.subprocess, "run", silent)
    assert speed.run_part("cli", {}, "cpu", 140) == {"error": "stopped at its 140 s timeout"}

    def failed(cmd, **kwargs):  # e.g. a CUDA-graphs error after the compile was timed
        return speed.subprocess.CompletedProcess(cmd, 1, stdout='{"compile_seconds": 80.5}\n')
    monkeypatch.setattr(speed.subprocess, "run", failed)
    assert speed.run_part("compile", {}, "cpu", 240) == {"compile_seconds": 80.5,
                                                          "error": "exit status 1"}


def test_a_variant_that_failed_to_compile_is_reported_not_a_crash(speed):
    """A frozen or CUDA-graphs compile that failed leaves only the eager figure: the decisions
    (and the report and --summarize around them) go on without it, not with a KeyError."""
    results = {"compile": {"seconds": {"eager": 0.038, "compiled": 0.028},
                           "compile_seconds": 84.0},
               "compile_cudagraphs": {"variants": {}, "seconds": {"eager": 0.038},
                                      "errors": {"compiled_cudagraphs": "RuntimeError: x"}}}
    decided = speed.decisions(results)
    assert "compile" in decided and "cuda_graphs" not in decided


@pytest.fixture
def one_conv_unet(speed, monkeypatch, cuda_graph_plumbing):
    """The compile parts' UNet call, with a one-conv stand-in for the UNet (tracing the tiny
    UNet takes 20 s). Dynamo's graphs go with the test: each part runs in a fresh process."""
    x = torch.randn(2, 4, 8, 8)

    def unet_call(p, device):  # a fresh UNet for each part, as each part's own process builds
        stand_in = torch.nn.Conv2d(4, 4, 3, padding=1)

        def call(net=None, **_):
            with torch.no_grad():
                return (stand_in if net is None else net)(x)
        return call, stand_in
    monkeypatch.setattr(speed, "_unet_call", unet_call)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def set_figures(got, eager, **figures):
    """A compile-variant part's figures as a card would give them: {label: (seconds a call,
    seconds to compile)}."""
    got["seconds"] = {"eager": eager, **{label: call for label, (call, _) in figures.items()}}
    for label, (_, compile_seconds) in figures.items():
        got["variants"][label]["compile_seconds"] = compile_seconds


def test_layout_variants_compile_in_one_process_and_are_judged_pairwise(speed, one_conv_unet):
    """`compile_layouts` compiles three copies of the plain graph beside one uncompiled copy
    (plumbing on the CPU with a one-conv stand-in), and judges channels-last against the plain
    compile and CUDA graphs against channels-last, from the one process's interleaved calls
    (a decision there overrides the cross-process one)."""
    params = {**speed.part_params("compile_layouts", True), "rounds": 1, "backend": "eager"}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["variants"]) == {"compiled", "compiled_nhwc", "compiled_nhwc_cudagraphs"}
    assert set(got["seconds"]) == {"eager", *got["variants"]}
    assert all(v["rel_err_vs_eager"] < 1e-6 for v in got["variants"].values())
    # faster per call is not enough: the extra compile time must pay back within a long
    # session (COMPILE_SESSION_STEPS calls)
    set_figures(got, 0.040, compiled=(0.028, 80), compiled_nhwc=(0.025, 84),
                compiled_nhwc_cudagraphs=(0.024, 100))
    verdicts = speed.decisions({"compile_layouts": got})
    assert speed.COMPILE_SESSION_STEPS == 2000
    assert verdicts["compile_nhwc"] == (  # 3 ms x 2000 = 6 s pays back 4 s
        True, "25.0 ms frozen, channels-last, 28.0 ms as --compile; +4 s to compile")
    assert verdicts["cuda_graphs"] == (  # 1 ms x 2000 = 2 s does not pay back 16 s
        False, "24.0 ms frozen, channels-last, CUDA graphs, 25.0 ms frozen, channels-last; "
               "+16 s to compile")
    assert ("- plain 50-step sample compiled (compiled_nhwc_cudagraphs): 1.20 s of UNet "
            "calls, after compiling") in speed.decision_lines({"compile_layouts": got})
    assert ("- --compile on this device type: COMPILE_MODES entry (ldm/precision.py) "
            "{'options': {'freezing': True, 'force_layout_optimization': True}}"
            ) in speed.decision_lines({"compile_layouts": got})
    # run 5 on an H200: channels-last 0.5 ms faster for 44 s more compiling, graphs slower
    set_figures(got, 0.0475, compiled=(0.0294, 86), compiled_nhwc=(0.0289, 130),
                compiled_nhwc_cudagraphs=(0.0320, 100))
    verdicts = speed.decisions({"compile_layouts": got})
    assert not verdicts["compile_nhwc"][0] and not verdicts["cuda_graphs"][0]
    assert ("- --compile on this device type: COMPILE_MODES entry (ldm/precision.py) {}"
            ) in speed.decision_lines({"compile_layouts": got})
    # a variant that fails to compile is reported; the others are still timed
    params["variants"] = {"compiled": {}, "compiled_nhwc": {"no_such_setting": True}}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["seconds"]) == {"eager", "compiled"}
    assert got["errors"]["compiled_nhwc"].startswith("TypeError: ")
    assert any(line.startswith("- torch.compile frozen, channels-last: failed (TypeError: ")
               for line in speed.summary({"compile_layouts": got}))


def test_host_variants_are_judged_against_their_base(speed, one_conv_unet):
    """`compile_host` (plumbing on the CPU): static sizes, CUDA graphs on them and on the
    dynamic graph, and the C++ wrapper, in one process; each judged against its base with its
    extra compile time."""
    params = {**speed.part_params("compile_host", True), "rounds": 1, "backend": "eager"}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["seconds"]) == {"eager", "compiled", "compiled_static",
                                   "compiled_static_cudagraphs", "compiled_cudagraphs",
                                   "compiled_cpp_wrapper"}
    # each variant compiled a graph of its own, not an earlier one's (Dynamo shares a graph
    # between instances of a class compiled with equal settings: the summary would say so)
    assert all(v["graphs"] == 1 for v in got["variants"].values())
    same = {**params, "variants": {"compiled": {}, "compiled_static": {}}}
    torch._dynamo.reset()  # as a fresh process
    shared = speed.part_compile_variant(same, torch.device("cpu"))
    noted = [line for line in speed.summary({"compile_host": shared})
             if "compiled no graph of its own: an earlier variant's ran" in line]
    # whether Dynamo shares the graph is torch's choice (2.10 on it does): the summary says
    # so exactly when it happened
    counts = [v["graphs"] for v in shared["variants"].values()]
    assert counts in ([1, 0], [1, 1]) and bool(noted) == (counts == [1, 0])
    set_figures(got, 0.0475, compiled=(0.0294, 86), compiled_static=(0.0285, 80),
                compiled_static_cudagraphs=(0.0240, 90), compiled_cudagraphs=(0.0280, 95),
                compiled_cpp_wrapper=(0.0250, 120))
    verdicts = speed.decisions({"compile_host": got})
    assert verdicts["static_batch"] == (  # faster and quicker to compile
        True, "28.5 ms with static sizes, 29.4 ms as --compile; -6 s to compile")
    assert verdicts["cuda_graphs_static"] == (  # 4.5 ms x 2000 = 9 s does not pay back 10 s
        False, "24.0 ms with static sizes, CUDA graphs, 28.5 ms with static sizes; "
               "+10 s to compile")
    assert verdicts["cuda_graphs_dynamic"] == (  # 1.4 ms x 2000 = 2.8 s, not 9 s
        False, "28.0 ms with CUDA graphs, 29.4 ms as --compile; +9 s to compile")
    assert verdicts["cpp_wrapper"] == (  # 4.4 ms x 2000 = 8.8 s does not pay back 34 s
        False, "25.0 ms with the C++ wrapper, 29.4 ms as --compile; +34 s to compile")
    # the mode: of the variants that beat the plain compile, the cheapest long session
    # (compile time + 2000 calls): static 80 + 57 s against graphs on it 90 + 48 s
    def mode_line():
        return next(line for line in speed.decision_lines({"compile_host": got})
                    if "COMPILE_MODES entry" in line)
    assert mode_line().endswith("{'dynamic_batch': False} (by compile_host)")
    got["variants"]["compiled_static_cudagraphs"]["compile_seconds"] = 85
    assert speed.decisions({"compile_host": got})["cuda_graphs_static"][0]
    assert mode_line() == (
        "- --compile on this device type: COMPILE_MODES entry (ldm/precision.py) "
        "{'dynamic_batch': False, 'cuda_graphs': True} (by compile_host); "
        + speed.HELD_BACK["cuda_graphs"])
    # slower per call never wins by compiling faster (a later variant finds cached kernels)
    got["seconds"] = {**got["seconds"], "compiled_static": 0.0298,
                      "compiled_static_cudagraphs": 0.0300}
    assert not speed.decisions({"compile_host": got})["static_batch"][0]
    assert mode_line().endswith("{} (by compile_host)")
    got["gpu_busy_ms"] = {"compiled": 22.6}
    assert any("(0.62x), GPU busy 22.6 ms, rel. err" in line and "as --compile" in line
               for line in speed.summary({"compile_host": got}))
    # run 6 on an H200: graphs 0.9 ms faster, their compile cheaper (the plain one's kernels
    # were in the on-disk cache); the line names the entry and what it holds back for
    set_figures(got, 0.0383, compiled=(0.0283, 86), compiled_static=(0.0285, 13),
                compiled_static_cudagraphs=(0.0272, 77), compiled_cudagraphs=(0.0274, 8),
                compiled_cpp_wrapper=(0.0286, 247))
    assert [on for on, _ in speed.decisions({"compile_host": got}).values()] == [
        False, False, True, False]
    assert mode_line().endswith("{'cuda_graphs': True} (by compile_host); first run "
                                "`gpu_check.sh card24`: the graphs' private pool keeps the "
                                "UNet's memory from a 4096² decode on a 24 GB card")


def test_weight_layout_variant_is_judged_against_the_plain_compile(speed, one_conv_unet):
    """`compile_weights` (plumbing on the CPU): the plain compile and one with channels-last
    conv weights, in one process; the mode it names carries the layout."""
    params = {**speed.part_params("compile_weights", True), "rounds": 1, "backend": "eager"}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["seconds"]) == {"eager", "compiled", "compiled_cl_weights",
                                   "compiled_cl_weights_cudagraphs"}
    assert all(v["graphs"] == 1 and v["rel_err_vs_eager"] < 1e-5
               for v in got["variants"].values())
    # faster per call, and the same graph to compile: the entry to set; graphs on top 1 ms
    # faster for 10 s more compiling do not pay back within 2000 steps
    set_figures(got, 0.0383, compiled=(0.0283, 86), compiled_cl_weights=(0.0255, 88),
                compiled_cl_weights_cudagraphs=(0.0245, 98))
    verdicts = speed.decisions({"compile_weights": got})
    assert verdicts["cl_weights"] == (
        True, "25.5 ms with channels-last weights, 28.3 ms as --compile; +2 s to compile")
    assert not verdicts["cuda_graphs_cl_weights"][0]
    assert ("- --compile on this device type: COMPILE_MODES entry (ldm/precision.py) "
            "{'channels_last': True} (by compile_weights)"
            ) in speed.decision_lines({"compile_weights": got})


def test_inductor_tuning_is_judged_against_the_static_cuda_graphs(speed, one_conv_unet):
    """`compile_autotune` (plumbing on the CPU): run 6's fastest call, then with Inductor's
    coordinate-descent tuning and with max-autotune, in one process."""
    params = {**speed.part_params("compile_autotune", True), "rounds": 1, "backend": "eager"}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["seconds"]) == {"eager", "compiled_static_cudagraphs",
                                   "compiled_static_cudagraphs_cdt",
                                   "compiled_static_cudagraphs_autotune"}
    assert all(v["rel_err_vs_eager"] < 1e-5 for v in got["variants"].values())
    # 1 ms a step for 1 s more compiling pays back within a session of 2000 steps; 1.4 ms for
    # 60 s more does not
    set_figures(got, 0.0383, compiled_static_cudagraphs=(0.0272, 90),
                compiled_static_cudagraphs_cdt=(0.0262, 91),
                compiled_static_cudagraphs_autotune=(0.0258, 150))
    verdicts = speed.decisions({"compile_autotune": got})
    assert verdicts["coordinate_descent"][0] and not verdicts["max_autotune"][0]
    assert any(line.startswith(
        "- --compile on this device type: COMPILE_MODES entry (ldm/precision.py) "
        "{'dynamic_batch': False, 'cuda_graphs': True, 'options': "
        "{'coordinate_descent_tuning': True}} (by compile_autotune)")
        for line in speed.decision_lines({"compile_autotune": got}))


def test_variants_beyond_the_compile_budget_are_skipped(speed, one_conv_unet, monkeypatch):
    """A variant is compiled only while the part's compile budget still holds its longest
    compile so far: the compiled ones are then timed within the part's timeout."""
    import ldm.precision

    compile_in_place = ldm.precision.compile_unet_in_place

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return compile_in_place(*args, **kwargs)
    monkeypatch.setattr(ldm.precision, "compile_unet_in_place", slow)
    params = {**speed.part_params("compile_host", True), "rounds": 1, "backend": "eager",
              "compile_budget_s": 0.3}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    assert set(got["seconds"]) == {"eager", "compiled"}
    assert set(got["skipped"]) == set(params["variants"]) - {"compiled"}
    assert any(line.startswith("- torch.compile with static sizes: skipped (")
               for line in speed.summary({"compile_host": got}))
    assert speed.part_params("compile_host", False)["compile_budget_s"] == 420


def test_part_sets_run_each_part_once(speed):
    assert speed.parts_of("stored,verify") == [
        "cold_decode_hostalloc", "cold_decode_stored", "cold_decode_stored_hostreg",
        "cold_decode", "compile_frozen"]
    assert speed.parts_of("cli,speed") == ["cli", "profile", "cold_decode", "compile"]


def test_unknown_part_is_refused_in_one_line(speed, capsys):
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--parts", "profile,warp", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "unknown part(s): warp" in capsys.readouterr().err


def test_no_cuda_device_is_one_line(speed, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speed.main(["--parts", "profile"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: no CUDA device is visible to torch (--device cpu --tiny for a smoke run)"]


def test_stored_cold_decodes_turn_recomputation_off(speed):
    assert speed.part_params("cold_decode_stored", False)["recompute"] is False
    assert "recompute" not in speed.part_params("cold_decode", False)
    # as txt2img: pinned memory registered on threads; against it, torch's default
    for part in ("cold_decode", "cold_decode_stored_hostreg"):
        assert "pinned_num_register_threads" in speed.PART_ENV[part]()["PYTORCH_CUDA_ALLOC_CONF"]
    for part in ("cold_decode_hostalloc", "cold_decode_stored"):
        assert speed.PART_ENV[part]() == {
            "PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"}


def test_load_only_times_a_pipeline_load_staged_or_not(speed, capsys):
    for staged in (True, False):
        speed.load_only(str(TINY_CKPT), str(TINY_CONFIG), "cpu", staged)
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["load"] > 0


def test_decisions_follow_the_documented_rules(speed):
    results = {
        "profile": {"variants_seconds": {"default": 0.045, "cudnn_attention": 0.040,
                                         "flash_only": 0.046, "channels_last": 0.046}},
        "cli": {"seconds": {"2_steps_plain_warm": 0.10, "2_steps_autotuned_warm": 0.098,
                            "2_steps_autotune_first": 0.30,  # 0.2 s once, 1 ms a step back
                            "2_steps_cudnn_attention_first": 0.20},  # 0.1 s, 5 ms a step
                "pipeline_load_seconds": {"staged": 6.0, "sequential": 7.5}},
        "cold_decode": {"cold_seconds": 9.0}, "cold_decode_hostalloc": {"cold_seconds": 12.0},
        "cold_decode_stored": {"error": "stopped at its 65 s timeout"},
        "cold_decode_stored_hostreg": {"cold_seconds": 31.0},
        "compile": {"compile_seconds": 90.0, "routed_compile_seconds": 60.0,
                    "rel_err_vs_eager": 1e-3, "redilated_rel_err_vs_eager": 2e-3,
                    "first_routed_plain_call_seconds": 0.04,
                    "seconds": {"eager": 0.045, "compiled": 0.035, "compiled_routed": 0.037,
                                "eager_redilated": 0.047, "compiled_redilated": 0.038}},
    }
    got = {name: on for name, (on, _) in speed.decisions(results).items()}
    assert got == {"cudnn_attention": True, "channels_last": False, "cudnn_benchmark": False,
                   "staged_loads": True, "recompute": True, "pinned_register_threads": True,
                   "compile": False}  # 90 s of compiling against 0.5 s saved in 50 steps
    lines = speed.decision_lines(results)
    assert "- cudnn_attention: on (+5.00 ms a step, first pass 0.10 s)" in lines
    # a decode stopped by its timeout took at least that long
    assert ("- recompute: on (cold_decode_hostalloc 12.0 s, cold_decode_stored > 65 s, cold)"
            in lines)
    slow = {**results, "cold_decode": {"cold_seconds": 13.0}}
    assert speed.decisions(slow)["pinned_register_threads"][0] is False
    assert lines[-2:] == [
        "- plain 50-step sample at the best variant (cudnn_attention): 2.00 s of UNet calls",
        "- plain 50-step sample compiled (compiled): 1.75 s of UNet calls, after compiling"]
    assert ("- torch.compile, re-dilated run (convs routed): 60 s to compile; re-dilated steps "
            "38.0 ms vs eager 47.0 ms (rel. err 2.0e-03), plain steps 37.0 ms (first 0.0 s)"
            in speed.summary({"compile": results["compile"]}))
    assert speed.decision_lines({}) == []


def test_saved_runs_are_summarized_together_without_running(speed, tmp_path, capsys):
    """One results file per part set (one device command each), reported as one run."""
    def decode(cold):
        return {"side": 512, "cold_seconds": cold, "warm_seconds": 5.0, "pinned": None,
                "conv_calls": 2768, "conv_shapes": 39, "top_host_ops_cold_ms": []}
    head = {"device": "NVIDIA H200", "torch": "2.11.0"}
    saved = {"speed": {**head, "compile": {"error": "stopped at its 120 s timeout"},
                       "cold_decode": decode(9.0)},
             "stored": {**head, "cold_decode_hostalloc": decode(12.0),
                        "cold_decode_stored": decode(30.0)}}
    paths = [tmp_path / f"{name}.json" for name in saved]
    for path, results in zip(paths, saved.values()):
        path.write_text(json.dumps(results))
    assert speed.main(["--summarize", *map(str, paths)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "## gpu_speed on NVIDIA H200 (torch 2.11.0)"
    assert "- compile: stopped at its 120 s timeout" in out
    assert ("- recompute: on (cold_decode_hostalloc 12.0 s, cold_decode_stored 30.0 s, cold)"
            in out)
    assert ("- pinned_register_threads: on (cold_decode 9.0 s, cold_decode_hostalloc 12.0 s, "
            "cold)" in out)


def test_frozen_compile_part_runs_and_is_judged_against_the_plain_compile(speed, one_conv_unet,
                                                                         monkeypatch):
    """Plumbing only on the CPU (the eager backend ignores Inductor's options): the part
    compiles the plain graph once and times it against an uncompiled copy."""
    params = {**speed.part_params("compile_frozen", True), "rounds": 1, "backend": "eager"}
    got = speed.part_compile_variant(params, torch.device("cpu"))
    frozen = got["variants"]["compiled_frozen"]
    assert frozen["compile_seconds"] > 0 and frozen["rel_err_vs_eager"] < 1e-6
    assert set(got["seconds"]) == {"eager", "compiled_frozen"}
    results = {"compile": {"compile_seconds": 98.0, "routed_compile_seconds": 101.0,
                           "rel_err_vs_eager": 2e-3, "redilated_rel_err_vs_eager": 2e-3,
                           "first_routed_plain_call_seconds": 0.03,
                           "seconds": {"eager": 0.044, "compiled": 0.0279,
                                       "compiled_routed": 0.03, "eager_redilated": 0.055,
                                       "compiled_redilated": 0.036}},
               "compile_frozen": {"compile_seconds": 110.0, "rel_err_vs_eager": 2e-3,
                                  "seconds": {"eager": 0.040, "compiled_frozen": 0.024}}}
    results["compile_cudagraphs"] = {"compile_seconds": 120.0, "rel_err_vs_eager": 2e-3,
                                     "seconds": {"eager": 0.040, "compiled_cudagraphs": 0.026}}
    assert speed.decisions(results)["freezing"] == (
        True, "0.60x of eager with freezing, 0.63x without")
    assert speed.decisions(results)["cuda_graphs"] == (
        False, "0.65x of eager with CUDA graphs, 0.63x without")
    assert ("- torch.compile with freezing, plain run: 110 s to compile, 24.0 ms vs eager "
            "40.0 ms per call (0.60x), rel. err 2.0e-03") in speed.summary(results)
    results["compile_frozen"] = {"variants": {"compiled_frozen": results["compile_frozen"]},
                                 "seconds": results["compile_frozen"].pop("seconds")}
    assert speed.decisions(results)["freezing"][0]  # a variant part's own layout, too

