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

from slm_export.cli import main
from slm_export.models.builtin import BUILTIN_MODELS
from slm_export.validation.validate import ValidationSettings

pytestmark = pytest.mark.slow

# The suite's validation effort: 2 evaluation windows of 512 tokens (not 8), 8 timed tokens a run (not 64).
# These tests check that each path works and lands in a sane range; scripts/bench_*.py measure the figures
# with the defaults.
LIGHT = ["--eval-windows", "2", "--timing-tokens", "8"]
LIGHT_SETTINGS = ValidationSettings(windows=2, decode_tokens=8)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stdout (the JSON report with --json); progress and errors go to stderr."""
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.out


@pytest.fixture(scope="module")
def rpi4_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "rpi4"
    # The profile's defaults with a quarter of the calibration tokens (16 x 256, not 64 x 512) and 64-token
    # emulated windows: the suite's time, not the figures (scripts/bench_compress.py and bench_backends.py
    # measure the defaults).
    assert main(["--target", "rpi4", "--model", "smollm2-135m", "--out", str(out), "--threads", "2",
                 "--calib-samples", "16", "--calib-seqlen", "256", "--emulate-tokens", "64", *LIGHT]) == 0
    return out


def test_rpi4_default_export(rpi4_artifact: Path) -> None:
    import onnx

    report = json.loads((rpi4_artifact / "report.json").read_text())
    assert report["schema_version"] == 1
    assert report["verdict"] == "PASS"
    assert (report["plan"]["precision"], report["plan"]["method"]) == ("int4", "awq-gptq")
    assert report["metrics"]["perplexity_change_pct"]["value"] <= 10.0
    comp = report["compression"]
    assert (comp["calibration"]["samples"], comp["calibration"]["seqlen"]) == (16, 256)
    assert comp["calibration"]["source"] == "builtin:pydoc-topics/calibration"
    # 30 layers x 7 linears, then the tied LM head: int8 by default on ORT targets, by GPTQ on its inputs
    assert len(comp["layers"]) == 30 * 7 + 1
    assert all("output_sqnr_db" in e for e in comp["layers"])
    assert (comp["layers"][-1]["layer"], comp["layers"][-1]["bits"]) == ("lm_head", 8)
    assert any("LM head quantized to int8 (GPTQ" in n for n in comp["notes"])
    assert comp["bits_per_weight"] < 6.5  # int4 g32 layers 5.125 bits with scales and zeros, int8 head 9.25
    graph = onnx.load(str(rpi4_artifact / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == 30 * 4 + 1
    assert next(t for t in graph.graph.initializer if t.name == "model.embed").data_type == onnx.TensorProto.FLOAT
    assert report["metrics"]["decode_tokens_per_s_p50"]["where"].startswith("measured on host")
    assert report["roofline"]["rpi4b_decode_tokens_per_s_bound"] > 0
    assert [s["name"] for s in report["stages"]] == ["load", "compress", "export", "compile", "validate",
                                                     "crosscheck", "emulate"]
    # The TVM library (rpi4b's second backend) is cross-checked on the host against model.ort, then both
    # aarch64 files run under QEMU with the target's CPU model, each compared with its host run.
    m = report["metrics"]
    assert (rpi4_artifact / "tvm_aarch64.so").is_file()
    assert (rpi4_artifact / "tvm_host.so").is_file()
    assert abs(m["tvm_perplexity_change_vs_validated_pp"]["value"]) <= 0.5
    for prefix in ("emulated_onnxruntime", "emulated_tvm"):
        assert "qemu-aarch64 -cpu cortex-a72" in m[f"{prefix}_perplexity"]["where"]
        assert "not device speed" in m[f"{prefix}_perplexity"]["where"]
    assert abs(m["emulated_onnxruntime_perplexity_change_vs_host_pp"]["value"]) <= 0.5
    # The Pi's cores have no dot product: ORT multiplies in float32 there, and the artifact says so (level 1).
    assert report["plan"]["accuracy_level"] == 1
    assert m["emulated_onnxruntime_agreement_with_host"]["value"] >= 0.99
    # the validation effort asked for: 2 x 512 evaluation tokens, 8 timed, 64-token emulated windows
    assert m["tokens_scored"]["value"] == 2 * 511
    assert m["decode_tokens_per_s_p50"]["where"].endswith(", 8 tokens")
    assert [e["windows"] for e in report["emulation"]] == [[1, 64], [1, 64]]
    assert all(k in report["versions"] for k in ("torch", "onnxruntime", "transformers"))
    assert (rpi4_artifact / "report.md").read_text().startswith("# slm-export report")
    assert (rpi4_artifact / "tokenizer" / "tokenizer.json").is_file()
    assert not list(rpi4_artifact.parent.glob(".rpi4.partial-*"))


def test_validate_existing_artifact(rpi4_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The fixture's run already emulated the aarch64 files; re-validating here checks the host and cross-checks.
    code, out = _cli(["validate", str(rpi4_artifact), "--json", "--threads", "2", "--no-emulate", *LIGHT],
                     capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["verdict"] == "PASS"
    assert [s["name"] for s in report["stages"]][-3:] == ["load", "validate", "crosscheck"]
    assert report["emulation"] == []
    assert not any(k.startswith("emulated_") for k in report["metrics"])


def test_android_default_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The ExecuTorch path end to end: the .pte validated through ExecuTorch's runtime, the .ort cross-checked
    # on the host, then run under QEMU as a Cortex-A76 (one 256-token window: 64 tokens left the agreement
    # figure to a handful of tokens). Round to nearest: the backend path is tested here, the calibrated
    # methods by the rpi4 run.
    out = tmp_path / "android"
    code, text = _cli(["--target", "android", "--model", "smollm2-135m", "--method", "rtn", "--out", str(out),
                       "--threads", "2", "--json", *LIGHT], capsys)
    report = json.loads(text)
    # Measured 2026-12-03 (EPYC, AVX-512 VNNI host): RTN's own goal (+10%) is out of reach for symmetric int4
    # on a 135M model (+28%), and the three int8-activation runtimes (XNNPACK, ORT x86, ORT aarch64) part by
    # more than the 0.5 pp goals (-0.9 pp, -3.0 pp; 93% of top-1 tokens, at the 93% goal's edge). Those goals
    # must fail loudly when they miss; no other may fail. The default (AWQ+GPTQ) meets them: bench_backends.
    failed = {g["metric"] for g in report["goals"] if g["status"] == "FAIL"}
    may_fail = {"perplexity_change_pct", "onnxruntime_perplexity_change_vs_validated_pp",
                "emulated_onnxruntime_agreement_with_host", "emulated_onnxruntime_perplexity_change_vs_host_pp"}
    assert failed <= may_fail, report["goals"]
    assert code == (1 if failed else 0)
    assert report["verdict"] == ("FAIL" if failed else "PASS")
    assert (report["plan"]["precision"], report["plan"]["symmetric"]) == ("int4", True)
    assert report["validated_file"] == "model.pte"
    m = report["metrics"]
    assert "executorch" in m["perplexity"]["where"]
    assert m["perplexity_change_pct"]["value"] <= 40.0  # symmetric RTN int4: about +28% (a broken scale: far more)
    assert [c["file"] for c in report["crosschecks"]] == ["model.ort"]
    # a wrong kernel or layout costs tens of points and most tokens; activation rounding costs a few. Not
    # greedy equality: two int8-activation runtimes of RTN int4 part within 16 tokens on some CPUs (AVX2
    # EPYC, 2026-12-04: agreement 0.922, greedy apart), and for quantized files it is not a goal (run_goals).
    assert abs(m["onnxruntime_perplexity_change_vs_validated_pp"]["value"]) <= 3.0
    assert m["onnxruntime_agreement_with_validated"]["value"] >= 0.85
    delegation = json.loads((out / "pte_delegation.json").read_text())
    assert delegation["xnnpack_partitions"] >= 1
    assert all(r["why"] for r in delegation["operators"] if not r["delegated"])
    emulated = {e["file"]: e for e in report["emulation"]}
    assert emulated["model.ort"]["status"] == "done"
    assert emulated["model.ort"]["windows"] == [1, 256]
    assert emulated["model.pte"]["status"] == "not run"  # ExecuTorch's runtime needs libtorch: CUDA-only on aarch64
    assert "cortex-a76" in m["emulated_onnxruntime_perplexity"]["where"]
    assert "emulated, not device speed" in m["emulated_onnxruntime_decode_tokens_per_s_p50"]["where"]
    assert m["emulated_onnxruntime_agreement_with_host"]["value"] >= 0.9
    assert abs(m["emulated_onnxruntime_perplexity_change_vs_host_pp"]["value"]) <= 6.0


def test_gguf_path_with_user_eval_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydoc_data.topics import topics

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(topics[k] for k in sorted(topics)[-30:]))
    gguf = BUILTIN_MODELS.get("smollm2-135m").path()
    code, out = _cli(["--target", "host", "--model", str(gguf), "--precision", "fp32", "--eval-data", str(notes),
                      "--out", str(tmp_path / "h32"), "--json", "--threads", "2", *LIGHT], capsys)
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
    code, text = _cli(["--target", target, "--model", "smollm2-135m", "--precision", precision, "--out", str(out),
                       "--threads", "2", "--json", *extra, *LIGHT], capsys)
    report = json.loads(text)
    assert report["metrics"]["perplexity_change_pct"]["value"] <= max_change
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    domains = {n.domain for n in graph.graph.node}
    assert domains == ({""} if target == "a100" else {"", "com.microsoft"})
    # Quantized artifacts are smaller than the float32 weights and decode faster than the fp32 bound.
    assert report["artifact"]["bytes"] < 0.6 * report["model"]["float32_weight_bytes"]
    assert code in (0, 1)
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
    code, text = _cli(["--target", target, "--model", "smollm2-135m", "--precision", "int8", "--method", method,
                       "--calib-samples", "8", "--calib-seqlen", "256", "--smooth-alpha", "0.8", "--out", str(out),
                       "--threads", "2", "--json", *LIGHT], capsys)
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


def test_fpga_artifact_maps_linear_layers_to_the_dpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fpga"
    code, text = _cli(["--target", "fpga", "--model", "smollm2-135m", "--calib-samples", "8", "--calib-seqlen", "256",
                       "--out", str(out), "--threads", "2", "--json", *LIGHT], capsys)
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


def test_a100_sparse_fp16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a100"
    code, text = _cli(["--target", "a100", "--model", "smollm2-135m", "--sparsity", "2:4", "--sparsity-method",
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
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    assert not out.exists()
    assert not list(tmp_path.glob(".interrupted.partial-*"))
