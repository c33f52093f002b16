"""scripts/gpu_check.py, the correctness checks a card session runs first, on the CPU: a check
that breaks here would cost device minutes there. (Its decode and CLI checks repeat what
test_redilation.py and test_cli_errors.py already run on the CPU, so only the quick ones run.)"""
import os

import pytest

from conftest import REPO, load_script


@pytest.fixture(scope="module")
def gpu_check(monkeypatch_module):
    monkeypatch_module.setenv("GPU_CHECK_DEVICE", "cpu")
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_check_is_listed(gpu_check):
    assert [fn.__name__ for fn in gpu_check.CHECKS] == [
        "polyphase_redilation", "device_noise_stream", "vae_attention", "unet_calls", "half_weights_unet", "decodes",
        "decode_budget", "bf16_vae_error", "sample_through_the_cli"]


@pytest.mark.parametrize("name, says", [
    ("polyphase_redilation", "polyphase (policy on cpu: False)"),
    ("device_noise_stream", "equal the cpu stream"),
    ("vae_attention", "attention head 512 fp32"),
    ("unet_calls", "vanilla"),
    ("half_weights_unet", "reference kernels"),
])
def test_quick_checks_pass_on_the_cpu(gpu_check, name, says):
    assert gpu_check.DEVICE.type == "cpu"
    assert says in getattr(gpu_check, name)()  # a check over its bound raises


def test_cuda_only_checks_skip_elsewhere(gpu_check):
    with pytest.raises(gpu_check.Skip):
        gpu_check.decode_budget()


def test_the_shell_script_refuses_an_unknown_part_before_anything(tmp_path):
    """A misspelt part (`card-24`) would spend a machine's start for nothing: refused at once,
    exit 2, with the parts it knows; every part the script runs is among them."""
    import re
    import subprocess

    script = REPO / "shellscripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": "false", "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(script), "check", "card-24"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert run.returncode == 2 and "unknown part 'card-24'" in run.stderr
    assert not (tmp_path / "out").exists()
    text = script.read_text()
    known = set(re.search(r'KNOWN=" ([^"]+) "', text).group(1).split())
    used = set(re.findall(r"wants (\w+)", text)) | set(
        re.search(r"for set in ([\w ]+); do", text).group(1).split())
    assert used == known
