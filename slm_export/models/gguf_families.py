"""GGUF metadata -> a Hugging Face config, per architecture, as llama.cpp writes and reads it.

Each family's fields are the keys llama.cpp's converter (convert_hf_to_gguf.py) writes and llama.cpp's loader
(llama-model.cpp ``load_hparams``) reads; where the loader falls back to a default for a missing key, so does
this reader, since that default is what the file means to llama.cpp. A required key that is missing, or any
key of the wrong kind, is refused naming the key.

Tensor names follow gguf-py's tensor_mapping.py. Gemma's norms are stored with 1 added (the converter adds it
because llama.cpp multiplies by the weight itself, Hugging Face by 1 + weight), so the reader subtracts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_export.errors import ModelLoadError
from slm_export.models.gguf_file import MAX_COUNT, ArrayCount, is_int

# GGUF tensor names outside the blocks -> Hugging Face names (every family here names them alike).
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj"}
_GATED_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
LLAMA_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION, **_GATED_MLP}
# Gemma 2 and 3 wrap both sub-blocks in norms: llama.cpp's ffn_norm is the pre-feed-forward norm there.
GEMMA2_BLOCK = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                **_ATTENTION, **_GATED_MLP}
# Phi-3 keeps its fused projections: llama.cpp's attn_qkv is q, k, v stacked, ffn_up is gate then up.
PHI3_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
              "ffn_down": "mlp.down_proj"}
# llama.cpp reads gemma 2 and 3 of these block counts as the 27B models, whose queries are scaled by the
# hidden size over the heads rather than by the head size (llama-model.cpp, f_attention_scale).
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}
# Gemma's classes build a sliding mask whatever the layer types; with no window every layer is global and this
# stand-in length (their default) is read by none.
_NO_WINDOW = 4096

TensorReader = Callable[[str], "np.ndarray | None"]


class Meta:
    """Typed reads of GGUF metadata: each refuses a missing field or a value of the wrong kind, naming the key."""

    def __init__(self, meta: dict[str, Any], prefix: str) -> None:
        self.meta, self.prefix = meta, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def count(self, key: str, default: int | None = None) -> int:
        value = self.meta.get(key, default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {key}, which the {self.prefix} architecture needs")
        if not is_int(value) or not 1 <= value <= MAX_COUNT:
            raise ModelLoadError(f"GGUF metadata {key} is {str(value)[:80]}; expected one positive integer "
                                 f"below 2**31")
        return int(value)

    def whole(self, key: str, default: int) -> int:
        """A count that may be 0 (a sliding window of 0 means none)."""
        value = self.meta.get(key, default)
        if not is_int(value) or not 0 <= value <= MAX_COUNT:
            raise ModelLoadError(f"GGUF metadata {key} is {str(value)[:80]}; expected an integer from 0 to 2**31")
        return int(value)

    def number(self, key: str, default: float) -> float:
        value = self.optional(key)
        return default if value is None else value

    def optional(self, key: str) -> float | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool | ArrayCount) or not math.isfinite(value) \
                or value <= 0:
            raise ModelLoadError(f"GGUF metadata {key} is {str(value)[:80]}; expected a positive number")
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, str):
            raise ModelLoadError(f"GGUF metadata {key} is {str(value)[:80]}; expected a string")
        return value

    def token_id(self, key: str) -> int | None:
        value = self.meta.get(key)
        if value is not None and (not is_int(value) or not 0 <= value <= MAX_COUNT):
            raise ModelLoadError(f"GGUF metadata {key} is {str(value)[:80]}; expected a token id")
        return value

    def vocab(self) -> int:
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if f"{self.prefix}.vocab_size" in self.meta:
            return self.count(f"{self.prefix}.vocab_size")
        if isinstance(tokens, ArrayCount) and 1 <= tokens <= MAX_COUNT:
            return int(tokens)
        raise ModelLoadError(f"GGUF metadata has neither {self.prefix}.vocab_size nor a tokenizer.ggml.tokens array")


def head_dim(m: Meta, cfg: dict[str, Any]) -> int:
    """llama.cpp's n_embd_head_k: attention.key_length, else the embedding over the heads. A value length
    apart from it is a model Hugging Face's classes here do not build."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if m.key("attention.key_length") not in m.meta and hidden % heads:
        raise ModelLoadError(f"GGUF metadata: embedding length {hidden} does not split into {heads} heads and "
                             f"{m.key('attention.key_length')} is missing")
    dim = m.count(m.key("attention.key_length"), hidden // heads)
    value = m.count(m.key("attention.value_length"), dim)
    if value != dim:
        raise ModelLoadError(f"GGUF metadata {m.key('attention.value_length')} is {value} but the key length is "
                             f"{dim}; models with other value heads are not supported")
    return dim


def rope_scaling(m: Meta) -> dict[str, Any]:
    """rope.scaling.* as Hugging Face's rope parameters (no type, or type none: the default rotation)."""
    kind = m.text(m.key("rope.scaling.type"))
    if kind in (None, "none"):
        return {"rope_type": "default"}
    factor = m.optional(m.key("rope.scaling.factor"))
    if factor is None:
        raise ModelLoadError(f"GGUF metadata has {m.key('rope.scaling.type')} {kind} but lacks "
                             f"{m.key('rope.scaling.factor')}")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise ModelLoadError(f"GGUF metadata {m.key('rope.scaling.type')} is {kind[:40]!r}; this reader takes "
                             "none, linear and yarn for this architecture")
    ext = m.number(m.key("rope.scaling.yarn_ext_factor"), 1.0)
    if ext != 1.0:
        raise ModelLoadError(f"GGUF metadata {m.key('rope.scaling.yarn_ext_factor')} is {ext}; Hugging Face's YaRN "
                             "has no extrapolation factor, so only 1 is read")
    out: dict[str, Any] = {"rope_type": "yarn", "factor": factor,
                           "original_max_position_embeddings": m.count(m.key("rope.scaling.original_context_length"))}
    for key, name in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                      ("yarn_beta_slow", "beta_slow")):
        value = m.optional(m.key(f"rope.scaling.{key}"))
        if value is not None:
            out[name] = value
    return out


def _no_partial_rotary(m: Meta, dim: int) -> None:
    rot = m.count(m.key("rope.dimension_count"), dim)
    if rot != dim:
        raise ModelLoadError(f"GGUF metadata {m.key('rope.dimension_count')} is {rot} but the heads have {dim} "
                             f"dimensions; {m.prefix} rotates whole heads")


def qwen3(m: Meta, cfg: dict[str, Any], tensor: TensorReader) -> dict[str, Any]:
    dim = head_dim(m, cfg)
    _no_partial_rotary(m, dim)
    rope = {**rope_scaling(m), "rope_theta": m.number(m.key("rope.freq_base"), 10000.0)}
    return {"head_dim": dim, "rope_parameters": rope, "use_sliding_window": False}


def layer_types(m: Meta, layers: int, window: int, period: int) -> list[str]:
    """llama.cpp's swa pattern: of every ``period`` layers all but the last slide (a period of 1: none do)."""
    key = m.key("attention.sliding_window_pattern")
    if isinstance(m.meta.get(key), ArrayCount):
        raise ModelLoadError(f"GGUF metadata {key} is a per-layer array; for {m.prefix} this reader takes one "
                             "period (llama.cpp's converter writes none)")
    period = m.count(key, period)
    return ["sliding_attention" if window and (i + 1) % period else "full_attention" for i in range(layers)]


def _query_scalar(m: Meta, cfg: dict[str, Any], dim: int) -> float:
    """What llama.cpp divides the scores by (squared): attention.scale when the file has one, else the head
    size, or the hidden size over the heads for the 27B block count."""
    scale = m.optional(m.key("attention.scale"))
    if scale is not None:
        scalar = 1.0 / (scale * scale)
        return int(round(scalar)) if abs(scalar - round(scalar)) <= 1e-4 * scalar else scalar
    if cfg["num_hidden_layers"] == _GEMMA_27B_BLOCKS[m.prefix]:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return dim


def gemma2(m: Meta, cfg: dict[str, Any], tensor: TensorReader) -> dict[str, Any]:
    dim = head_dim(m, cfg)
    # llama.cpp's defaults when the keys are missing: a 4096-token window every other layer, caps 50 and 30.
    window = m.whole(m.key("attention.sliding_window"), 4096)
    return {"head_dim": dim, "query_pre_attn_scalar": _query_scalar(m, cfg, dim),
            "attn_logit_softcapping": m.number(m.key("attn_logit_softcapping"), 50.0),
            "final_logit_softcapping": m.number(m.key("final_logit_softcapping"), 30.0),
            "sliding_window": window or _NO_WINDOW, "layer_types": layer_types(m, cfg["num_hidden_layers"], window, 2),
            "rope_parameters": {**rope_scaling(m), "rope_theta": m.number(m.key("rope.freq_base"), 10000.0)}}


def gemma3(m: Meta, cfg: dict[str, Any], tensor: TensorReader) -> dict[str, Any]:
    dim = head_dim(m, cfg)
    # No window key: every layer global (the converter leaves it out for a pattern of 1). The scaling
    # applies to the global layers only; the local ones keep their own base (10000 unless the file says).
    window = m.whole(m.key("attention.sliding_window"), 0)
    full = {**rope_scaling(m), "rope_theta": m.number(m.key("rope.freq_base"), 10000.0)}
    local = {"rope_type": "default", "rope_theta": m.number(m.key("rope.freq_base_swa"), 10000.0)}
    out = {"head_dim": dim, "query_pre_attn_scalar": _query_scalar(m, cfg, dim), "sliding_window": window or _NO_WINDOW,
           "layer_types": layer_types(m, cfg["num_hidden_layers"], window, 6),
           "rope_parameters": {"full_attention": full, "sliding_attention": local},
           "final_logit_softcapping": m.optional(m.key("final_logit_softcapping")),
           "attn_logit_softcapping": m.optional(m.key("attn_logit_softcapping"))}
    return out


def _partial_factor(rot: int, dim: int) -> float:
    """rot / dim, nudged up where float rounding would make Hugging Face's int(dim * factor) one short."""
    factor = rot / dim
    while int(dim * factor) < rot:
        factor = math.nextafter(factor, 2.0)
    return factor


def phi3(m: Meta, cfg: dict[str, Any], tensor: TensorReader) -> dict[str, Any]:
    dim = head_dim(m, cfg)
    if dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ModelLoadError(f"GGUF metadata: phi3 heads of {dim} do not tile the embedding length "
                             f"{cfg['hidden_size']}")
    rot = m.count(m.key("rope.dimension_count"), dim)
    if rot > dim or rot % 2:
        raise ModelLoadError(f"GGUF metadata {m.key('rope.dimension_count')} is {rot}; expected an even count up "
                             f"to the head size {dim}")
    kind = m.text(m.key("rope.scaling.type"))
    if kind not in (None, "none", "longrope"):
        raise ModelLoadError(f"GGUF metadata {m.key('rope.scaling.type')} is {kind[:40]!r}; phi3 takes longrope "
                             "(factor tensors) only")
    original = m.count(m.key("rope.scaling.original_context_length"), cfg["max_position_embeddings"])
    rope = {"rope_type": "default", "rope_theta": m.number(m.key("rope.freq_base"), 10000.0),
            "partial_rotary_factor": _partial_factor(rot, dim)}
    rope.update(_longrope(m, cfg, tensor, rot, original))
    window = m.whole(m.key("attention.sliding_window"), 0)  # the converter writes 0 for none
    return {"original_max_position_embeddings": original, "rope_parameters": rope, "sliding_window": window or None}


def _longrope(m: Meta, cfg: dict[str, Any], tensor: TensorReader, rot: int, original: int) -> dict[str, Any]:
    """LongRoPE from the rope_factors_long/short tensors (the converter writes them for a scaled Phi-3)."""
    long, short = tensor("rope_factors_long.weight"), tensor("rope_factors_short.weight")
    if long is None and short is None:
        return {}
    for name, value in (("rope_factors_long", long), ("rope_factors_short", short)):
        if value is None or value.shape != (rot // 2,):
            have = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise ModelLoadError(f"GGUF tensor {name}.weight is {have}; LongRoPE needs both factor tensors of "
                                 f"{rot // 2} values (half the rotated dimensions)")
    out: dict[str, Any] = {"rope_type": "longrope", "long_factor": [float(x) for x in long],
                           "short_factor": [float(x) for x in short], "original_max_position_embeddings": original}
    # The converter writes the attention factor Hugging Face derives from the two lengths; another value in
    # the file is passed on, the derived one left to transformers (it computes it in double precision).
    scale = cfg["max_position_embeddings"] / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    attn = m.optional(m.key("rope.scaling.attn_factor"))
    if attn is not None and abs(attn - derived) > 1e-6 * derived:
        out["attention_factor"] = attn
    return out


@dataclass(frozen=True)
class Family:
    """One GGUF architecture: its Hugging Face model type, block tensor names, config fields, weight fixes."""

    model_type: str
    block: Mapping[str, str]
    config: Callable[[Meta, dict[str, Any], TensorReader], dict[str, Any]] | None = None
    permute: bool = False  # llama's q/k rows interleave the rotary halves
    norm_shift: float = 0.0  # stored as weight + shift for every Hugging Face name ending in "norm.weight"
    # Tensors that are no weight: read into the config, or (None) passed over. Any other tensor without a
    # Hugging Face name is refused, since leaving it out would load a different model.
    not_weights: tuple[str, ...] | None = ()


# llama, mistral and qwen2 pass over tensors they do not map, as they always have; llama and mistral read
# rope_freqs into the config first (gguf_rope), and qwen2 passes it over as llama.cpp's qwen2 graph does.
_LLAMA_EXTRA = None


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LLAMA_BLOCK, permute=True, not_weights=_LLAMA_EXTRA),
    "mistral": Family("mistral", LLAMA_BLOCK, permute=True, not_weights=_LLAMA_EXTRA),
    "qwen2": Family("qwen2", LLAMA_BLOCK, not_weights=_LLAMA_EXTRA),
    "qwen3": Family("qwen3", {**LLAMA_BLOCK, **_QK_NORMS}, qwen3),
    "gemma2": Family("gemma2", GEMMA2_BLOCK, gemma2, norm_shift=1.0),
    "gemma3": Family("gemma3_text", {**GEMMA2_BLOCK, **_QK_NORMS}, gemma3, norm_shift=1.0),
    "phi3": Family("phi3", PHI3_BLOCK, phi3, not_weights=("rope_factors_long.weight", "rope_factors_short.weight")),
}
