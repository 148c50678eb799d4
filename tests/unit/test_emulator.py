"""ARM emulation for real: the rpi4b artifact's ONNX Runtime (aarch64 wheel) under qemu-aarch64 -cpu cortex-a72,
driven through the runner the device side uses, on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slm_export.cli import main
from slm_export.errors import DeviceError
from slm_export.targets import get_target
from slm_export.validation.emulator import EmulatorEnv, EmulatorRunner, fake_cpuinfo

# scripts/setup.sh builds the emulator; a machine where it could not is a failure here, not a skip.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="qemu-user runs on Linux only")


def _rpi4(tiny: Path, out: Path, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["--target", "rpi4", "--model", str(tiny), "--out", str(out), "--json", "--threads", "1",
                 "--calib-samples", "4", "--calib-seqlen", "64", *extra])
    return code, json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}


def test_fp32_emulated_run_matches_the_host_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    code, report = _rpi4(tiny_models["llama"], tmp_path / "a", "--precision", "fp32", "--emulate")
    assert code == 0, report.get("goals")
    m = report["metrics"]
    where = m["emulated_onnxruntime_perplexity"]["where"]
    assert "under emulation (qemu-aarch64 -cpu cortex-a72" in where
    assert "aarch64" in where
    assert "not device speed" in m["emulated_onnxruntime_decode_tokens_per_s_p50"]["where"]
    assert m["emulated_onnxruntime_agreement_with_host"]["value"] >= 0.999
    assert abs(m["emulated_onnxruntime_perplexity_change_vs_host_pp"]["value"]) < 1e-3
    assert m["emulated_onnxruntime_greedy_equals_host"]["value"] is True
    emu = {e["backend"]: e for e in report["emulation"]}
    assert emu["onnxruntime"]["environment"]["machine"] == "aarch64"
    assert emu["onnxruntime"]["file"] == report["validated_file"] == "model.ort"
    # the TVM library the Pi loads (cross-built for cortex-a72), against the host build of the same module
    assert (emu["tvm"]["file"], emu["tvm"]["versus"]) == ("tvm_aarch64.so", "tvm_host.so")
    assert m["emulated_tvm_agreement_with_host"]["value"] >= 0.999
    assert m["emulated_tvm_greedy_equals_host"]["value"] is True
    # and the host TVM build against the validated ORT file
    assert m["tvm_agreement_with_validated"]["value"] >= 0.999
    assert m["tvm_greedy_equals_validated"]["value"] is True
    assert [s["name"] for s in report["stages"]][-4:] == ["validate", "loads", "crosscheck", "emulate"]
    goals = {g["metric"]: g["status"] for g in report["goals"]}
    assert goals["emulated_onnxruntime_agreement_with_host"] == goals["emulated_tvm_agreement_with_host"] == "PASS"
    assert goals["tvm_greedy_equals_validated"] == "PASS"


def test_emulator_not_set_up(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLM_EXPORT_CACHE", str(tmp_path / "empty-cache"))
    # asked for: an environment error (exit 3) that says how to set it up, and no artifact
    code, _ = _rpi4(tiny_models["llama"], tmp_path / "on", "--precision", "fp32", "--emulate", "--no-validate")
    assert code == 0  # --no-validate: nothing to emulate
    code, _ = _rpi4(tiny_models["llama"], tmp_path / "on", "--precision", "fp32", "--emulate")
    assert code == 3
    assert "slm-export emulator setup" in capsys.readouterr().err
    # the profile's default ("auto"): host validation stands, the report says why emulation did not run
    code, report = _rpi4(tiny_models["llama"], tmp_path / "auto", "--precision", "fp32")
    assert code == 0
    assert report["emulation"][0]["status"] == "not run"
    assert "not set up" in report["emulation"][0]["reason"]
    assert not any(k.startswith("emulated_") for k in report["metrics"])
    assert main(["emulator"]) == 3


def test_runtime_failure_under_emulation_is_a_device_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    runner = EmulatorRunner(get_target("rpi4"))
    with pytest.raises(DeviceError, match="emulated run on cortex-a72 failed"):
        runner.run(tmp_path, {"schema": 1, "model": "model.onnx", "windows": [[1, 2, 3]]})


def test_emulator_profiles_and_cpuinfo() -> None:
    pi = fake_cpuinfo(get_target("rpi4"))
    assert "CPU part\t: 0xd08" in pi  # cortex-a72
    assert "asimddp" not in pi  # no dot product on the Pi 4
    assert "asimddp" in fake_cpuinfo(get_target("android"))
    with pytest.raises(DeviceError, match="x86_64"):
        EmulatorRunner(get_target("host"), EmulatorEnv(Path("/nonexistent")))
    assert EmulatorEnv(Path("/nonexistent")).problem() is not None
