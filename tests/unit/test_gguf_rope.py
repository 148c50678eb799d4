"""Scaled rotary embeddings in llama and qwen2 GGUF files load as the original model.

``convert`` follows convert_hf_to_gguf.py's LlamaModel and Qwen2Model (TextModel's metadata, llama's q/k
permutation, tensor names through gguf-py's TensorNameMap): rope.scaling.* for linear and yarn, and for llama3
the ``rope_freqs`` tensor computed as LlamaModel.generate_extra_tensors computes it, in torch float32. Every
scaling bites within the 32-token sequence: original contexts of 8 and 16, factors of 4 to 32, and a rope
base of 100 for the llama3 case that blends two channel pairs (the reader fits its parameters there); the
same file without the scaling must give other logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.families import FAMILIES, VOCAB
from tests.unit.test_gguf_families import _vocabulary

SEQ = 32
# name -> (family, rope_parameters)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # two channel pairs blended, the rest divided by 8: the reader fits the line through the blend
    "llama3-fitted": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16, "rope_theta": 100.0}),
    # one pair blended (the reader places the line through it), the rest divided by 32
    "llama3-one-blend": ("llama", {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 10000.0}),
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama-yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                             "beta_fast": 16.0, "rope_theta": 10000.0}),
    "qwen2-yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                             "rope_theta": 10000.0}),
    "qwen2-linear": ("qwen2", {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}),
}


def _model(case: str) -> Any:
    import torch
    import transformers

    family, rope = CASES[case]
    cls, kwargs = FAMILIES[family]
    kwargs = {**kwargs, "max_position_embeddings": 64, "rope_parameters": dict(rope)}
    if family == "qwen2":
        kwargs["use_sliding_window"] = False  # the window is another test's feature
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()


def converter_rope_freqs(rope: dict[str, Any], dim: int) -> Any:
    """LlamaModel.generate_extra_tensors, step for step. (It reads the original context from the config's top
    level, 8192 when absent; the released Llama 3.x configs give 8192 in rope_scaling too, and this tiny model
    keeps its own there, so the file's model is the original's.)"""
    import torch

    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _metadata(w: Any, c: Any, arch: str) -> None:
    """TextModel.set_gguf_parameters, and LlamaModel's vocabulary size and rotated width."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: the rotary halves interleaved as llama.cpp rotates them."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Any, arch: str) -> dict[str, np.ndarray]:
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    if c.rope_parameters["rope_type"] == "llama3":  # generate_extra_tensors comes first
        out["rope_freqs.weight"] = converter_rope_freqs(c.rope_parameters, c.head_dim).numpy()
    for hf, t in model.state_dict().items():
        value = t.detach().numpy().astype(np.float32)
        if arch == "llama" and hf.endswith("q_proj.weight"):
            value = _permute(value, c.num_attention_heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            value = _permute(value, c.num_key_value_heads)
        out[names.get_name(hf, try_suffixes=(".weight", ".bias"))] = value
    return out


def convert(model: Any, path: Path, drop: tuple[str, ...] = (), edit: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as the converter would; ``drop`` leaves keys (without the arch prefix) or tensors out,
    ``edit`` replaces or adds tensors."""
    import gguf

    arch = model.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    _metadata(w, model.config, arch)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _vocabulary(w, model.config.vocab_size)
    for kv in w.kv_data:
        for key in [k for k in kv if k.split(".", 1)[-1] in drop]:
            del kv[key]
    tensors = {**_tensors(model, arch), **(edit or {})}
    for name, value in tensors.items():
        if name not in drop:
            w.add_tensor(name, np.asarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model: Any) -> Any:
    import torch

    ids = torch.from_numpy(np.random.default_rng(7).integers(2, VOCAB, (1, SEQ)))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def originals() -> dict[str, Any]:
    return {case: _model(case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_rope_loads_as_the_original(case: str, originals: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from slm_export.models.loader import load_model

    original = originals[case]
    loaded = load_model(str(convert(original, tmp_path / f"{case}.gguf")))
    rope = loaded.config.rope_parameters
    assert rope["rope_type"] == CASES[case][1]["rope_type"]
    want = _logits(original)
    assert float(want.std()) > 0.1  # logits far from flat
    torch.testing.assert_close(_logits(loaded.torch_module()), want, rtol=1e-5, atol=1e-5)
    # without the scaling (llama.cpp then rotates plainly) the model is another one: the scaling bites
    plain = convert(original, tmp_path / "plain.gguf", drop=("rope_freqs.weight", "rope.scaling.type"))
    assert (_logits(load_model(str(plain)).torch_module()) - want).abs().max() > 1e-2


@pytest.mark.parametrize(("dim", "factor"), [(128, 8.0), (64, 32.0)])
def test_released_llama3_parameters_are_recovered(dim: int, factor: float) -> None:
    """Llama 3.1/3.3 (heads of 128, factor 8) and 3.2 (64, 32): the released values, not a fitted equivalent."""
    from slm_export.models.gguf_rope import llama3_rope

    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    got = llama3_rope(converter_rope_freqs(rope, dim).numpy(), 500000.0, dim)
    assert got == {k: v for k, v in rope.items() if k != "rope_theta"}


@pytest.mark.parametrize(("theta", "dim", "rope"), [
    (10000.0, 16, (32.0, 1.0, 2.0, 12)),  # one blended pair, high/low not the release's 4
    (500000.0, 128, (16.0, 2.0, 8.0, 1000)),  # many blended pairs: the fit gives (500, 1, 4)
    (10.0, 16, (5.5, 1.0, 1.5, 8)),
    (10000.0, 64, (8.0, 1.0, 4.0, 100000)),  # no pair blended: a step between kept and divided
])
def test_other_llama3_parameters_give_the_same_frequencies(theta: float, dim: int, rope: tuple[Any, ...]) -> None:
    """Where the tensor leaves the parameters open (only ratios matter, and a blend of one pair or none fixes
    fewer), the parameters found give Hugging Face's frequencies to float32 rounding."""
    from slm_export.models.gguf_rope import llama3_rope
    from slm_export.models.rope import Rope

    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    params = dict(zip(names, rope, strict=True))
    freqs = converter_rope_freqs({**params, "rope_theta": theta}, dim).numpy()
    assert freqs.min() < freqs.max()  # a scaling that changes something
    got = llama3_rope(freqs, theta, dim)
    assert got["rope_type"] == "llama3"

    def inv_freq(p: dict[str, Any]) -> np.ndarray:
        return Rope(theta, dim, "llama3", tuple(sorted((k, p[k]) for k in names))).inv_freq()

    np.testing.assert_allclose(inv_freq(got), inv_freq(params), rtol=2e-6)
    np.testing.assert_allclose(inv_freq(got), base_inv(theta, dim) / freqs, rtol=2e-6)  # as llama.cpp divides


def base_inv(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2) / dim)


def test_rope_freqs_of_all_ones_is_the_plain_rotation() -> None:
    """A context so short that no wavelength reaches the scaled range: the divisors are 1, the rotation plain."""
    from slm_export.models.gguf_rope import llama3_rope

    assert llama3_rope(np.ones(8, np.float32), 10000.0, 16) == {"rope_type": "default"}


@pytest.mark.parametrize(("freqs", "expected"), [
    (np.linspace(1.0, 8.0, 8)[::-1], "does not correspond to a llama3 rope scaling this reader can express"),
    (np.full(4, 2.0), "rope_freqs.weight has 4 values but the heads rotate 16"),
    (np.full(8, 0.5), "holds values below 1"),
])
def test_rope_freqs_that_no_llama3_scaling_gives_are_refused(freqs: np.ndarray, expected: str,
                                                             originals: dict[str, Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from slm_export.cli import main

    path = convert(originals["llama3-fitted"], tmp_path / "odd.gguf", edit={"rope_freqs.weight": freqs})
    code = main(["--target", "host", "--model", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 2, out
    assert expected in out
    assert "Traceback" not in out


def test_rope_freqs_with_another_scaling_is_refused(originals: dict[str, Any], tmp_path: Path) -> None:
    """llama.cpp would apply both; no Hugging Face rope type does."""
    from slm_export.errors import ModelLoadError
    from slm_export.models.loader import load_model

    freqs = converter_rope_freqs(CASES["llama3-fitted"][1], 16).numpy()
    path = convert(originals["llama-linear"], tmp_path / "both.gguf", edit={"rope_freqs.weight": freqs})
    with pytest.raises(ModelLoadError, match="both rope_freqs.weight and llama.rope.scaling.type linear"):
        load_model(str(path))
