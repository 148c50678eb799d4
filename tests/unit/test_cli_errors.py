"""Bad inputs a user can cause: each gets a clear message and the right exit code, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slm_export.cli import main
from slm_export.models.builtin import BUILTIN_MODELS


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a bad flag value itself, with exit code 2
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return BUILTIN_MODELS.get("smollm2-135m").path()


def _bad_files(tmp: Path, gguf: Path) -> dict[str, Path]:
    truncated = tmp / "truncated.gguf"
    with open(gguf, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    corrupt = tmp / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 4096)
    not_gguf = tmp / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    t5 = tmp / "t5-model"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    (t5 / "model.safetensors").write_bytes(b"\0" * 16)
    empty = tmp / "empty-folder"
    empty.mkdir()
    return {"truncated": truncated, "corrupt": corrupt, "not_gguf": not_gguf, "t5": t5, "empty": empty}


@pytest.mark.parametrize(("case", "expected"), [
    ("truncated", "truncated"),
    ("corrupt", "cannot read GGUF"),
    ("not_gguf", "not a GGUF file"),
    ("t5", "architecture 't5' is not supported"),
    ("empty", "no config.json"),
])
def test_bad_models(case: str, expected: str, tmp_path: Path, gguf_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_files(tmp_path, gguf_path)[case]
    code, out = _run(["--target", "host", "--model", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2, out
    assert expected in out
    assert "Traceback" not in out
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial-*"))


@pytest.mark.parametrize(("argv", "code", "expected"), [
    (["--target", "jetsn", "--model", "smollm2-135m"], 2, "Did you mean 'jetson'"),
    (["--target", "nosuchboard", "--model", "smollm2-135m"], 2, "Known: a100, android-arm64"),
    (["--target", "host", "--model", "./no/such/model"], 2, "not found"),
    (["--target", "jetson", "--model", "smollm2-135m", "--precision", "int8"], 2,
     "Supported on jetson-tx2: fp32, fp16"),
    (["--target", "rpi4", "--model", "smollm2-135m", "--precision", "bf16"], 2, "Supported on rpi4b"),
    (["--target", "fpga", "--model", "smollm2-135m", "--precision", "fp16"], 2, "the DPU is int8-only"),
    (["--target", "fpga", "--model", "smollm2-135m", "--method", "rtn"], 2, "power-of-two"),
    (["--target", "host", "--model", "smollm2-135m", "--precision", "int4", "--group-size", "48"], 2,
     "--group-size must be a power of two"),
    (["--target", "host", "--model", "smollm2-135m", "--precision", "fp32", "--method", "gptq"], 2,
     "--method applies to int8 and int4"),
    (["--target", "host", "--model", "smollm2-135m", "--out", "/sys/slm-export-test/out"], 2, "not writable"),
    (["validate", "/tmp"], 2, "is not an slm-export artifact"),
    (["--target", "jetson", "--model", "smollm2-135m", "--sparsity", "2:4"], 2,
     "jetson-tx2 has no use for sparsity pattern '2:4'; patterns it can use: none"),
    (["--target", "host", "--model", "smollm2-135m", "--sparsity", "3:2"], 2, "need 0 < N < M"),
    (["--target", "host", "--model", "smollm2-135m", "--sparsity", "2:4", "--sparsity-method", "random"], 2,
     "invalid choice"),
    (["--target", "host", "--model", "smollm2-135m", "--eval-windows", "0"], 2, "at least 1, not '0'"),
    (["--target", "rpi4", "--model", "smollm2-135m", "--timing-tokens", "one"], 2, "at least 2, not 'one'"),
    (["validate", "/tmp", "--emulate-tokens", "8"], 2, "at least 16, not '8'"),
    (["--target", "host", "--model", "smollm2-135m", "--precision", "int4", "--lm-head-hot", "5%"], 2,
     "expected a fraction in [0, 1) like 0.05, not '5%'"),
    (["--target", "host", "--model", "smollm2-135m", "--precision", "int4", "--lm-head-bits", "8",
      "--lm-head-hot", "0.1"], 2, "use it with --lm-head-bits 4"),
    (["--target", "rpi4", "--model", "smollm2-135m", "--precision", "int4", "--lm-head-bits", "4",
      "--lm-head-hot", "0.1"], 2, "rpi4b also builds for tvm"),
])
def test_bad_requests(argv: list[str], code: int, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    got, out = _run(argv, capsys)
    assert got == code, out
    assert expected in out
    assert "Traceback" not in out


def test_output_under_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = _run(["--target", "host", "--model", "smollm2-135m", "--out", str(blocker / "sub")], capsys)
    assert code == 2
    assert "is a file, not a folder" in out


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("memory.bandwidth_gbs", '"fast"', "memory.bandwidth_gbs: expected a number"),
    ("precision.default", '"int2"', "precision.default: expected one of"),
    ("graph.opset", "99", "graph.opset: expected an integer in [13, 23]"),
    ("backends.order", '["coreml"]', "backends.order: expected entries from"),
])
def test_malformed_target_file(field: str, value: str, expected: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import resources

    src = resources.files("slm_export.targets") / "profiles" / "rpi4b.toml"
    text = src.read_text()
    section, key = field.split(".")
    lines, current = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[] ")
        if current == section and line.split("=")[0].strip() == key:
            line = f"{key} = {value}"
        lines.append(line)
    board = tmp_path / "board.toml"
    board.write_text("\n".join(lines))
    code, out = _run(["--target-file", str(board), "--model", "smollm2-135m", "--dry-run"], capsys)
    assert code == 2, out
    assert expected in out
    assert str(board) in out


def test_misspelt_field_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import resources

    text = (resources.files("slm_export.targets") / "profiles" / "rpi4b.toml").read_text()
    board = tmp_path / "board.toml"
    board.write_text(text.replace("llvm_mcpu =", "llvm_mcpus ="))
    code, out = _run(["--target-file", str(board), "--model", "smollm2-135m", "--dry-run"], capsys)
    assert code == 2
    assert "cpu.llvm_mcpus: unknown field; did you mean 'llvm_mcpu'?" in out


def test_target_file_with_broken_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    board = tmp_path / "board.toml"
    board.write_text("id = 'x'\n[cpu\n")
    code, out = _run(["--target-file", str(board), "--model", "smollm2-135m", "--dry-run"], capsys)
    assert code == 2
    assert "is not valid TOML" in out


def test_dry_run_writes_nothing(tiny_models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "jetson"
    code, text = _run(["--target", "jetson", "--model", str(tiny_models["llama"]), "--out", str(out), "--dry-run"],
                      capsys)
    assert code == 0
    assert '"precision": "fp16"' in text
    assert '"backend": "tensorrt"' in text
    assert not out.exists()


def test_existing_artifact_survives_a_failed_run(tiny_models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    code, text = _run(["--target", "host", "--model", str(tiny_models["llama"]), "--out", str(out)], capsys)
    assert code == 0, text
    before = (out / "model.onnx").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    code, text = _run(["--target", "host", "--model", str(broken), "--out", str(out)], capsys)
    assert code == 2
    assert (out / "model.onnx").read_bytes() == before
    assert not list(tmp_path.glob(".art.partial-*"))
