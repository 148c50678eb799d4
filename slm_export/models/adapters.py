"""Architecture adapters: turn a Hugging Face config + weights into one normalised spec. The traits of each
decoder architecture (``traits_for``) live in ``models/traits.py`` and are re-exported here.

The exporter reads only these specs, so a new architecture is one adapter here, not a new exporter. The
encoder adapters and their spec live in ``models.encoders``; they are registered here.
Linear weights keep the Hugging Face ``[out, in]`` layout (GPT-2's Conv1D is transposed to match).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_export.errors import ConfigError
from slm_export.models.encoders import ENCODER_ADAPTERS, EncoderSpec
from slm_export.models.lazy import is_float_array
from slm_export.models.rope import ROPE_TYPES, Rope, check_rope
from slm_export.models.traits import TRAITS, ArchTraits, folding_types, traits_for  # noqa: F401  (re-exported)
from slm_export.registry import Registry

Array = np.ndarray


def lm_head_of(w: Mapping[str, Any], key: str, tied: bool) -> Any:
    """The LM head's own weight, or None when it is the embedding table. A quantized head (the compress
    stage's ``lm_head_bits``) is its own tensor even when the model ties it: the graph then gathers
    embeddings from the float table and multiplies by the quantized copy. (``spec_for`` gives every float
    weight as an array: anything else here is the compress stage's quantized tensor.)"""
    head = w.get(key)
    if head is not None and not is_float_array(head):
        return head
    return None if tied else head


@dataclass(frozen=True)
class DecoderLayer:
    qkv: tuple[Array, Array, Array]
    qkv_bias: tuple[Array, Array, Array] | None
    o: Array
    o_bias: Array | None
    up: tuple[Array, ...]  # (gate, up) for gated MLPs, (fc,) otherwise
    up_bias: Array | None
    down: Array
    down_bias: Array | None
    norm1: tuple[Array, Array | None] | None  # None: no norm before attention (OLMo 2)
    norm2: tuple[Array, Array | None] | None  # None: no norm before the MLP (parallel blocks sharing norm1, OLMo 2)
    down_rotation: tuple[Array, Array] | None = None  # (signs, Hadamard block): down_proj reads x R
    q_norm: tuple[Array, Array | None] | None = None  # a norm on the queries before rotary (see DecoderSpec.qk_norm)
    k_norm: tuple[Array, Array | None] | None = None
    post_norm1: tuple[Array, Array | None] | None = None  # a norm on the attention output, before the residual add
    post_norm2: tuple[Array, Array | None] | None = None  # a norm on the MLP output, before the residual add
    window: int | None = None  # sliding window: a query sees itself and the window - 1 keys before it
    rope: int | None = 0  # index into DecoderSpec.ropes; None: this layer has no rotary embedding


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm: str  # "rms" or "layer"
    eps: float
    norm_offset: float  # Gemma's RMSNorm multiplies by (1 + w)
    act: str  # "silu", "gelu", "gelu_tanh"
    ropes: tuple[Rope, ...]  # the rotary embeddings the layers use (by index); empty: learned absolute positions
    embed: Array
    embed_scale: float
    pos_embed: Array | None
    lm_head: Array | None  # None: tied to ``embed``
    final_norm: tuple[Array, Array | None] | None  # None: no norm before the head (OPT's post-LN form)
    layers: tuple[DecoderLayer, ...]
    attn_scale: float | None = None  # the queries' scale before softmax; None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention scores become cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    logit_scale: float = 1.0  # logits multiplied by this (Granite's 1 / logits_scaling)
    residual_scale: float = 1.0  # each block's attention and MLP output multiplied by this before the add (Granite)
    parallel: bool = False  # attention and MLP both read the block input (norm2 None: they share norm1)
    post_ln: bool = False  # the norms follow the residual add (OPT with do_layer_norm_before False)
    qk_norm: str = "head"  # q_norm/k_norm over each head's channels ("head") or the whole projection ("full")
    lm_head_bias: Array | None = None
    embed_proj: tuple[Array, Array] | None = None  # (project_in, project_out) around the layers (OPT-350m)

    @property
    def gated(self) -> bool:
        return len(self.layers[0].up) == 2

    @property
    def rope_theta(self) -> float | None:
        """The first rotary embedding's base; None without rotary embeddings."""
        return self.ropes[0].theta if self.ropes else None

    @property
    def rotary_dim(self) -> int:
        return self.ropes[0].dim if self.ropes else 0


Adapter = Callable[[Any, Mapping[str, Array]], Any]
ADAPTERS: Registry[Adapter] = Registry("architecture adapter")


def spec_for(config: Any, weights: Mapping[str, Any]) -> DecoderSpec | EncoderSpec:
    """Run the adapter registered for ``config.model_type`` on numpy views of ``weights``."""
    arrays = {k: (v.detach().numpy() if hasattr(v, "detach") else v) for k, v in weights.items()}
    return ADAPTERS.get(config.model_type)(config, arrays)


def rope_of(cfg: Any, dim: int, params: Mapping[str, Any] | None = None) -> Rope:
    """The config's rotary embedding over ``dim`` channels (``params``: a rope_parameters dict other than
    the config's own, e.g. one layer type's). A rope type the tables do not implement, or a parameter its
    formulas cannot use, is refused, naming the field (exit 2).

    The Rope also carries what the formulas read outside rope_parameters, as transformers reads it: the
    config's ``max_position_embeddings``, and for llama3, yarn and longrope the pretraining context
    ``original_max_position_embeddings``, which a config that keeps it at the top level (Phi-3) sets over
    the rope_parameters' own, and which otherwise defaults to ``max_position_embeddings``."""
    own = params is None
    params = dict(params if params is not None else (getattr(cfg, "rope_parameters", None) or {}))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)  # the rotated width is ``dim``
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{cfg.model_type}: rope_parameters.rope_type {kind!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = float(params.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0)
    limit = getattr(cfg, "max_position_embeddings", None)
    params["max_position_embeddings"] = limit
    if kind in ("llama3", "yarn", "longrope"):
        top = getattr(cfg, "original_max_position_embeddings", None) if own else None
        params["original_max_position_embeddings"] = top or params.get("original_max_position_embeddings") or limit
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    rope = Rope(theta=theta, dim=dim, kind=kind, params=tuple(sorted(frozen.items(), key=lambda kv: kv[0])))
    check_rope(rope, cfg.model_type)
    return rope


for _name, _adapter in ENCODER_ADAPTERS.items():
    ADAPTERS.register(_name, _adapter)
