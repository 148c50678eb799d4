"""Every decoder family against transformers at float32, on tiny random models whose features bite (tests/families.py).

For each family and each ONNX form (the portable graph, ONNX Runtime's fused graph, the static FPGA graph):
the logits of a 12-token sequence equal transformers', and greedy decoding through the graph's KV cache
equals transformers' generate for 12 tokens, so windows, soft-caps, per-layer ropes and the rest hold on
the cache path too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.models.adapters import ADAPTERS
from slm_export.models.loader import DECODER_TYPES
from slm_export.plan import Plan
from slm_export.validation.generate import OnnxDecoder, make_session, torch_greedy
from tests.families import FAMILIES, NEUTRAL, VARIANTS, family_config, make_family_model, neutral_config

IDS = np.asarray([[5, 17, 99, 3, 250, 42, 7, 11, 64, 200, 31, 9]], dtype=np.int64)
ALL = [*FAMILIES, *VARIANTS]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_model(name, root / name) for name in ALL}


def _plan(graph_ops: str, static: bool = False) -> Plan:
    return Plan(target="host", model="tiny", out="x", precision="fp32", backend="onnxruntime", graph_ops=graph_ops,
                opset=17, static_shapes=static, max_seq_len=64, validation="host")


def test_every_family_has_a_tiny_model() -> None:
    decoders = set(DECODER_TYPES)
    assert decoders <= set(ADAPTERS.names())
    assert decoders == set(FAMILIES), f"families without a tiny model: {sorted(decoders - set(FAMILIES))}"


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_each_feature_changes_the_output(name: str) -> None:
    """A feature that cannot change the output in these tests would not be tested by them."""
    from transformers import AutoModelForCausalLM

    outs = []
    for config in (family_config(name), neutral_config(name)):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(AutoModelForCausalLM.from_config(config).eval()(torch.from_numpy(IDS)).logits)
    assert (outs[0] - outs[1]).abs().max() > 0.1


@pytest.mark.parametrize("graph_ops", ["standard", "onnxruntime"])
@pytest.mark.parametrize("name", ALL)
def test_family_matches_transformers(name: str, graph_ops: str, family_models: dict[str, Path],
                                     tmp_path: Path) -> None:
    model = load_model(str(family_models[name]))
    result = OnnxExporter().export(model, _plan(graph_ops), tmp_path)
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    with torch.no_grad():
        ref = model.torch_module()(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(dec.logits(IDS), ref, atol=3e-4, rtol=1e-3)
    expect = torch_greedy(model.torch_module(), IDS[0].tolist(), 12)
    got, _ = dec.generate(IDS[0].tolist(), 12)
    assert got == expect


@pytest.mark.parametrize("name", ALL)
def test_family_static_graph_matches_transformers(name: str, family_models: dict[str, Path], tmp_path: Path) -> None:
    """The fixed-shape graph the FPGA flow compiles (no cache, padded to max_seq_len) holds every family too."""
    model = load_model(str(family_models[name]))
    result = OnnxExporter().export(model, _plan("standard", static=True), tmp_path)
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    assert dec.static_len == 64
    with torch.no_grad():
        ref = model.torch_module()(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(dec.logits(IDS), ref, atol=3e-4, rtol=1e-3)


QUANT = [("fp32", None), ("int4", "rtn"), ("int4", "awq-gptq"), ("int8", "smoothquant")]


@pytest.mark.parametrize(("precision", "method"), QUANT, ids=["fp32", "int4-rtn", "int4-default", "w8a8"])
@pytest.mark.parametrize("name", ALL)
def test_family_quantized_artifact_builds_and_validates(name: str, precision: str, method: str,
                                                        family_models: dict[str, Path], tmp_path: Path) -> None:
    """Each family's host artifacts go through the whole CLI flow and its validation on the held-out evaluation
    text: at float32, perplexity within 0.01% of transformers' and the greedy continuation equal; int4 and W8A8
    build and validate with finite figures (random weights make their accuracy meaningless, so no accuracy goal
    is judged for them here: the real-model tests do)."""
    from slm_export import ValidationSettings, export

    settings = ValidationSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=8, decode_tokens=4,
                                  repeats=1, threads=1)
    options = {"method": method, "calib_samples": 4, "calib_seqlen": 32} if method else {}
    result = export(str(family_models[name]), "host", tmp_path / "out", precision, settings=settings, **options)
    accuracy = result.report["metrics"]
    assert np.isfinite(accuracy["perplexity_change_pct"]["value"]), accuracy
    if precision == "fp32":
        assert abs(accuracy["perplexity_change_pct"]["value"]) <= 0.01, accuracy
        assert accuracy["greedy_match"]["value"] is True, accuracy
        assert result.passed
    assert (Path(result.out) / "model.onnx").exists()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gemma3_text"])
def test_windowed_layers_cache_no_more_than_the_window(name: str, family_models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """The portable graph's windowed layers keep the latest window positions as their present; full layers
    keep every position (test_family_matches_transformers decodes through these caches)."""
    from tests.families import WINDOW

    model = load_model(str(family_models[name]))
    result = OnnxExporter().export(model, _plan("standard"), tmp_path)
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    feed = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None],
            **dec._empty_past(1)}
    names = [o.name for o in dec.session.get_outputs() if o.name.startswith("present.") and o.name.endswith(".key")]
    lengths = [out.shape[2] for out in dec.session.run(names, feed)]
    from slm_export.models.adapters import spec_for

    windows = [layer.window for layer in spec_for(model.config, model.weights).layers]
    assert any(windows)
    assert lengths == [WINDOW if w else IDS.shape[1] for w in windows]
