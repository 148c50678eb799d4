"""GGUF files of qwen3, gemma2, gemma3 (text) and phi3, written the way llama.cpp's converter writes them, load
into transformers models whose logits equal the originals' (float32 tensors, so the match is tight).

``convert`` below follows convert_hf_to_gguf.py's TextModel, Gemma2Model, Gemma3Model and Phi3MiniModel: the
metadata each writes, tensor names through gguf-py's own TensorNameMap (not the reader's table), Gemma's norms
with 1 added and its head left out, Phi-3's LongRoPE factors as tensors. Every feature bites within the 16-token
sequence: windows of 4, soft-caps low enough to clip, a LongRoPE original length of 8, scaled rotations,
partial rotation and random norm weights; ``test_each_key_is_read`` drops one key at a time and requires the
logits to move, so a key the reader ignored would fail there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.families import FAMILIES, VOCAB

SEQ = 16
_GGUF_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def _config(family: str) -> Any:
    import transformers

    cls, kwargs = FAMILIES[family]
    kwargs = dict(kwargs)
    if family == "qwen3":  # YaRN, 4x over 8 positions
        kwargs.update(max_position_embeddings=32, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0})
    elif family == "gemma2":  # llama.cpp scales queries by the head size (it writes no scalar)
        kwargs.update(query_pre_attn_scalar=16)
    elif family == "gemma3_text":  # llama.cpp's pattern: 5 local layers, then a global one
        kwargs.pop("layer_types")
        kwargs.update(num_hidden_layers=6, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                          "rope_theta": 10000.0}})
    elif family == "phi3":  # LongRoPE over half of each head, a window of 4
        rng = np.random.default_rng(3)
        kwargs.update(original_max_position_embeddings=8, sliding_window=4, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "long_factor": [float(x) for x in rng.uniform(1.0, 8.0, 4)],
            "short_factor": [float(x) for x in rng.uniform(0.5, 2.0, 4)]})
    return getattr(transformers, cls)(**kwargs)


def _model(family: str) -> Any:
    """The seeded random model, its norm weights random multiples of 1/16 (exact after the converter's +1)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randint(-8, 9, p.shape) / 16.0 + (0.0 if "gemma" in family else 1.0))
    return model


def _metadata(w: Any, c: Any, arch: str) -> None:
    """The hyperparameters each converter class writes (set_gguf_parameters)."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    if arch == "phi3":
        rot = int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_rope_dimension_count(rot)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)
        return
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if arch == "gemma2":  # Gemma2Model writes no rope key
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
        return
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    elif full.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    w.add_rope_freq_base(full["rope_theta"])
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if arch == "gemma3":
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)


def _vocabulary(w: Any, n_vocab: int) -> None:
    """A byte-level vocabulary padded to the embedding's rows as the converter pads ([PADn], unused)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<pad>", *bytes_to_unicode().values(), "he", "ll"]
    types = [3, 3] + [1] * 258
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [5] * (n_vocab - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)


def _tensors(model: Any, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, named by gguf-py's TensorNameMap as the converter's map_tensor_name does."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    out = {}
    for hf, t in model.state_dict().items():
        if arch.startswith("gemma") and hf == "lm_head.weight":
            continue  # Gemma2Model/Gemma3Model skip the head: llama.cpp reads the embedding table
        value = t.detach().numpy().astype(np.float32)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            value = value + np.float32(1.0)
        out[names.get_name(hf, try_suffixes=(".weight", ".bias"))] = value
    rope = c.rope_parameters
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    return out


def convert(model: Any, path: Path, drop: tuple[str, ...] = (), edit: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as llama.cpp's converter would; ``drop`` leaves keys or tensors out, ``edit`` replaces
    values (a key's new value, or a tensor's) and adds tensors the model lacks."""
    import gguf

    c = model.config
    arch = _GGUF_ARCH[c.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    _metadata(w, c, arch)
    if arch == "phi3" and c.rope_parameters.get("rope_type") == "longrope":
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _vocabulary(w, c.vocab_size)
    for kv in w.kv_data:
        for key in [k for k in kv if k.split(".", 1)[-1] in drop or k in drop]:
            del kv[key]
        for key, value in (edit or {}).items():
            if key in kv:
                kv[key] = gguf.GGUFValue(value, kv[key].type)
    tensors = _tensors(model, arch)
    tensors.update({k: v for k, v in (edit or {}).items() if k.endswith((".weight", ".bias"))})
    for name, value in tensors.items():
        if name not in drop:
            w.add_tensor(name, np.asarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ids() -> Any:
    import torch

    return torch.from_numpy(np.random.default_rng(7).integers(2, VOCAB, (1, SEQ)))


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(_ids()).logits


FAMILY_NAMES = list(_GGUF_ARCH)


@pytest.fixture(scope="module")
def originals() -> dict[str, Any]:
    return {f: _model(f) for f in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loaded_model_equals_the_original(family: str, originals: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from slm_export.models.loader import load_model

    original = originals[family]
    loaded = load_model(str(convert(original, tmp_path / f"{family}.gguf")))
    assert loaded.model_type == family
    module = loaded.torch_module()
    assert sorted(module.state_dict()) == sorted(original.state_dict())
    want = _logits(original)
    assert float(want.std()) > 0.1  # logits far from flat
    torch.testing.assert_close(_logits(module), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "drop"), [
    ("qwen3", ("rope.scaling.type",)),
    ("gemma2", ("attention.sliding_window",)),
    ("gemma2", ("attn_logit_softcapping",)),
    ("gemma2", ("final_logit_softcapping",)),
    ("gemma3_text", ("attention.sliding_window",)),
    ("gemma3_text", ("rope.freq_base_swa",)),
    ("gemma3_text", ("rope.scaling.type",)),
    ("gemma3_text", ("final_logit_softcapping",)),
    ("phi3", ("rope_factors_long.weight", "rope_factors_short.weight")),
    ("phi3", ("attention.sliding_window",)),
])
def test_each_key_is_read(family: str, drop: tuple[str, ...], originals: dict[str, Any], tmp_path: Path) -> None:
    """Without the key (llama.cpp's default then applies) the logits move: the reader reads it, and it bites."""
    import torch

    from slm_export.models.loader import load_model

    original = originals[family]
    loaded = load_model(str(convert(original, tmp_path / f"{family}.gguf", drop=drop)))
    assert (_logits(loaded.torch_module()) - _logits(original)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(load_model(str(convert(original, tmp_path / "all.gguf"))).torch_module()),
                               _logits(original), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "drop", "edit", "expected"), [
    ("qwen3", ("attention.head_count",), {}, "lacks qwen3.attention.head_count"),
    ("gemma2", ("block_count",), {}, "lacks gemma2.block_count"),
    ("gemma3_text", (), {"gemma3.rope.scaling.type": "longrope"}, "gemma3.rope.scaling.type is 'longrope'"),
    ("gemma3_text", ("rope.scaling.factor",), {}, "lacks gemma3.rope.scaling.factor"),
    ("phi3", (), {"rope_factors_long.weight": np.ones(3)}, "rope_factors_long.weight is of shape (3,)"),
    ("phi3", ("rope_factors_short.weight",), {}, "rope_factors_short.weight is missing"),
])
def test_malformed_metadata_is_a_clear_error(family: str, drop: tuple[str, ...], edit: dict[str, Any],
                                              expected: str, originals: dict[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from slm_export.cli import main

    path = convert(originals[family], tmp_path / f"{family}.gguf", drop=drop, edit=edit)
    code = main(["--target", "host", "--model", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 2, out
    assert expected in out
    assert "Traceback" not in out


def test_an_unknown_tensor_is_refused(originals: dict[str, Any], tmp_path: Path) -> None:
    """A weight the reader has no name for would be left out silently, loading another model."""
    from slm_export.errors import ModelLoadError
    from slm_export.models.loader import load_model

    extra = {"blk.0.ffn_gate_inp.weight": np.ones((4, 64), np.float32)}
    path = convert(originals["qwen3"], tmp_path / "extra.gguf", edit=extra)
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_inp.weight has no place in a qwen3 model"):
        load_model(str(path))
