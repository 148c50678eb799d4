"""NaN or Inf in any measured output fails the run with its own error, and no goal passes on such a value.

A graph whose logits are all NaN used to "agree" with itself and the reference: argmax of an all-NaN row is
index 0 on both sides, so greedy match was True and top-1 agreement 1.0."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from slm_export.errors import NonFiniteOutput
from slm_export.goals import Goal
from slm_export.text import builtin_split
from slm_export.validation.metrics import check_finite, decoder_accuracy, first_nonfinite
from slm_export.validation.remote import HostRunner, RemoteSettings, remote_validation
from slm_export.validation.validate import ValidationSettings, validate_decoder
from tests.conftest import make_tiny_model

SMALL = ValidationSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=16, decode_tokens=4, repeats=1,
                           threads=1)
REMOTE = RemoteSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=16, repeats=0, threads=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny llama exported twice in float32: as it is, and with one final-norm weight NaN (ONNX only: the
    PyTorch reference stays finite)."""
    from slm_export.exporters.onnx import OnnxExporter
    from slm_export.models import load_model
    from slm_export.plan import Plan

    root = tmp_path_factory.mktemp("nonfinite")
    model = load_model(str(make_tiny_model("llama", root / "llama")))
    plan = Plan(target="host", model="m", out="o", precision="fp32", backend="onnxruntime",
                graph_ops="onnxruntime", opset=17, static_shapes=False, max_seq_len=512, validation="host")
    broken = dict(model.weights)
    norm = broken["model.norm.weight"].clone()
    norm[3] = float("nan")
    broken["model.norm.weight"] = norm
    out = {"model": model}
    for name, weights in (("good", None), ("nan", broken)):
        (root / name).mkdir()
        out[name] = OnnxExporter().export(model, plan, root / name, weights).model_path
    return out


def test_a_nan_graph_fails_host_validation_with_its_own_error(exports: dict[str, Any]) -> None:
    model = exports["model"]
    with pytest.raises(NonFiniteOutput, match=r"host run of model.onnx: the artifact's logits hold nan at window 0, "
                                              r"position 0, vocabulary index 0 \(counted from 0; \d+ of \d+ values"):
        validate_decoder(exports["nan"], model.torch_module(), model.tokenizer, builtin_split("evaluation"), SMALL)
    assert NonFiniteOutput("x").exit_code == 1
    good = validate_decoder(exports["good"], model.torch_module(), model.tokenizer, builtin_split("evaluation"), SMALL)
    assert good["greedy_match"]["value"] is True  # the check costs a finite artifact nothing


def test_a_nan_graph_fails_the_crosscheck(exports: dict[str, Any]) -> None:
    model = exports["model"]
    folder = exports["nan"].parent
    with pytest.raises(NonFiniteOutput, match=r"crosscheck run of model.onnx: window 0's negative log-likelihood "
                                              r"is nan"):
        remote_validation(HostRunner(), folder, "model.onnx", model.torch_module(), model.tokenizer,
                          builtin_split("evaluation"), REMOTE, "tvm", versus="model.onnx", versus_label="validated")


class FakeRunner:
    """A far side whose runtime returned ``nll`` for every window."""

    def __init__(self, name: str, nll: float) -> None:
        self.name, self.nll = name, nll

    def where(self, result: dict[str, Any], file: str) -> str:
        return f"measured on a fake {self.name} ({file})"

    def run(self, artifact: Path, job: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "environment": {}, "greedy": [0] * job["greedy_tokens"],
                "windows": [{"nll": self.nll, "n": len(w) - 1, "argmax": [0] * (len(w) - 1)} for w in job["windows"]]}


@pytest.mark.parametrize(("runner", "label", "nll"), [("emulator", "emulated", math.nan),
                                                      ("device", "device", math.inf)])
def test_emulated_and_device_runs_returning_nan_fail(exports: dict[str, Any], runner: str, label: str,
                                                     nll: float) -> None:
    model = exports["model"]
    with pytest.raises(NonFiniteOutput, match=rf"{label} run of model.onnx: window 0's negative log-likelihood is "
                                              rf"{nll}"):
        remote_validation(FakeRunner(runner, nll), exports["good"].parent, "model.onnx", model.torch_module(),
                          model.tokenizer, builtin_split("evaluation"), REMOTE, runner)


def test_the_host_side_of_a_far_run_is_checked_too(exports: dict[str, Any]) -> None:
    """The far side is fine; the host run it is compared with is the NaN graph."""
    model = exports["model"]
    folder = exports["nan"].parent
    with pytest.raises(NonFiniteOutput, match=r"emulated run of model.onnx, compared with the host run of "
                                              r"model.onnx: the host's logits hold nan"):
        remote_validation(FakeRunner("emulator", 10.0), folder, "model.onnx", model.torch_module(), model.tokenizer,
                          builtin_split("evaluation"), REMOTE, "emulated_onnxruntime")


def test_nan_logits_fed_to_the_metrics_fail_naming_the_side() -> None:
    vocab, n = 16, 6
    rng = np.random.default_rng(0)
    finite = rng.standard_normal((1, n, vocab)).astype(np.float32)
    broken = finite.copy()
    broken[0, 4, 9] = np.inf

    def ref(ids: np.ndarray) -> np.ndarray:
        return finite

    calls = iter([finite, broken])  # the first window is fine, the second is not
    art = SimpleNamespace(logits=lambda ids: next(calls))
    with pytest.raises(NonFiniteOutput, match=r"device run of x.pte: the artifact's logits hold inf at window 1, "
                                              r"position 4, vocabulary index 9 \(counted from 0; 1 of 96 values"):
        decoder_accuracy(ref, art, [list(range(n)), list(range(n))], "x.pte", "device")
    with pytest.raises(NonFiniteOutput, match="the PyTorch float32 reference's logits hold nan"):
        decoder_accuracy(lambda ids: np.full_like(finite, np.nan), SimpleNamespace(logits=lambda ids: finite),
                         [list(range(n))])
    ok = decoder_accuracy(ref, SimpleNamespace(logits=lambda ids: finite), [list(range(n))])
    assert ok["top1_agreement"] == 1.0
    assert ok["max_abs_logit_diff"] == 0.0
    assert first_nonfinite(np.array([[1.0, 2.0], [3.0, -np.inf]])) == (1, 1)
    assert first_nonfinite(np.zeros((2, 2))) is None
    with pytest.raises(NonFiniteOutput, match="sentence 2, dimension 0"):
        check_finite(np.array([[1.0], [2.0], [np.nan]]), "the embeddings", "host run of e.onnx",
                     ("sentence", "dimension"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, np.float32("nan"), "text"])
def test_goals_never_pass_on_a_value_that_is_not_a_finite_number(bad: Any) -> None:
    metrics = {"m_change_pct": {"value": bad, "unit": "%", "where": "here"},
               "m": {"value": bad, "unit": "", "where": "here"}}
    for goal in (Goal("m_change_pct", "<=", 1e9, "max"), Goal("m", ">=", -1e9, "min"), Goal("m", "<=", 1e9, "max"),
                 Goal("m", "==", True, "equals"), Goal("m", "==", 0.0, "equals")):
        result = goal.evaluate(metrics)
        assert result["status"] == "FAIL", goal
        assert result["note"] == "the value is not a finite number"
    finite = {"m": {"value": True, "unit": "bool", "where": "here"}, "n": {"value": np.float64(0.5), "unit": "",
                                                                           "where": "here"}}
    assert Goal("m", "==", True, "equals").evaluate(finite)["status"] == "PASS"
    assert Goal("n", ">=", 0.4, "min").evaluate(finite)["status"] == "PASS"
