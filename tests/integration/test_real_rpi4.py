"""smollm2-135m for the Raspberry Pi 4B end to end: AWQ+GPTQ int4, ONNX Runtime and TVM, both run under QEMU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_export.cli import main

from .helpers import LIGHT, THREADS, cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rpi4_artifact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("real") / "rpi4"
    # The profile's defaults with a quarter of the calibration tokens (16 x 256, not 64 x 512) and 64-token
    # emulated windows: the suite's time, not the figures (scripts/bench_compress.py and bench_backends.py
    # measure the defaults).
    assert main(["--target", "rpi4", "--model", "smollm2-135m", "--out", str(out), "--threads", THREADS,
                 "--calib-samples", "16", "--calib-seqlen", "256", "--emulate-tokens", "64", *LIGHT]) == 0
    yield out
    shutil.rmtree(out.parent)  # about a gigabyte: gone once the file's tests are done, not at the suite's end


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
                                                     "loads", "crosscheck", "emulate"]
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
    code, out = cli(["validate", str(rpi4_artifact), "--json", "--threads", THREADS, "--no-emulate", *LIGHT],
                    capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["verdict"] == "PASS"
    assert [s["name"] for s in report["stages"]][-4:] == ["load", "validate", "loads", "crosscheck"]
    assert report["emulation"] == []
    assert not any(k.startswith("emulated_") for k in report["metrics"])
