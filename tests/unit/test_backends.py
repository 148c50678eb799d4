"""Backends on tiny models: compile, load what was written, run it, compare; the registry; the CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from slm_export.backends import BACKENDS, CompileJob, availability, compile_all, get_backend, validated_file
from slm_export.backends.tensorrt import shape_profile
from slm_export.backends.vitis import partition
from slm_export.calibration.compress import CompressConfig, compress
from slm_export.cli import main
from slm_export.errors import CompileError
from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.pipeline import make_plan
from slm_export.targets import get_target
from slm_export.targets.profile import KNOWN_BACKENDS
from slm_export.validation.generate import OnnxDecoder, make_session

# tests: here, test_executorch.py, test_tvm.py, test_llamacpp.py
TESTED = {"onnxruntime", "tensorrt", "vitis-ai", "executorch", "tvm", "llamacpp"}
IDS = np.asarray([[3, 9, 27, 81, 243, 100, 7, 1]], dtype=np.int64)


def test_every_backend_is_tested_and_checks_itself() -> None:
    assert set(BACKENDS.names()) == TESTED
    rows = {r.backend: r for r in availability()}
    assert set(rows) == set(KNOWN_BACKENDS)  # the profile backends not built yet are listed too
    for name in TESTED:
        r = get_backend(name).check()
        assert r.backend == name
        assert r.reason
        if not r.usable:
            assert r.install  # says how to get it
    assert rows["onnxruntime"].usable
    assert rows["onnxruntime"].version


def _export(tiny: Path, target: str, tmp_path: Path, precision: str | None = None, **opts):  # type: ignore[no-untyped-def]
    profile = get_target(target)
    plan = make_plan(profile, str(tiny), tmp_path / "plan-out", precision, **opts)
    model = load_model(str(tiny))
    weights = None
    if plan.precision in ("int8", "int4"):
        weights = compress(model, plan).weights  # the plan is the compress stage's config
    folder = tmp_path / target
    folder.mkdir()
    exported = OnnxExporter().export(model, plan, folder, weights)
    return plan, profile, exported


@pytest.mark.parametrize(("target", "runtime_file"), [("rpi4b", "model.ort"), ("host", "model.optimized.onnx")])
def test_onnxruntime_offline_optimized_artifact(target: str, runtime_file: str, tiny_models: dict[str, Path],
                                                tmp_path: Path) -> None:
    plan, profile, exported = _export(tiny_models["llama"], target, tmp_path, "fp32")
    result = get_backend("onnxruntime").compile(CompileJob(plan, profile, exported.model_path))
    folder = exported.model_path.parent
    assert result.status == "done"
    assert result.runtime_model == runtime_file
    assert (folder / runtime_file).is_file()
    if target == "rpi4b":  # ORT format + the operator list of ORT's reduced build
        config = (folder / "model.required_operators.config").read_text().splitlines()
        ops = {op for line in config if not line.startswith("#") for op in line.split(";")[2].split(",")}
        assert {"MatMul", "GroupQueryAttention", "SimplifiedLayerNormalization"} <= ops  # the fused ORT graph
        assert all(line.count(";") == 2 for line in config if not line.startswith("#"))
    portable = OnnxDecoder(make_session(exported.model_path, 1)).logits(IDS)
    optimized = OnnxDecoder(make_session(folder / runtime_file, 1, optimize=False)).logits(IDS)
    np.testing.assert_allclose(optimized, portable, atol=1e-4, rtol=1e-4)


def test_android_and_rpi4_validate_the_ort_file(tiny_models: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rpi4"
    code = main(["--target", "rpi4", "--model", str(tiny_models["llama"]), "--out", str(out), "--calib-samples", "4",
                 "--calib-seqlen", "64", "--json", "--no-emulate"])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1), capsys.readouterr().err
    assert report["validated_file"] == "model.ort"
    assert "model.ort" in report["metrics"]["perplexity"]["where"]
    assert [b["backend"] for b in report["backends"]] == ["onnxruntime", "tvm"]
    assert report["backends"][1]["status"] == "done"  # the TVM library is the second runtime: cross-checked
    assert [c["file"] for c in report["crosschecks"]] == ["tvm_host.so"]
    assert abs(report["metrics"]["tvm_perplexity_change_vs_validated_pp"]["value"]) < 5
    assert report["emulation"] == []  # --no-emulate
    assert {"model.ort", "model.required_operators.config", "tvm_aarch64.so"} <= {p.name for p in out.iterdir()}


def test_validated_file_choice() -> None:
    from slm_export.backends import CompileResult

    ort = CompileResult("onnxruntime", "done", "", ("model.ort",), "model.ort")
    trt = CompileResult("tensorrt", "not run", "")
    et = CompileResult("executorch", "not run", "")
    assert validated_file([ort], "model.onnx") == "model.ort"
    assert validated_file([trt, ort], "model.onnx") == "model.onnx"  # exact int8 products of the portable graph
    assert validated_file([et, ort], "model.onnx") == "model.ort"


def test_tensorrt_script_and_profile(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan, profile, exported = _export(tiny_models["llama"], "jetson-tx2", tmp_path)
    result = get_backend("tensorrt").compile(CompileJob(plan, profile, exported.model_path))
    folder = exported.model_path.parent
    script = (folder / "build_engine.sh").read_text()
    cmd = shlex.split(script.strip().splitlines()[-1])
    assert "--fp16" in cmd
    assert "--workspace=1024" in cmd  # TensorRT 8.0/8.2 spelling, 1/8 of the TX2's 8 GB
    shapes = json.loads((folder / "trt_profile.json").read_text())
    assert shapes == shape_profile(exported.model_path, plan.max_seq_len)
    kv = shapes["past_key_values.0.key"]
    assert kv["min"][2] == 0
    assert kv["max"][2] == plan.max_seq_len - 1
    assert shapes["input_ids"]["opt"] == [1, 1]  # a decode step
    mins = next(a for a in cmd if a.startswith("--minShapes="))
    assert "past_key_values.0.key:1x" in mins
    if not get_backend("tensorrt").check().usable:
        assert result.status == "not run"
        assert "engine build not run here" in result.note


def test_tensorrt_a100_int8_sparse_flags(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan, profile, exported = _export(tiny_models["llama"], "a100", tmp_path, "int8", sparsity="2:4",
                                      calib_samples=4, calib_seqlen=64)
    get_backend("tensorrt").compile(CompileJob(plan, profile, exported.model_path))
    cmd = (exported.model_path.parent / "build_engine.sh").read_text()
    assert "--int8" in cmd
    assert "--sparsity=enable" in cmd
    assert "--memPoolSize=workspace:4096" in cmd


def test_tensorrt_builds_an_engine_where_it_can(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    if not get_backend("tensorrt").check().usable:
        pytest.skip("no tensorrt package and NVIDIA GPU on this machine: the engine build cannot run here")
    plan, profile, exported = _export(tiny_models["llama"], "a100", tmp_path, "fp16")
    result = get_backend("tensorrt").compile(CompileJob(plan, profile, exported.model_path))
    assert result.status == "done"
    assert (exported.model_path.parent / "model.engine").stat().st_size > 0


def test_vitis_partition_puts_the_linear_layers_on_the_dpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan, profile, exported = _export(tiny_models["llama"], "fpga", tmp_path, calib_samples=4, calib_seqlen=64)
    results = compile_all(CompileJob(plan, profile, exported.model_path))
    assert [r.backend for r in results] == ["vitis-ai", "onnxruntime"]
    vitis = results[0]
    folder = exported.model_path.parent
    part = json.loads((folder / "dpu_partition.json").read_text())
    layers = load_model(str(tiny_models["llama"])).config.num_hidden_layers
    import onnx

    g = onnx.load(str(exported.model_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    int8_linear = [n for n in g.node if n.op_type == "MatMul" and producer.get(n.input[1]) is not None
                   and producer[n.input[1]].op_type == "DequantizeLinear" and producer[n.input[1]].input[0] in inits]
    assert part["dpu_ops"] == len(int8_linear) >= 4 * layers  # every int8 linear layer (same-scale ones fused)
    attention = [o for o in part["ops"] if o["op"] == "MatMul" and "attention" in o["reason"]]
    assert len(attention) == 2 * layers  # QK^T and PV stay on the CPU
    assert {o["op"] for o in part["ops"] if o["side"] == "cpu"} >= {"Softmax"}
    floats = [o for o in part["ops"] if o["op"] in ("MatMul", "Gemm") and o["reason"].startswith("float weight")]
    assert len(floats) == layers + 1  # the down_proj rotation of each layer, and the float LM head
    assert 0 < part["dpu_share"] < 1
    assert part["dpu_share"] + part["cpu_share"] == pytest.approx(1, abs=1e-3)
    assert json.loads((folder / "arch.json").read_text())["fingerprint"] == profile.gpu.dpu_fingerprint
    assert "vai_c_xir" in (folder / "compile_dpu.sh").read_text()
    assert vitis.status == "not run"
    assert "DPU compile not run here" in vitis.note


def test_vitis_refuses_non_dpu_scales(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_models["llama"]))
    weights = compress(model, CompressConfig("int8", "smoothquant", calib_samples=4, calib_seqlen=64)).weights
    profile = get_target("fpga")
    plan = make_plan(profile, str(tiny_models["llama"]), tmp_path / "o")
    (tmp_path / "x").mkdir()
    exported = OnnxExporter().export(model, plan, tmp_path / "x", weights)  # per-channel scales, not pow2
    with pytest.raises(CompileError, match="cannot go to the DPU; first: .*scale is not a single per-tensor"):
        get_backend("vitis-ai").compile(CompileJob(plan, profile, exported.model_path))
    part = partition(exported.model_path, 8)
    assert part["dpu_ops"] == 0


def test_backends_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    for name in KNOWN_BACKENDS:
        assert name in text
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["backend"] for r in rows} == set(KNOWN_BACKENDS)
    assert "rpi4b" in next(r for r in rows if r["backend"] == "onnxruntime")["targets"]


def test_half_precision_ort_keeps_half_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan, profile, exported = _export(tiny_models["llama"], "jetson-tx2", tmp_path, "fp16")
    get_backend("onnxruntime").compile(CompileJob(plan, profile, exported.model_path))
    folder = exported.model_path.parent
    # float32 weights would make the .ort about twice the half-width data file
    assert (folder / "model.ort").stat().st_size < 1.3 * (folder / "model.onnx.data").stat().st_size
    portable = OnnxDecoder(make_session(exported.model_path, 1)).logits(IDS)
    ort_logits = OnnxDecoder(make_session(folder / "model.ort", 1, optimize=False)).logits(IDS)
    np.testing.assert_allclose(ort_logits, portable, atol=1e-4, rtol=1e-4)


def test_accuracy_level_follows_the_target_cpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # ORT quantizes MatMulNBits' activations to int8 only where the CPU has dot products (x86 here, the phone);
    # the Pi's Cortex-A72 multiplies in float32 at any level, so its artifact says 1 and the host computes alike.
    tiny = str(tiny_models["llama"])
    assert make_plan(get_target("rpi4b"), tiny, tmp_path / "a", "int4").accuracy_level == 1
    assert make_plan(get_target("android"), tiny, tmp_path / "b", "int4").accuracy_level == 4
    assert make_plan(get_target("host"), tiny, tmp_path / "c", "int4").accuracy_level == 4
    assert make_plan(get_target("rpi4b"), tiny, tmp_path / "d", "int4", accuracy_level=4).accuracy_level == 4


def test_quantized_head_default_follows_the_backend(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # ONNX Runtime first (host, rpi4b): weight-only int4/int8 quantize the LM head to int8 unless told; on
    # an ONNX-Runtime-only target (host) int4 makes it int4 with its hot rows int8 too; ExecuTorch first
    # (android) keeps it float (a grouped int8 head through XNNPACK is not verified); W8A8 leaves it alone.
    tiny = str(tiny_models["llama"])
    host = make_plan(get_target("host"), tiny, tmp_path / "a", "int4")
    assert (host.lm_head_bits, host.lm_head_hot) == (4, 0.15)
    assert any("LM head is int4, with the 15% of its rows" in n for n in host.notes)
    assert make_plan(get_target("host"), tiny, tmp_path / "i", "int4", lm_head_bits=8).lm_head_hot == 0
    assert make_plan(get_target("rpi4b"), tiny, tmp_path / "b", "int4").lm_head_bits == 8
    assert make_plan(get_target("android"), tiny, tmp_path / "c", "int4").lm_head_bits == 0
    assert make_plan(get_target("host"), tiny, tmp_path / "d", "int8").lm_head_bits == 8  # weight-only int8
    assert make_plan(get_target("host"), tiny, tmp_path / "g", "int8", method="smoothquant").lm_head_bits == 0
    assert make_plan(get_target("host"), tiny, tmp_path / "h", "fp32").lm_head_bits == 0
    assert make_plan(get_target("host"), tiny, tmp_path / "e", "int4", lm_head_bits=0).lm_head_bits == 0
    assert make_plan(get_target("host"), tiny, tmp_path / "f", "int4", lm_head_bits=4).lm_head_bits == 4


def test_emulated_agreement_goal_depends_on_who_quantizes_activations() -> None:
    from slm_export.goals import run_goals

    metrics = {"emulated_onnxruntime_agreement_with_host": {"value": 0.98}}
    assert run_goals(metrics, quantized=True)[0].threshold == 0.99
    assert run_goals(metrics, quantized=True, act_quant=True)[0].threshold == 0.93
