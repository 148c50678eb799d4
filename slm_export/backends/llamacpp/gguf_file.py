"""Write ``model.gguf``: the architecture's metadata, the tokenizer, and every weight under llama.cpp's name.

Names are llama.cpp's (gguf-py's ``tensor_mapping.py``; ``models/gguf.py`` reads them back): ``token_embd``,
``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``, ``attn_norm``, ``ffn_norm``, ``output_norm`` and ``output``
(absent when the head is the embedding table). For the llama architecture llama.cpp's rotary embedding pairs
neighbouring dimensions, so q and k rows are permuted as its converter does (convert_hf_to_gguf.py's
``LlamaModel.permute``: per head, the two rotary halves interleaved); qwen2 is converted without permuting.

The file is written in two passes: every tensor's type and size first (so a tensor no GGUF type holds is
refused before a byte is written), then the data one tensor at a time, so the file is never held in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.backends.llamacpp import blocks
from slm_export.backends.llamacpp.vocab import tokenizer_entries
from slm_export.calibration.quant import QuantizedTensor
from slm_export.errors import CompileError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # Hugging Face model_type -> GGUF's
PERMUTED = ("llama", "mistral")
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}  # gguf.LlamaFileType


@dataclass(frozen=True)
class Planned:
    """One tensor as it will be written: GGUF name, type, the value (permuted already) and its byte count."""

    name: str
    kind: str
    value: Any  # QuantizedTensor or float32 array
    nbytes: int
    matrix: bool


def gguf_name(hf: str) -> str | None:
    """llama.cpp's name for a Hugging Face weight name, None for names it has no tensor for."""
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and m.group(2) in BLOCK_NAMES:
        return f"blk.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def permutation(rows: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's q/k permutation: ``w.reshape(heads, 2, d, ...).swapaxes(1, 2)``."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _rows(value: Any, order: np.ndarray) -> Any:
    if isinstance(value, QuantizedTensor):
        zeros = None if value.zeros is None else value.zeros[order]
        return QuantizedTensor(value.codes[order], value.scales[order], zeros, value.bits, value.group,
                               value.act_scale, value.act_dynamic)
    return value[order]


def _as_array(value: Any) -> Any:
    if isinstance(value, QuantizedTensor):
        return value
    return np.asarray(value.detach().numpy() if hasattr(value, "detach") else value, dtype=np.float32)


def named_tensors(weights: Mapping[str, Any], config: Any) -> Iterator[tuple[str, Any]]:
    """(GGUF name, value) for every weight, q/k permuted for the llama architecture; a tied float head is left
    out (llama.cpp reads the embedding table then). A weight llama.cpp has no tensor for is refused."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    permute = config.model_type in PERMUTED
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for hf, value in weights.items():
        if hf.endswith("rotary_emb.inv_freq"):
            continue  # derived from the config by llama.cpp too
        name = gguf_name(hf)
        if name is None:
            raise CompileError(f"weight {hf} has no llama.cpp tensor (an online rotation or a layer this "
                               "architecture's GGUF form lacks): no GGUF is written")
        if name == "output.weight" and tied and not isinstance(value, QuantizedTensor):
            continue
        value = _as_array(value)
        part = name.split(".")[2] if name.startswith("blk.") else ""
        if permute and part in heads:
            value = _rows(value, permutation(value.shape[0], heads[part]))
        yield name, value


def plan_tensors(weights: Mapping[str, Any], config: Any, precision: str) -> list[Planned]:
    """Every tensor's type and size, refusing (CompileError naming it) one that no GGUF type holds."""
    import gguf

    out = []
    for name, value in named_tensors(weights, config):
        if isinstance(value, QuantizedTensor):
            why = blocks.quant_refusal(value)
            if why:
                raise CompileError(f"{name}: {why}")
            kind = blocks.quant_type(value)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            out.append(Planned(name, kind, value, value.size // block * size, True))
            continue
        matrix = value.ndim == 2
        kind = blocks.float_kind(precision, matrix)
        out.append(Planned(name, kind, value, value.size * (4 if kind == "F32" else 2), matrix))
    return out


def _info(writer: Any, t: Planned) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[t.kind]
    rows = t.value.shape[0] if t.matrix else 1
    if t.kind in ("F32", "F16"):
        writer.add_tensor_info(t.name, t.value.shape, np.dtype(np.float32 if t.kind == "F32" else np.float16),
                               t.nbytes)
    else:
        writer.add_tensor_info(t.name, (rows, t.nbytes // rows), np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)


def _data(t: Planned, precision: str) -> tuple[np.ndarray, float, float]:
    """The tensor's bytes, max |GGUF's dequantized weights - the measured ones|, and that over the tensor's
    largest measured weight (AWQ's scaled-up columns make the absolute figure large where weights are)."""
    if isinstance(t.value, QuantizedTensor):
        kind, data = blocks.encode(t.value)
    else:
        kind, data = blocks.float_tensor(t.value, precision, t.matrix)
    reference = blocks.measured(t.value, precision)
    diff = blocks.weight_difference(kind, data, reference)
    return data, diff, diff / max(float(np.abs(reference).max(initial=0.0)), 1e-30)


def architecture(writer: Any, config: Any, rows: int) -> None:
    """The ``{arch}.*`` hyperparameters llama.cpp's loader reads (llama-model.cpp ``load_hparams``)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    params = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(rows))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def _file_type(tensors: list[Planned]) -> int:
    kinds = [t.kind for t in tensors if t.matrix and t.kind not in ("F32",)]
    if not kinds:
        return FILE_TYPES["F32"]
    return FILE_TYPES[max(set(kinds), key=kinds.count)]


def write_gguf(path: Path, model: Any, weights: Mapping[str, Any], precision: str) -> dict[str, Any]:
    """Write ``path``; returns what it holds: tensor types, bytes, the weight difference, the pre-tokenizer."""
    import gguf

    config = model.config
    tensors = plan_tensors(weights, config, precision)
    rows = next(t.value.shape[0] for t in tensors if t.name == "token_embd.weight")
    entries = tokenizer_entries(model, rows)
    writer = gguf.GGUFWriter(None, ARCHITECTURES[config.model_type])
    writer.add_name(str(model.name))
    architecture(writer, config, rows)
    writer.add_file_type(_file_type(tensors))
    if any(isinstance(t.value, QuantizedTensor) for t in tensors):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for e in entries:
        sub = gguf.GGUFValueType[e.sub_type] if e.sub_type else None
        writer.add_key_value(e.key, e.value, gguf.GGUFValueType[e.vtype], sub_type=sub)
    for t in tensors:
        _info(writer, t)
    partial = path.with_name(path.name + ".partial")
    diffs: dict[str, float] = {}
    worst, relative = ("", 0.0), 0.0
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data, diff, rel = _data(t, precision)
            writer.write_tensor_data(data)
            diffs[t.kind] = max(diffs.get(t.kind, 0.0), diff)
            worst, relative = max(worst, (t.name, diff), key=lambda x: x[1]), max(relative, rel)
        writer.close()
        partial.rename(path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    pre = next((e.value for e in entries if e.key == "tokenizer.ggml.pre"), None)
    return {"gguf_bytes": path.stat().st_size, "architecture": ARCHITECTURES[config.model_type],
            "tensor_types": {k: sum(t.kind == k for t in tensors) for k in sorted({t.kind for t in tensors})},
            "max_abs_weight_diff": max(diffs.values(), default=0.0), "max_abs_weight_diff_by_type": diffs,
            "max_rel_weight_diff": relative,
            "worst_tensor": worst[0] or None, "pre_tokenizer": pre, "vocab": rows,
            "tied_head": all(t.name != "output.weight" for t in tensors)}
