"""Rotary scaling kinds against transformers: the tables against its own rotary modules, and exported graphs
against its models over sequences longer than the original context, where every kind changes the result
(dynamic and longrope change it with the call's length, through the KV cache too)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from slm_export.errors import ConfigError
from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.models.adapters import rope_of
from slm_export.models.rope import Rope, check_fixed_tables
from slm_export.plan import Plan
from slm_export.validation.generate import OnnxDecoder, make_session, torch_greedy
from tests.conftest import VOCAB, _tokenizer

ORIGINAL = 32  # the original context of every case: shorter than the sequences evaluated
SEQ = 48
MAX_LEN = 64
LONG_FACTOR = [1.0, 2.0, 3.0, 5.0, 8.0, 9.0, 12.0, 16.0]
SHORT_FACTOR = [1.0, 1.1, 1.3, 1.6, 2.0, 2.2, 2.5, 3.0]

# name -> (architecture, config fields); head_dim 16 (rotary 8 with the partial factor)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("llama", {"max_position_embeddings": 128, "rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    "dynamic": ("llama", {"max_position_embeddings": ORIGINAL,
                          "rope_parameters": {"rope_type": "dynamic", "factor": 3.0}}),
    "yarn": ("llama", {"max_position_embeddings": 128, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}}),
    "yarn_mscale": ("llama", {"max_position_embeddings": 128, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8,
        "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False, "rope_theta": 500.0}}),
    "llama3": ("llama", {"max_position_embeddings": 128, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL}}),
    "longrope": ("phi3", {"max_position_embeddings": 128, "original_max_position_embeddings": ORIGINAL,
                          "rope_parameters": {"rope_type": "longrope", "short_factor": SHORT_FACTOR,
                                              "long_factor": LONG_FACTOR}}),
    "longrope_partial": ("phi3", {"max_position_embeddings": 128, "original_max_position_embeddings": ORIGINAL,
                                  "partial_rotary_factor": 0.5, "rope_parameters": {
                                      "rope_type": "longrope", "short_factor": SHORT_FACTOR[:4],
                                      "long_factor": LONG_FACTOR[:4]}}),
}
SWITCHING = ("dynamic", "longrope", "longrope_partial")


def _config(name: str, default: bool = False) -> Any:
    import transformers as t

    arch, fields = CASES[name]
    fields = dict(fields)
    if default:  # the same model without the scaling
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields["rope_parameters"].get(
            "rope_theta", 10000.0)}
    common = {"vocab_size": VOCAB, "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 0, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "initializer_range": 0.2}
    return (t.LlamaConfig if arch == "llama" else t.Phi3Config)(**common, **fields)


def _rotary_module(config: Any) -> Any:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return (LlamaRotaryEmbedding if config.model_type == "llama" else Phi3RotaryEmbedding)(config)


def _rope(config: Any) -> Rope:
    head_dim = config.hidden_size // config.num_attention_heads
    return rope_of(config, int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0)))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("length", [20, SEQ])
def test_tables_match_transformers_rotary_module(name: str, length: int) -> None:
    config = _config(name)
    rope = _rope(config)
    with torch.no_grad():  # a fresh module: dynamic's keeps the longest length it has seen
        cos, sin = (a[0].numpy() for a in _rotary_module(config)(torch.zeros(1), torch.arange(length)[None]))
    ours_cos, ours_sin = rope.tables(length, seq_len=length)
    half = rope.dim // 2
    np.testing.assert_allclose(ours_cos, cos, atol=3e-7, rtol=0)
    np.testing.assert_allclose(ours_sin, np.concatenate([-sin[:, :half], sin[:, half:]], -1), atol=3e-7, rtol=0)
    # the scaling bites: not the plain rotary embedding (dynamic only past its original context)
    plain = _rope(_config(name, default=True)).tables(length)[0]
    if name == "dynamic" and length <= ORIGINAL:
        np.testing.assert_allclose(ours_cos, plain, atol=3e-7)
    else:
        assert np.abs(ours_cos - plain).max() > 0.1


@pytest.mark.parametrize("name", SWITCHING)
def test_length_dependent_kinds_switch_past_the_original_context(name: str) -> None:
    rope = _rope(_config(name))
    assert rope.switch_len == ORIGINAL
    assert not rope.length_dependent(ORIGINAL)
    assert rope.length_dependent(ORIGINAL + 1)
    np.testing.assert_array_equal(rope.tables(8, seq_len=ORIGINAL)[0], rope.tables(8)[0])
    assert np.abs(rope.tables(8, seq_len=ORIGINAL + 1)[0] - rope.tables(8)[0]).max() > 1e-3
    check_fixed_tables((rope,), ORIGINAL, "the ExecuTorch build")
    with pytest.raises(ConfigError, match=f"rope_type '{rope.kind}'.*passes {ORIGINAL} positions") as err:
        check_fixed_tables((rope,), MAX_LEN, "the ExecuTorch build")
    assert err.value.exit_code == 2


def test_phi3_keeps_the_original_context_at_the_top_level() -> None:
    config = _config("longrope")
    config.rope_parameters["original_max_position_embeddings"] = 999  # the top-level field wins, as in transformers
    assert _rope(config).param("original_max_position_embeddings") == ORIGINAL
    assert _rope(config).param("max_position_embeddings") == 128


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rope_tok")
    _tokenizer(folder)
    return folder


def _save(config: Any, folder: Path, tokenizer_dir: Path, state: dict[str, Any] | None = None) -> Any:
    """A seeded random model of ``config`` (or with ``state``'s weights) saved with the tokenizer."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tokenizer_dir, folder)
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config).eval()
    if state is not None:
        module.load_state_dict(state)
    module.save_pretrained(folder)
    return module


def _plan(graph_ops: str, static: bool = False) -> Plan:
    return Plan(target="host", model="tiny", out="x", precision="fp32", backend="onnxruntime", graph_ops=graph_ops,
                opset=17, static_shapes=static, max_seq_len=MAX_LEN, validation="host")


def _fresh(folder: Path) -> Any:
    """transformers' model from the folder, fresh: dynamic's rotary module keeps state between calls."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(module: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("graph_ops", ["standard", "onnxruntime"])
@pytest.mark.parametrize("name", [n for n in CASES if n != "yarn_mscale"])
def test_exported_model_matches_transformers_past_the_original_context(name: str, graph_ops: str, tmp_path: Path,
                                                                       tokenizer_dir: Path) -> None:
    config = _config(name)
    module = _save(config, tmp_path / "model", tokenizer_dir)
    (tmp_path / "out").mkdir()
    result = OnnxExporter().export(load_model(str(tmp_path / "model")), _plan(graph_ops), tmp_path / "out")
    graph = onnx.load(str(result.model_path), load_external_data=False)
    fused = sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
    assert fused == (2 if graph_ops == "onnxruntime" and name != "longrope_partial" else 0)
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(1, SEQ)).astype(np.int64)
    ref = _logits(_fresh(tmp_path / "model"), ids)
    np.testing.assert_allclose(dec.logits(ids), ref, atol=2e-4, rtol=1e-3)
    # the scaling bites: the same weights with the plain rotary embedding give other logits
    plain = _save(_config(name, default=True), tmp_path / "plain", tokenizer_dir, module.state_dict())
    assert np.abs(_logits(plain, ids) - ref).max() > 0.05
    if name in SWITCHING:
        # the length decides: the first positions of a short call differ from the same positions of a long one
        short = _logits(_fresh(tmp_path / "model"), ids[:, :24])
        assert np.abs(short - ref[:, :24]).max() > 0.05
        np.testing.assert_allclose(dec.logits(ids[:, :24]), short, atol=2e-4, rtol=1e-3)
        # greedy decoding through the KV cache crosses the original context: prompt 24, 16 new tokens
        expect = torch_greedy(_fresh(tmp_path / "model"), ids[0, :24].tolist(), 16)
        got, _ = dec.generate(ids[0, :24].tolist(), 16)
        assert got == expect


@pytest.mark.parametrize(("edit", "expected"), [
    ({"rope_type": "su-perb"}, "rope_parameters.rope_type 'su-perb' is not supported"),
    ({"rope_type": "proportional"}, "rope_parameters.rope_type 'proportional' is not supported"),
    ({"rope_type": "linear"}, "rope_parameters.factor is missing"),
    ({"rope_type": "linear", "factor": "4"}, "rope_parameters.factor is 4; expected a positive number"),
    ({"rope_type": "dynamic", "factor": -2.0}, "rope_parameters.factor is -2.0; expected a positive number"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "rope_parameters.high_freq_factor (1.0) must be greater than low_freq_factor (4.0)"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_parameters.low_freq_factor is missing"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "rope_parameters.truncate is yes; expected true or"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 3.5},
     "rope_parameters.original_max_position_embeddings is 3.5; expected a positive integer"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 3},
     "rope_parameters.long_factor is (1.0, 1.0, 1.0); expected a list of 8 numbers"),
    ({"rope_type": "longrope", "long_factor": [1.0] * 8}, "rope_parameters.short_factor is missing"),
])
def test_bad_rope_parameters_are_refused_naming_the_field(edit: dict[str, Any], expected: str) -> None:
    from types import SimpleNamespace

    # a config transformers would refuse or warn about itself: only the fields rope_of reads
    cfg = SimpleNamespace(model_type="llama", max_position_embeddings=ORIGINAL, rope_parameters=dict(edit))
    with pytest.raises(ConfigError) as err:
        rope_of(cfg, 16)
    assert err.value.exit_code == 2
    assert str(err.value).startswith("llama: ")
    assert expected in str(err.value), str(err.value)


def _spec(name: str) -> tuple[Any, Any]:
    """The adapted spec of a seeded random model of case ``name``, and the transformers model."""
    from transformers import AutoModelForCausalLM

    from slm_export.models.adapters import spec_for

    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(_config(name)).eval()
    return spec_for(module.config, module.state_dict()), module


def _builders() -> list[Any]:
    from slm_export.backends.executorch.torch_decoder import build_torch_decoder
    from slm_export.backends.tvm.torch_decoder import build_functional_decoder

    return [build_torch_decoder, build_functional_decoder]


@pytest.mark.parametrize("name", SWITCHING)
def test_rebuilds_refuse_a_rope_that_changes_within_their_context(name: str) -> None:
    spec, _ = _spec(name)
    for build, who in zip(_builders(), ("ExecuTorch", "TVM"), strict=True):
        with pytest.raises(ConfigError, match=f"the {who} build cannot build rope_type '{spec.ropes[0].kind}'"):
            build(spec, MAX_LEN)
        build(spec, ORIGINAL)  # a context that never passes the change: the short tables are exact


@pytest.mark.parametrize("name", ["yarn", "llama3"])
def test_rebuilds_match_transformers_with_a_fixed_scaling(name: str) -> None:
    """The ExecuTorch and TVM modules read the same tables (yarn's attention scaling included)."""
    spec, module = _spec(name)
    ids = torch.from_numpy(np.random.default_rng(1).integers(2, VOCAB, size=(1, SEQ)))
    with torch.no_grad():
        ref = module(ids).logits.numpy()
        et, tvm = (build(spec, MAX_LEN) for build in _builders())
        got_et = et(ids, torch.tensor([0])).numpy()
        past = [torch.zeros(1, spec.kv_heads, 0, spec.head_dim) for _ in range(2 * len(spec.layers))]
        got_tvm = tvm(ids, torch.ones_like(ids), torch.arange(SEQ)[None], past)[0].numpy()
    np.testing.assert_allclose(got_et, ref, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(got_tvm, ref, atol=2e-4, rtol=1e-3)


def test_unsupported_rope_type_is_a_config_error_through_the_cli(tmp_path: Path, tokenizer_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A rope type transformers builds but the tables do not implement: exit 2, the field and value named."""
    import json

    from slm_export.cli import main

    config = _config("linear")
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    _save(config, tmp_path / "model", tokenizer_dir)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "proportional"
    out = tmp_path / "o"
    code = main(["--target", "host", "--model", str(tmp_path / "model"), "--out", str(out)])
    text = "".join(capsys.readouterr())
    assert code == 2, text
    assert "rope_parameters.rope_type 'proportional' is not supported" in text
    assert "Traceback" not in text
    assert not out.exists()


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_static_shape_graph_reads_the_real_length(name: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    """The fixed-length graph pads to MAX_LEN and repeats the last position over the padding, so
    max(position_ids) + 1 is the real length: short calls keep the short form, long ones switch."""
    _save(_config(name), tmp_path / "model", tokenizer_dir)
    (tmp_path / "out").mkdir()
    result = OnnxExporter().export(load_model(str(tmp_path / "model")), _plan("standard", static=True),
                                   tmp_path / "out")
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    assert dec.static_len == MAX_LEN
    ids = np.random.default_rng(2).integers(2, VOCAB, size=(1, SEQ)).astype(np.int64)
    for n in (24, SEQ):
        np.testing.assert_allclose(dec.logits(ids[:, :n]), _logits(_fresh(tmp_path / "model"), ids[:, :n]),
                                   atol=2e-4, rtol=1e-3)
