"""The real built-in models end to end through the CLI and the Python API (slow; CI runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slm_export.models.builtin import BUILTIN_MODELS

from .helpers import LIGHT, LIGHT_SETTINGS, THREADS, cli

pytestmark = pytest.mark.slow


def test_gguf_path_with_user_eval_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydoc_data.topics import topics

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(topics[k] for k in sorted(topics)[-30:]))
    gguf = BUILTIN_MODELS.get("smollm2-135m").path()
    code, out = cli(["--target", "host", "--model", str(gguf), "--precision", "fp32", "--eval-data", str(notes),
                     "--out", str(tmp_path / "h32"), "--json", "--threads", THREADS, *LIGHT], capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["metrics"]["eval_text"]["value"] == str(notes)
    assert report["model"]["format"] == "gguf"
    assert report["metrics"]["top1_agreement"]["value"] >= 0.999


def test_jetson_fp16_portable_graph(tmp_path: Path) -> None:
    import onnx

    import slm_export

    out = tmp_path / "jetson"
    result = slm_export.export("smollm2-135m", target="jetson", out=out, settings=LIGHT_SETTINGS)
    assert result.passed, result.report["goals"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert graph.opset_import[0].version == 13
    assert all(n.domain == "" for n in graph.graph.node)
    assert result.report["compile"]["status"] == "not run"
    assert "engine build not run here" in result.report["compile"]["note"]
    assert "--fp16" in (out / "build_engine.sh").read_text()
    portable = sum((out / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert portable < 0.6 * result.report["model"]["float32_weight_bytes"]
    assert (out / "model.ort").stat().st_size < 0.6 * result.report["model"]["float32_weight_bytes"]  # still half


@pytest.mark.parametrize(("target", "precision", "extra", "max_change"), [
    ("host", "int8", [], 1.0),
    # AWQ alone at group 64 (GPTQ's rounding, per weight and so slower, runs in the rpi4 default's awq-gptq)
    ("host", "int4", ["--method", "awq", "--group-size", "64", "--calib-samples", "8", "--calib-seqlen", "256"], 25.0),
    ("a100", "int4", ["--method", "rtn"], 25.0),
])
def test_quantized_exports(target: str, precision: str, extra: list[str], max_change: float, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    out = tmp_path / "q"
    code, text = cli(["--target", target, "--model", "smollm2-135m", "--precision", precision, "--out", str(out),
                      "--threads", THREADS, "--json", *extra, *LIGHT], capsys)
    report = json.loads(text)
    assert report["metrics"]["perplexity_change_pct"]["value"] <= max_change
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    domains = {n.domain for n in graph.graph.node}
    assert domains == ({""} if target == "a100" else {"", "com.microsoft"})
    # Quantized artifacts are smaller than the float32 weights and decode faster than the fp32 bound.
    assert report["artifact"]["bytes"] < 0.6 * report["model"]["float32_weight_bytes"]
    assert code in (0, 1)
    if target == "host" and precision == "int4":  # the default int4 head: int4, its hot rows int8 too
        assert [n for n in graph.graph.node if n.op_type == "ScatterElements"]
        assert any("kept at int8 too" in n for n in report["compression"]["notes"])
    if target == "host":  # the host is the target: its measured decode over its own roofline
        frac = report["metrics"]["decode_fraction_of_roofline"]
        assert 0 < frac["value"] < 1.5
        assert "host's roofline" in frac["where"]


@pytest.mark.parametrize(("target", "method", "op", "max_change"), [
    ("a100", "smoothquant", "QuantizeLinear", 10.0),
    ("host", "dynamic", "MatMulInteger", 5.0),
])
def test_w8a8_exports(target: str, method: str, op: str, max_change: float, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    out = tmp_path / "w8a8"
    code, text = cli(["--target", target, "--model", "smollm2-135m", "--precision", "int8", "--method", method,
                      "--calib-samples", "8", "--calib-seqlen", "256", "--smooth-alpha", "0.8", "--out", str(out),
                      "--threads", THREADS, "--json", *LIGHT], capsys)
    report = json.loads(text)
    assert code in (0, 1), report["notes"]
    # A broken Q/DQ or scale costs hundreds of percent; small calibration here costs a few.
    assert report["metrics"]["perplexity_change_pct"]["value"] <= max_change
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count(op) == 30 * 4  # q/k/v and gate/up share one int8 GEMM each
    # The int8 GEMMs are standard ops; ONNX Runtime's graph (host) adds only its fused attention and norms.
    contrib = {n.op_type for n in graph.graph.node if n.domain}
    assert contrib == (set() if target == "a100" else {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"})
    layers = report["compression"]["layers"]
    assert len(layers) == 30 * 7
    if method == "smoothquant":
        assert all(e["act_scale"] > 0 and "act_sqnr_db" in e for e in layers)
        assert {e["smooth_alpha"] for e in layers} == {0.8, "none"}  # o_proj has no producer to fold into
        # down_proj's input is smoothed, then rotated online by a 128-block Hadamard, in every layer
        blocks = [i for i in graph.graph.initializer if i.name.endswith(".rotation.block")]
        assert len(blocks) == 30
        assert all(list(i.dims) == [128, 128] for i in blocks)
        assert any("Hadamard" in n for n in report["compression"]["notes"])


def test_a100_sparse_fp16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a100"
    code, text = cli(["--target", "a100", "--model", "smollm2-135m", "--sparsity", "2:4", "--sparsity-method",
                      "wanda", "--calib-samples", "8", "--calib-seqlen", "256", "--out", str(out), "--json", *LIGHT],
                     capsys)
    report = json.loads(text)
    assert code == 0, report["notes"]
    # Pruning without fine-tuning has no accuracy goal; only the runtimes' agreement with each other is judged.
    assert report["verdict"] == "PASS"
    assert not any(g["metric"] == "perplexity_change_pct" for g in report["goals"])
    assert report["metrics"]["perplexity"]["value"] > report["metrics"]["perplexity_reference"]["value"]
    assert report["sparsity"]["all_satisfy_pattern"]
    assert report["sparsity"]["weights_checked"] == 30 * 4
    assert report["sparsity"]["mean_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any("--sparsity=enable" in n for n in report["notes"])


def test_python_api_encoder(tmp_path: Path) -> None:
    import slm_export

    r = slm_export.export("minilm-l6", target="host", out=tmp_path / "x", settings=LIGHT_SETTINGS)
    assert r.passed
    assert r.report["metrics"]["embedding_cosine_min"]["value"] > 0.9999


def test_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slm_export.cli", "--target", "host", "--model", "smollm2-135m",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.time() + 300
    for line in proc.stderr:
        if "validate: start" in line:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest  # SIGTERM: 128 + 15, as shells report it
    assert "interrupted" in rest
    assert not out.exists()
    assert not list(tmp_path.glob(".interrupted.partial-*"))
