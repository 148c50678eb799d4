"""Architecture adapters: turn a Hugging Face config + weights into one normalised spec, and the traits of each
decoder architecture that the compress stage reads (``traits_for``).

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
from slm_export.models.rope import ROPE_TYPES, Rope, check_rope
from slm_export.registry import Registry

Array = np.ndarray


ScaleGroup = tuple[str, tuple[str, ...]]  # (the op producing an input, the linears reading it), paths in a layer
LLAMA_SCALE_GROUPS: tuple[ScaleGroup, ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
LLAMA_PROJECTIONS: tuple[ScaleGroup, ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ArchTraits:
    """Facts about a decoder architecture that more than one stage reads, spelt once. Module paths inside a
    decoder layer unless said otherwise; weight names are Hugging Face's."""

    layers: str = "model.layers"  # the decoder layer list: its module path, and the prefix of its weights' names
    norm_offset: float = 0.0  # the RMSNorm multiplies by (w + offset): Gemma's (1 + w)
    embed_scaled: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    conv1d: bool = False  # linears stored [in, out] as Conv1D (GPT-2): no weight quantization yet
    # AWQ and SmoothQuant move a per-channel scale from the input of each group's linears into the op producing
    # it (a norm, or the linear before); empty: this architecture's layers (fused q/k/v, Conv1D) do not fold.
    scale_groups: tuple[ScaleGroup, ...] = ()
    # The projection groups the accuracy budget keeps at int4 or raises to int8 together, named.
    projection_groups: tuple[ScaleGroup, ...] = LLAMA_PROJECTIONS
    down_proj: str | None = "mlp.down_proj"  # the MLP's output projection: W8A8's online rotation turns its input
    v_proj: str | None = "self_attn.v_proj"  # the value and output projections: the offline head rotation's pair
    o_proj: str | None = "self_attn.o_proj"
    final_norm: str = "model.norm"  # module path from the top: the LM head's only input
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"

    @property
    def folds_scales(self) -> bool:
        return bool(self.scale_groups)


LLAMA = ArchTraits(scale_groups=LLAMA_SCALE_GROUPS)
TRAITS: dict[str, ArchTraits] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    # q/k/v and gate/up fused (qkv_proj, gate_up_proj): no folding; the budget groups only o and down
    "phi3": ArchTraits(v_proj=None, projection_groups=LLAMA_PROJECTIONS[1:2] + LLAMA_PROJECTIONS[3:]),
    "gemma": ArchTraits(norm_offset=1.0, embed_scaled=True, scale_groups=LLAMA_SCALE_GROUPS),
    # Families the exporter reads; which of their norms fold AWQ/SmoothQuant scales is the compress stage's part.
    "qwen3": ArchTraits(), "smollm3": ArchTraits(), "granite": ArchTraits(), "olmo2": ArchTraits(),
    "stablelm": ArchTraits(),
    "gemma2": ArchTraits(norm_offset=1.0, embed_scaled=True),
    "gemma3_text": ArchTraits(norm_offset=1.0, embed_scaled=True),
    "phi": ArchTraits(final_norm="model.final_layernorm", down_proj="mlp.fc2", o_proj="self_attn.dense"),
    "gpt_neox": ArchTraits(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", v_proj=None,
                           o_proj="attention.dense", down_proj="mlp.dense_4h_to_h", embed="gpt_neox.embed_in.weight",
                           lm_head="embed_out.weight", projection_groups=()),
    "opt": ArchTraits(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm", down_proj="fc2",
                      o_proj="self_attn.out_proj", embed="model.decoder.embed_tokens.weight", projection_groups=()),
    "gpt2": ArchTraits(layers="transformer.h", conv1d=True, projection_groups=(), down_proj="mlp.c_proj",
                       v_proj=None, o_proj="attn.c_proj", final_norm="transformer.ln_f",
                       embed="transformer.wte.weight"),
}


def traits_for(model_type: str) -> ArchTraits:
    """The traits of a decoder architecture (a ``ConfigError`` naming the known ones for any other)."""
    if model_type not in TRAITS:
        raise ConfigError(f"no decoder traits for architecture {model_type!r}; known: {', '.join(TRAITS)}")
    return TRAITS[model_type]


def folding_types() -> list[str]:
    """The architectures whose norms AWQ and SmoothQuant fold scales into."""
    return [name for name, t in TRAITS.items() if t.folds_scales]


def lm_head_of(w: Mapping[str, Any], key: str, tied: bool) -> Any:
    """The LM head's own weight, or None when it is the embedding table. A quantized head (the compress
    stage's ``lm_head_bits``) is its own tensor even when the model ties it: the graph then gathers
    embeddings from the float table and multiplies by the quantized copy. (``spec_for`` gives every float
    weight as an array: anything else here is the compress stage's quantized tensor.)"""
    head = w.get(key)
    if head is not None and not isinstance(head, np.ndarray):
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
