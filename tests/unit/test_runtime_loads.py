"""The reports' table of which runtime loads which file (validation/loads.py): a tiny host artifact loads in ONNX
Runtime and ONNX Runtime GenAI, a runtime that does not import is "not checked here", a damaged file "fails"
with the runtime's own first line, and a library for another machine is not tried."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from slm_export.cli import main
from slm_export.report_html import render_html
from slm_export.report_md import render_markdown
from slm_export.validation.loads import FAILS, LOADS, NOT_CHECKED, RUNTIMES, runtime_loads
from tests.conftest import make_tiny_model

QUICK = ["--eval-windows", "1", "--timing-tokens", "4", "--threads", "1", "--no-emulate"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama's host fp32 artifact, validated (the loads stage runs with validation)."""
    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("loads")
    out = root / "host"
    code = main(["--target", "host", "--model", str(make_tiny_model("llama", root / "llama")), "--precision", "fp32",
                 "--out", str(out), *QUICK])
    assert code == 0
    return out


def _status(rows: list[dict], file: str, runtime: str) -> dict:
    return next(r for r in rows if r["file"] == file and r["runtime"] == runtime)


def test_the_reports_say_onnx_runtime_and_genai_load_the_host_artifact(artifact: Path) -> None:
    report = json.loads((artifact / "report.json").read_text())
    rows = report["runtime_loads"]
    runtime_file = report["validated_file"]
    assert _status(rows, runtime_file, "ONNX Runtime")["status"] == LOADS
    assert _status(rows, "model.onnx", "ONNX Runtime")["status"] == LOADS
    assert _status(rows, runtime_file, "ONNX Runtime GenAI")["status"] == LOADS  # the file genai_config.json names
    assert not any(r["runtime"] in ("llama.cpp", "ExecuTorch LLM runner") for r in rows)  # no .gguf, no .pte here
    assert "loads" in [s["name"] for s in report["stages"]]
    md = (artifact / "report.md").read_text()
    assert "## Runtimes that load these files" in md
    assert f"| `{runtime_file}` | loads | loads |" in md.replace(" | -", "")
    assert "No file of this artifact is for ExecuTorch LLM runner, llama.cpp, TVM, TensorRT." in md
    html = (artifact / "report.html").read_text()
    assert "id=runtime-loads" in html
    assert "ONNX Runtime GenAI" in html


def test_a_runtime_that_does_not_import_is_not_checked_here(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    rows = runtime_loads(artifact)
    genai = [r for r in rows if r["runtime"] == "ONNX Runtime GenAI"]
    assert genai
    assert all(r["status"] == NOT_CHECKED for r in genai)
    assert "onnxruntime_genai does not import" in genai[0]["detail"]
    assert all(r["status"] == LOADS for r in rows if r["runtime"] == "ONNX Runtime")  # the others still checked
    md = render_markdown({**json.loads((artifact / "report.json").read_text()), "runtime_loads": rows})
    assert "not checked here: onnxruntime_genai does not import" in md


def test_a_damaged_file_fails_with_the_runtimes_first_line(artifact: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    folder = tmp_path / "damaged"
    shutil.copytree(artifact, folder)
    runtime_file = json.loads((folder / "report.json").read_text())["validated_file"]
    data = (folder / runtime_file).read_bytes()
    (folder / runtime_file).write_bytes(data[: len(data) // 3])  # a truncated protobuf
    with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever ONNX Runtime raises is the expected text
        ort.InferenceSession(str(folder / runtime_file), providers=["CPUExecutionProvider"])
    rows = runtime_loads(folder)
    row = _status(rows, runtime_file, "ONNX Runtime")
    assert row["status"] == FAILS
    assert row["detail"] == str(caught.value).strip().splitlines()[0].strip()  # the runtime's own first line
    assert _status(rows, "model.onnx", "ONNX Runtime")["status"] == LOADS  # only the damaged file fails
    assert _status(rows, runtime_file, "ONNX Runtime GenAI")["status"] == FAILS
    html = render_html({**json.loads((folder / "report.json").read_text()), "runtime_loads": rows})
    assert "<td class='FAIL'>fails: " in html


def test_a_library_for_another_machine_is_not_tried(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    import platform

    other = 62 if platform.machine() in ("aarch64", "arm64") else 183  # x86_64's or aarch64's e_machine
    header = b"\x7fELF" + bytes(14) + other.to_bytes(2, "little") + bytes(44)
    (tmp_path / "tvm_aarch64.so").write_bytes(header)
    (tmp_path / "tvm_host.so").write_bytes(b"not a library")
    rows = runtime_loads(tmp_path)
    assert _status(rows, "tvm_aarch64.so", "TVM")["status"] == NOT_CHECKED
    assert "a library for" in _status(rows, "tvm_aarch64.so", "TVM")["detail"]
    assert _status(rows, "tvm_host.so", "TVM")["status"] == FAILS


def test_every_runtime_the_issue_names_has_a_check() -> None:
    assert {r.name for r in RUNTIMES} == {"ONNX Runtime", "ONNX Runtime GenAI", "Optimum ORTModelForCausalLM",
                                          "ExecuTorch LLM runner", "llama.cpp", "TVM", "TensorRT"}


def test_a_damaged_gguf_fails_in_llama_cpp(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))  # the magic, then nothing a reader accepts
    (row,) = runtime_loads(tmp_path)
    assert (row["runtime"], row["status"]) == ("llama.cpp", FAILS)
    assert "model.gguf" in row["detail"]
