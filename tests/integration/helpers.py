"""What the real-model tests share. They are split into files by the artifact they build so that the
suite's workers (``scripts/test.sh``: pytest-xdist, one file per worker at a time) run the long ones side by side."""

from __future__ import annotations

import os

import pytest

from slm_export.cli import main
from slm_export.validation.validate import ValidationSettings

# The suite's validation effort: 2 evaluation windows of 512 tokens (not 8), 8 timed tokens a run (not 64).
# These tests check that each path works and lands in a sane range; scripts/bench_*.py measure the figures
# with the defaults.
LIGHT = ["--eval-windows", "2", "--timing-tokens", "8"]
LIGHT_SETTINGS = ValidationSettings(windows=2, decode_tokens=8)
# The threads each run uses: the cores shared among the suite's workers, so that two workers' runtimes
# (ONNX Runtime's and torch's pools spin while they wait) do not fight over the same cores.
THREADS = str(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stdout (the JSON report with --json); progress and errors go to stderr."""
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.out
