"""smollm2-135m for Android end to end: the ExecuTorch .pte validated, the .ort cross-checked and emulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import LIGHT, THREADS, cli

pytestmark = pytest.mark.slow


def test_android_default_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The ExecuTorch path end to end: the .pte validated through ExecuTorch's runtime, the .ort cross-checked
    # on the host, then run under QEMU as a Cortex-A76 (one 256-token window: 64 tokens left the agreement
    # figure to a handful of tokens). Round to nearest: the backend path is tested here, the calibrated
    # methods by the rpi4 run.
    out = tmp_path / "android"
    code, text = cli(["--target", "android", "--model", "smollm2-135m", "--method", "rtn", "--out", str(out),
                      "--threads", THREADS, "--json", *LIGHT], capsys)
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
