"""ExecuTorch backend on tiny models: the .pte is lowered to XNNPACK, run by ExecuTorch's runtime, and
agrees with the PyTorch reference (float) and with the ONNX Runtime artifact of the same int4 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slm_export.backends import CompileJob, get_backend
from slm_export.backends.executorch.torch_decoder import build_torch_decoder
from slm_export.calibration.quant import quantize_rtn
from slm_export.cli import main
from slm_export.errors import CompileError
from slm_export.models import load_model
from slm_export.models.adapters import spec_for
from slm_export.pipeline import make_plan
from slm_export.runner.pte_run import PteDecoder
from slm_export.targets import get_target
from slm_export.validation.generate import OnnxDecoder, make_session


def _android(tiny: Path, out: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    code = main(["--target", "android", "--model", str(tiny), "--out", str(out), "--calib-samples", "4",
                 "--calib-seqlen", "64", "--json", *extra])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1)
    return report


def test_float_pte_runs_in_executorch_and_matches_the_reference(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "qwen2"  # q/k/v biases and grouped-query heads
    report = _android(tiny_models["qwen2"], out, "--precision", "fp32")
    et, ort = report["backends"]
    assert (et["backend"], et["status"], ort["backend"], ort["status"]) == ("executorch", "done", "onnxruntime", "done")
    assert report["validated_file"] == "model.pte"
    m = report["metrics"]
    assert "executorch" in m["perplexity"]["where"]
    assert "model.pte" in m["perplexity"]["where"]
    assert m["top1_agreement"]["value"] >= 0.999
    assert m["max_abs_logit_diff"]["value"] < 1e-3
    assert m["greedy_match"]["value"] is True
    assert m["decode_tokens_per_s_p50"]["value"] > 0
    table = json.loads((out / "pte_delegation.json").read_text())
    ops = {(r["op"], r["delegated"]): r for r in table["operators"]}
    assert ("aten_linear_default", True) in ops  # every projection in XNNPACK
    assert table["xnnpack_partitions"] >= 1
    sdpa = ops[("llama_custom_sdpa_default", False)]
    assert "attention kernel" in sdpa["why"]
    assert all(r["why"] for r in table["operators"] if not r["delegated"])
    assert et["details"]["not_delegated"]["llama_custom_sdpa_default"] == 2  # one per layer


def test_int4_pte_agrees_with_the_ort_artifact_of_the_same_weights(tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "llama"
    report = _android(tiny_models["llama"], out)  # profile default: int4
    assert report["plan"]["precision"] == "int4"
    assert report["plan"]["symmetric"] is True
    assert any("XNNPACK" in n for n in report["plan"]["notes"])
    assert "8da4w" in report["backends"][0]["note"]
    ids = np.random.RandomState(0).randint(2, 384, (1, 96))
    pte = PteDecoder(out / "model.pte", 1).logits(ids)[0]
    ort = OnnxDecoder(make_session(out / "model.ort", 1)).logits(ids)[0]
    # Both quantize activations to int8 at run time (XNNPACK per token, MatMulNBits level 4 per block):
    # close, not equal.
    assert (pte.argmax(-1) == ort.argmax(-1)).mean() >= 0.8
    assert np.abs(pte - ort).max() < 0.25 * np.abs(ort).max()
    # decode through the program's KV cache = full recompute
    dec = PteDecoder(out / "model.pte", 1)
    tokens, timing = dec.generate(ids[0, :40].tolist(), 6)
    full = dec.logits(np.asarray([ids[0, :40].tolist() + tokens[:-1]]))[0]
    assert full[39:].argmax(-1).tolist() == tokens
    assert len(timing.decode_s) == 5


def test_zero_point_weights_are_refused(tiny_models: dict[str, Path]) -> None:
    model = load_model(str(tiny_models["llama"]))
    weights = dict(model.weights)
    for name in [k for k in weights if k.endswith("proj.weight")]:
        weights[name] = quantize_rtn(weights[name], 4, 32, symmetric=False)
    with pytest.raises(CompileError, match="symmetric"):
        build_torch_decoder(spec_for(model.config, weights), 64)


def test_missing_executorch_is_a_compile_error(tiny_models: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import slm_export.backends.executorch as et

    monkeypatch.setattr(et, "_version", lambda: None)
    backend = get_backend("executorch")
    assert not backend.check().usable
    assert "pip install" in backend.check().install
    profile = get_target("android")
    plan = make_plan(profile, str(tiny_models["llama"]), tmp_path, "fp32")
    model = load_model(str(tiny_models["llama"]))
    job = CompileJob(plan, profile, tmp_path / "model.onnx", model=model)
    with pytest.raises(CompileError, match="install"):
        backend.compile(job)
    # encoders have no ExecuTorch step: said, not faked
    enc = CompileJob(plan, profile, tmp_path / "model.onnx", "encoder", model=model)
    assert backend.compile(enc).status == "not run"
