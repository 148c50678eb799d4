"""The predicted peak memory (``memory.py``): printed by --dry-run, put in the report beside the measured peak, and a
plan predicted not to fit is refused before any work, with the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slm_export import memory
from slm_export.models import load_model
from slm_export.planning import make_plan
from slm_export.targets import get_target
from slm_export.validation.validate import ValidationSettings
from tests.conftest import run_cli as _run


def _plan(model: Path, tmp: Path, precision: str, **options: object) -> object:
    return make_plan(get_target("host"), model=str(model), out=tmp / "o", precision=precision, **options)


def test_dry_run_prints_the_prediction_and_refuses_a_plan_that_cannot_fit(
        tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--target", "host", "--model", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--dry-run",
            "--precision", "int4"]
    code, text = _run(argv, capsys)
    assert code == 0, text
    predicted = json.loads(text)["memory"]
    assert set(predicted["stages_mb"]) == {"load", "compress", "export", "compile", "validate"}
    assert predicted["peak_mb"] == max(predicted["stages_mb"].values())
    from slm_export.models import lazy

    monkeypatch.setattr(lazy, "total_memory", lambda *a: 300 << 20)
    code, text = _run(argv, capsys)
    assert code == 3
    assert "predicted peak memory" in text
    assert "exceeds this machine's 0.3 GiB" in text
    assert "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_a_run_predicted_not_to_fit_stops_before_compressing_and_leaves_nothing(
        tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slm_export import export, pipeline
    from slm_export.calibration import compress
    from slm_export.errors import OutOfMemory

    monkeypatch.setattr(pipeline, "total_memory", lambda *a: 300 << 20)
    monkeypatch.setattr(compress, "compress", lambda *a, **k: pytest.fail("compressed a plan that cannot fit"))
    with pytest.raises(OutOfMemory, match="compress|validate|export"):
        export(str(tiny_models["llama"]), "host", tmp_path / "o", "int4")
    assert list(tmp_path.iterdir()) == []


def test_the_report_puts_the_prediction_beside_the_measured_peak(tiny_models: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    from slm_export import export

    settings = ValidationSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=8, decode_tokens=4,
                                  repeats=1, threads=1)
    result = export(str(tiny_models["llama"]), "host", tmp_path / "o", "fp32", settings=settings)
    m = result.report["metrics"]
    assert m["predicted_peak_rss_mb"]["value"] > 0
    assert "stages, MB: load" in m["predicted_peak_rss_mb"]["where"]
    assert m["peak_rss_mb"]["value"] > 0


def test_streaming_and_packing_lower_the_prediction(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The parts of the prediction move the way the run does: a held model's weights are counted in every stage
    after the load, a streamed one's never; int4 results are held at half a byte a code when streamed; a streamed
    reference does not sit beside the session."""
    settings = ValidationSettings()
    held, streamed = load_model(str(tiny_models["llama"]), False), load_model(str(tiny_models["llama"]), True)
    plan = _plan(tiny_models["llama"], tmp_path, "int4", method="gptq")
    a, b = memory.predict(held, plan, settings), memory.predict(streamed, plan, settings)
    weights = held.weight_bytes
    for stage in ("compress", "export", "compile", "validate"):
        assert a.stages[stage] - b.stages[stage] >= weights, stage
    zeros = 0 if plan.symmetric else 1 / 32  # type: ignore[attr-defined]
    assert memory.stored_bytes(plan, True) == pytest.approx(0.5 + 4 / 32 + zeros)
    assert memory.stored_bytes(plan, False) == pytest.approx(1 + 4 / 32 + zeros)
    rtn = memory.predict(streamed, _plan(tiny_models["llama"], tmp_path, "int4", method="rtn"), settings)
    assert rtn.stages["compress"] < b.stages["compress"]  # no calibration activations or Hessians
    shapes = memory.model_shapes(streamed)
    assert shapes.weights * 4 == streamed.weight_bytes
    assert 0 < shapes.layer < shapes.linears <= shapes.weights


def test_an_encoder_is_predicted_too(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_models["bert"]))
    shapes = memory.model_shapes(model)
    assert 0 < shapes.layer < shapes.linears < shapes.weights
    prediction = memory.predict(model, _plan(tiny_models["bert"], tmp_path, "fp32"), ValidationSettings())
    assert prediction.peak >= memory.BASELINE + model.weight_bytes
