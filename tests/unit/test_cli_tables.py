"""The CLI's tables off a terminal: plain tab-separated rows, never cut, so that grep finds whole ids."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("argv", "wanted"), [
    (["targets"], "android-arm64\tandroid\texecutorch, onnxruntime"),
    (["targets"], "fpga-zcu104\tfpga, zcu104"),
    (["targets", "show", "rpi4"], "memory.bandwidth_gbs\t"),
    (["methods"], "quantization\tawq-gptq\tint8, int4\tAWQ's channel scales, then GPTQ rounding"),
])
def test_piped_tables_are_whole(argv: list[str], wanted: str) -> None:
    done = subprocess.run([sys.executable, "-m", "slm_export.cli", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert wanted in done.stdout
    assert "…" not in done.stdout
    assert "┃" not in done.stdout


def test_a_closed_pipe_is_not_an_internal_error() -> None:
    done = subprocess.run(f"{sys.executable} -m slm_export.cli targets show rpi4 | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "internal error" not in done.stderr
    assert "Traceback" not in done.stderr
