"""The runner's job options reach ONNX Runtime's session (what scripts/diag_ort_arm.py relies on)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from slm_export.runner.job import open_runtime
from slm_export.runner.onnx_run import make_session


def _identity(path: Path) -> Path:
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_session_config_entries_are_set(tmp_path: Path) -> None:
    model = _identity(tmp_path / "m.onnx")
    so = make_session(model, 1, config={"mlas.disable_kleidiai": "1"}).get_session_options()
    assert so.get_session_config_entry("mlas.disable_kleidiai") == "1"
    decoder, runtime = open_runtime(model, 1, ort_config={"session.intra_op.allow_spinning": "0"})
    assert runtime["runtime"] == "onnxruntime"
    assert decoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
