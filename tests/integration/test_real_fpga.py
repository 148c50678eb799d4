"""smollm2-135m for the FPGA (ZCU104 DPU) end to end: SmoothQuant W8A8 with power-of-two scales, DPU partition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import LIGHT, THREADS, cli

pytestmark = pytest.mark.slow


def test_fpga_artifact_maps_linear_layers_to_the_dpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fpga"
    code, text = cli(["--target", "fpga", "--model", "smollm2-135m", "--calib-samples", "8", "--calib-seqlen", "256",
                      "--out", str(out), "--threads", THREADS, "--json", *LIGHT], capsys)
    report = json.loads(text)
    assert code in (0, 1), report["notes"]
    assert report["metrics"]["perplexity_change_pct"]["value"] <= 25.0  # a wrong scale costs hundreds of %
    assert "emulated quantized arithmetic" in report["metrics"]["perplexity"]["where"]
    assert report["validated_file"] == "model.onnx"
    part = json.loads((out / "dpu_partition.json").read_text())
    assert part["tokens"] == 512
    assert part["dpu_ops"] >= 30 * 4
    assert not part["fully_connected_refused"]
    assert 0.3 < part["dpu_share"] < 1.0
    assert report["compile"]["backend"] == "vitis-ai"
    assert report["compile"]["details"]["dpu_ops"] == part["dpu_ops"]
    assert (out / "model.ort").is_file()  # the A53 cores' ONNX Runtime form
