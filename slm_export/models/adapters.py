"""Architecture adapters: turn a Hugging Face config + weights into one normalised spec. The traits of each
decoder architecture (``traits_for``) live in ``models/traits.py`` and are re-exported here.

The exporter reads only these specs, so a new architecture is one adapter here, not a new exporter.
Linear weights keep the Hugging Face ``[out, in]`` layout (GPT-2's Conv1D is transposed to match).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_export.errors import ConfigError, ExportError
from slm_export.models.rope import ROPE_TYPES, Rope
from slm_export.models.traits import TRAITS, ArchTraits, folding_types, traits_for  # noqa: F401  (re-exported)
from slm_export.registry import Registry

Array = np.ndarray


def _lm_head(w: Mapping[str, Any], key: str, tied: bool) -> Any:
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
    norm1: tuple[Array, Array | None]
    norm2: tuple[Array, Array | None]
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
    final_norm: tuple[Array, Array | None]
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


@dataclass(frozen=True)
class EncoderLayer:
    qkv: tuple[Array, Array, Array]
    qkv_bias: tuple[Array, Array, Array]
    o: Array
    o_bias: Array
    norm1: tuple[Array, Array]
    fc: Array
    fc_bias: Array
    down: Array
    down_bias: Array
    norm2: tuple[Array, Array]


@dataclass(frozen=True)
class EncoderSpec:
    hidden: int
    heads: int
    eps: float
    act: str
    word: Array
    pos: Array
    token_type: Array
    emb_norm: tuple[Array, Array]
    layers: tuple[EncoderLayer, ...]


Adapter = Callable[[Any, Mapping[str, Array]], Any]
ADAPTERS: Registry[Adapter] = Registry("architecture adapter")


def spec_for(config: Any, weights: Mapping[str, Any]) -> DecoderSpec | EncoderSpec:
    """Run the adapter registered for ``config.model_type`` on numpy views of ``weights``."""
    arrays = {k: (v.detach().numpy() if hasattr(v, "detach") else v) for k, v in weights.items()}
    return ADAPTERS.get(config.model_type)(config, arrays)


def rope_of(cfg: Any, dim: int, params: Mapping[str, Any] | None = None) -> Rope:
    """The config's rotary embedding over ``dim`` channels (``params``: a rope_parameters dict other than
    the config's own, e.g. one layer type's). A rope type the tables do not implement is refused, naming it."""
    params = dict(params if params is not None else (getattr(cfg, "rope_parameters", None) or {}))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("partial_rotary_factor", None)  # the rotated width is ``dim``
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{cfg.model_type}: rope_parameters.rope_type {kind!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0))
    return Rope(theta=theta, dim=dim, kind=kind, params=tuple(sorted(params.items(), key=lambda kv: kv[0])))


def _opt(w: Mapping[str, Array], key: str) -> Array | None:
    return w.get(key)


def _llama_like(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    traits = traits_for(cfg.model_type)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{traits.layers}.{i}."
        if p + "self_attn.qkv_proj.weight" in w:  # Phi-3 stores q, k, v and gate, up fused
            qkv = w[p + "self_attn.qkv_proj.weight"]
            nq, nkv = heads * head_dim, cfg.num_key_value_heads * head_dim
            q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
            gu = w[p + "mlp.gate_up_proj.weight"]
            up = (gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2:])
        else:
            q, k, v = (w[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
            up = (w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"])
        bias = None
        if p + "self_attn.q_proj.bias" in w:
            bias = tuple(w[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        layers.append(DecoderLayer(
            qkv=(q, k, v), qkv_bias=bias, o=w[p + "self_attn.o_proj.weight"],
            o_bias=_opt(w, p + "self_attn.o_proj.bias"), up=up, up_bias=None,
            down=w[p + "mlp.down_proj.weight"], down_bias=None,
            norm1=(w[p + "input_layernorm.weight"], None), norm2=(w[p + "post_attention_layernorm.weight"], None),
            down_rotation=_rotation(w, f"{p}{traits.down_proj}.rotation."),
        ))
    act_name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    acts = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if act_name not in acts:
        raise ExportError(f"activation {act_name!r} of {cfg.model_type} is not supported")
    tied = getattr(cfg, "tie_word_embeddings", False) or traits.lm_head not in w
    rotary = int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0))
    return DecoderSpec(
        model_type=cfg.model_type, hidden=cfg.hidden_size, heads=heads, kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim, vocab=cfg.vocab_size, norm="rms", eps=float(cfg.rms_norm_eps),
        norm_offset=traits.norm_offset, act=acts[act_name], ropes=(rope_of(cfg, rotary),),
        embed=w[traits.embed], embed_scale=float(cfg.hidden_size) ** 0.5 if traits.embed_scaled else 1.0,
        pos_embed=None, lm_head=_lm_head(w, traits.lm_head, tied),
        final_norm=(w[traits.final_norm + ".weight"], None), layers=tuple(layers),
    )


def _rotation(w: Mapping[str, Array], prefix: str) -> tuple[Array, Array] | None:
    """The (signs, Hadamard block) of an online rotation the compress stage gave a linear's input, if any."""
    return (w[prefix + "signs"], w[prefix + "block"]) if prefix + "signs" in w else None


def _gpt2(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    h = cfg.n_embd
    pre = "transformer." if "transformer.wte.weight" in w else ""
    layers = []
    for i in range(cfg.n_layer):
        p = f"{pre}h.{i}."
        qkv, qkv_b = w[p + "attn.c_attn.weight"].T, w[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
        layers.append(DecoderLayer(
            qkv=(qkv[:h], qkv[h:2 * h], qkv[2 * h:]), qkv_bias=(qkv_b[:h], qkv_b[h:2 * h], qkv_b[2 * h:]),
            o=w[p + "attn.c_proj.weight"].T, o_bias=w[p + "attn.c_proj.bias"],
            up=(w[p + "mlp.c_fc.weight"].T,), up_bias=w[p + "mlp.c_fc.bias"],
            down=w[p + "mlp.c_proj.weight"].T, down_bias=w[p + "mlp.c_proj.bias"],
            norm1=(w[p + "ln_1.weight"], w[p + "ln_1.bias"]), norm2=(w[p + "ln_2.weight"], w[p + "ln_2.bias"]),
        ))
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if cfg.activation_function not in acts:
        raise ExportError(f"activation {cfg.activation_function!r} of gpt2 is not supported")
    return DecoderSpec(
        model_type="gpt2", hidden=h, heads=cfg.n_head, kv_heads=cfg.n_head, head_dim=h // cfg.n_head,
        vocab=cfg.vocab_size, norm="layer", eps=float(cfg.layer_norm_epsilon), norm_offset=0.0,
        act=acts[cfg.activation_function], ropes=(), embed=w[pre + "wte.weight"],
        embed_scale=1.0, pos_embed=w[pre + "wpe.weight"],
        lm_head=_lm_head(w, "lm_head.weight", "lm_head.weight" not in w or cfg.tie_word_embeddings),
        final_norm=(w[pre + "ln_f.weight"], w[pre + "ln_f.bias"]), layers=tuple(layers),
    )


def _bert(cfg: Any, w: Mapping[str, Array]) -> EncoderSpec:
    pre = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
    if cfg.hidden_act not in ("gelu", "relu"):
        raise ExportError(f"activation {cfg.hidden_act!r} of bert is not supported")
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{pre}encoder.layer.{i}."
        a = p + "attention.self."
        layers.append(EncoderLayer(
            qkv=tuple(w[a + f"{n}.weight"] for n in ("query", "key", "value")),  # type: ignore[arg-type]
            qkv_bias=tuple(w[a + f"{n}.bias"] for n in ("query", "key", "value")),  # type: ignore[arg-type]
            o=w[p + "attention.output.dense.weight"], o_bias=w[p + "attention.output.dense.bias"],
            norm1=(w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
            fc=w[p + "intermediate.dense.weight"], fc_bias=w[p + "intermediate.dense.bias"],
            down=w[p + "output.dense.weight"], down_bias=w[p + "output.dense.bias"],
            norm2=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
        ))
    e = pre + "embeddings."
    return EncoderSpec(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, eps=float(cfg.layer_norm_eps), act=cfg.hidden_act,
        word=w[e + "word_embeddings.weight"], pos=w[e + "position_embeddings.weight"],
        token_type=w[e + "token_type_embeddings.weight"],
        emb_norm=(w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"]), layers=tuple(layers),
    )


for _name in ("llama", "mistral", "qwen2", "phi3", "gemma"):
    ADAPTERS.register(_name, _llama_like)
ADAPTERS.register("gpt2", _gpt2)
ADAPTERS.register("bert", _bert)
