"""Bad model inputs a user can cause are refused up front through the CLI: exit 2, a message that names the
file and the fault, no traceback, and nothing left behind (neither the output folder nor a partial one)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from slm_export.cli import main
from tests.conftest import _tokenizer, make_tiny_model, tiny_config


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a bad flag value itself, with exit code 2
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("checks") / "llama")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_header(st: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place, keeping its length (the data offsets stay valid)."""
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    st.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def no_tokenizer(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    return folder


def relabelled_i32(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)

    def edit(h: dict) -> None:
        h["model.layers.1.mlp.up_proj.weight"]["dtype"] = "I32"  # same size as F32: only the label lies

    _edit_header(folder / "model.safetensors", edit)
    return folder


def truncated(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    return folder


def wrong_shape(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    _edit_config(folder, lambda c: c.update(intermediate_size=96))  # the weights were saved with 128
    return folder


def no_hidden_size(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    _edit_config(folder, lambda c: c.pop("hidden_size"))
    return folder


def custom_code(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    _edit_config(folder, lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    return folder


def unknown_rope(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    _edit_config(folder, lambda c: c.update(rope_scaling={"rope_type": "spiral", "factor": 2.0}))
    return folder


def unknown_activation(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    _edit_config(folder, lambda c: c.update(hidden_act="mish"))
    return folder


def not_json(src: Path, dst: Path) -> Path:
    folder = _copy(src, dst)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return folder


def nan_weight(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _copy(src, dst)
    st = folder / "model.safetensors"
    tensors = load_file(st)
    tensors["model.layers.0.self_attn.v_proj.weight"][2, 5] = float("nan")
    save_file(tensors, st, metadata={"format": "pt"})
    return folder


def big_tokenizer(src: Path, dst: Path) -> Path:
    """A 384-token tokenizer beside a model whose embedding has 256 rows."""
    import torch
    from transformers import AutoModelForCausalLM

    dst.mkdir()
    _tokenizer(dst)
    config = tiny_config("llama")
    config.vocab_size = 256
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    return dst


def nan_gguf(src: Path, dst: Path) -> Path:
    from tests.unit.test_fuzz_readers import write_tiny_gguf

    dst.mkdir()
    return write_tiny_gguf(dst / "tiny.gguf", nan=True)


@pytest.mark.parametrize(("make", "expected"), [
    (no_tokenizer, ["no tokenizer files", "tokenizer.json", "vocab.json + merges.txt"]),
    (relabelled_i32, ["model.safetensors", "'model.layers.1.mlp.up_proj.weight' has dtype I32", "must be float"]),
    (truncated, ["model.safetensors", "the file is truncated"]),
    (wrong_shape, ["tensor model.layers.0.mlp.", "[64, 128]", "[64, 96]", "config.json implies"]),
    (no_hidden_size, ["config.json lacks hidden_size"]),
    (not_json, ["config.json is not readable JSON"]),
    (custom_code, ["auto_map", "custom model code", "AutoModelForCausalLM"]),
    (unknown_rope, ["rope_type", "'spiral'"]),
    (unknown_activation, ["activation 'mish'"]),
    (nan_weight, ["weight model.layers.0.self_attn.v_proj.weight holds 1 NaN or Inf"]),
    (big_tokenizer, ["the tokenizer has 384 tokens", "embedding has 256 rows"]),
    (nan_gguf, ["tiny.gguf", "holds 1 NaN or Inf"]),
], ids=lambda v: v.__name__ if callable(v) else "")
def test_bad_model_is_refused(make: Callable[[Path, Path], Path], expected: list[str], llama: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = make(llama, tmp_path / "model")
    out = tmp_path / "o"
    code, text = _run(["--target", "host", "--model", str(bad), "--out", str(out)], capsys)
    assert code == 2, text
    for words in expected:
        assert words in text, text
    assert str(bad) in text
    assert "Traceback" not in text
    assert "internal error" not in text
    assert not out.exists()
    assert not list(tmp_path.glob(".o.partial-*"))


@pytest.mark.parametrize("kind", ["folder", "device", "missing"])
def test_target_file_that_is_no_file(kind: str, llama: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    board = {"folder": tmp_path / "boards", "device": Path("/dev/null"), "missing": tmp_path / "no.toml"}[kind]
    if kind == "folder":
        board.mkdir()
        (board / "rpi.toml").write_text("id = 'x'\n")
    out = tmp_path / "o"
    code, text = _run(["--target-file", str(board), "--model", str(llama), "--out", str(out)], capsys)
    assert code == 2, text
    assert {"folder": "is a folder", "device": "not a regular file", "missing": "does not exist"}[kind] in text
    assert str(board) in text
    assert "Traceback" not in text
    assert not out.exists()
    assert not list(tmp_path.glob(".o.partial-*"))


def test_target_file_with_a_nan_figure(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import resources

    text = (resources.files("slm_export.targets") / "profiles" / "rpi4b.toml").read_text()
    board = tmp_path / "board.toml"
    board.write_text(text.replace("bandwidth_gbs = 5.5", "bandwidth_gbs = nan"))
    code, out = _run(["--target-file", str(board), "--model", str(llama), "--dry-run"], capsys)
    assert code == 2, out
    assert "memory.bandwidth_gbs: expected a finite number, got nan" in out


def test_good_model_still_loads(llama: Path) -> None:
    from slm_export.models import load_model

    model = load_model(str(llama))
    assert model.config.vocab_size == len(model.tokenizer) == 384
