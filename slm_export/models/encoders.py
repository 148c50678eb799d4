"""Encoder adapters: a Hugging Face encoder's config + weights -> one ``EncoderSpec`` that the encoder graph reads.

One spec covers the post-LayerNorm BERT family and its variants: DistilBERT (no token types, its own layer
names), RoBERTa and XLM-RoBERTa (position ids counted over the non-padding tokens from ``padding_idx + 1``)
and MobileBERT (bottlenecks around each layer, stacked FFNs, NoNorm, a trigram embedding narrower than the
hidden size). ``models.adapters`` registers ``ENCODER_ADAPTERS`` in its ``ADAPTERS``; this module does not
import it, so the two stay free of a cycle. Linear weights keep the Hugging Face ``[out, in]`` layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from slm_export.errors import ConfigError

Array = np.ndarray
Linear = tuple[Array, Array]  # (weight [out, in], bias)

ROBERTA_TYPES = ("roberta", "xlm-roberta")  # positions counted from padding_idx + 1
# transformers' activation names -> the graph's (exporters.layers.activation)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class Norm:
    """A LayerNorm over the last axis, or MobileBERT's NoNorm (``eps`` None): ``x * weight + bias``."""

    weight: Array
    bias: Array
    eps: float | None


@dataclass(frozen=True)
class Bottleneck:
    """A linear then a norm (MobileBERT's bottleneck layers)."""

    linear: Linear
    norm: Norm


@dataclass(frozen=True)
class Ffn:
    """``norm(down(act(fc(x))) + x)``: MobileBERT's extra feed-forward blocks before the layer's own."""

    fc: Linear
    down: Linear
    norm: Norm


@dataclass(frozen=True)
class EncoderLayer:
    """A post-LayerNorm encoder layer; the optional parts are MobileBERT's and default to BERT's layer.

    Attention reads three sources: ``x`` (the layer's input), ``input`` (``bottleneck_in`` of it) and
    ``shared`` (``bottleneck_attn`` of it); ``qkv_from`` names the source of the query, key and value,
    ``residual_from`` the one added back after the output projection.
    """

    qkv: tuple[Array, Array, Array]
    qkv_bias: tuple[Array, Array, Array]
    o: Array
    o_bias: Array
    norm1: Norm
    fc: Array
    fc_bias: Array
    down: Array
    down_bias: Array
    norm2: Norm
    qkv_from: tuple[str, str, str] = ("x", "x", "x")
    residual_from: str = "x"
    bottleneck_in: Bottleneck | None = None
    bottleneck_attn: Bottleneck | None = None
    ffns: tuple[Ffn, ...] = ()
    bottleneck_out: Bottleneck | None = None  # norm(linear(y) + x): back to the hidden width, the layer input added


@dataclass(frozen=True)
class EncoderSpec:
    hidden: int
    heads: int
    act: str  # an exporters.layers.activation name
    word: Array
    pos: Array
    token_type: Array | None  # None: the model has no token types (DistilBERT)
    emb_norm: Norm
    layers: tuple[EncoderLayer, ...]
    # RoBERTa's rule: a non-padding token's position is padding_idx + its rank among the row's non-padding
    # tokens, a padding token's is padding_idx. None: positions 0 .. seq - 1.
    position_padding_idx: int | None = None
    trigram: bool = False  # MobileBERT: each token's embedding is concatenated with its right and left neighbours'
    embed_proj: Linear | None = None  # then projected to the hidden width

    @property
    def token_type_input(self) -> bool:
        """Whether the graph takes token_type_ids: with one row (RoBERTa) the only valid id is 0, so the row is
        added as a constant and the graph takes what the model's tokenizer returns."""
        return self.token_type is not None and self.token_type.shape[0] > 1


def _act(cfg: Any, name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{cfg.model_type}: activation {name!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def check_config(cfg: Any) -> None:
    """What the encoder adapters will refuse, found when the model is loaded: custom model code, an activation
    the graph does not implement, MobileBERT's other norms, RoBERTa without the pad id its positions count from
    (a ConfigError naming the field)."""
    if getattr(cfg, "auto_map", None):
        raise ConfigError(f"{cfg.model_type}: config.json's auto_map asks for custom model code "
                          f"({', '.join(sorted(cfg.auto_map))}); only transformers' own architectures are exported")
    _act(cfg, cfg.activation if cfg.model_type == "distilbert" else cfg.hidden_act)
    if cfg.model_type == "mobilebert" and cfg.normalization_type not in ("no_norm", "layer_norm"):
        raise ConfigError(f"mobilebert: normalization_type {cfg.normalization_type!r} is not supported "
                          "(no_norm, layer_norm)")
    if cfg.model_type in ROBERTA_TYPES and cfg.pad_token_id is None:
        raise ConfigError(f"{cfg.model_type}: config.json has no pad_token_id, which its position ids count from")


def _prefix(w: Mapping[str, Array], base: str, probe: str) -> str:
    """Checkpoints of a task model name the base model's tensors under ``base.``; the bare model does not."""
    return base + "." if f"{base}.{probe}" in w else ""


def _lin(w: Mapping[str, Array], name: str) -> Linear:
    return w[name + ".weight"], w[name + ".bias"]


def _norm(w: Mapping[str, Array], name: str, eps: float | None) -> Norm:
    return Norm(w[name + ".weight"], w[name + ".bias"], eps)


def _bert_layers(cfg: Any, w: Mapping[str, Array], p0: str) -> tuple[EncoderLayer, ...]:
    eps = float(cfg.layer_norm_eps)
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{p0}encoder.layer.{i}."
        a = p + "attention.self."
        q, k, v = (_lin(w, a + n) for n in ("query", "key", "value"))
        layers.append(EncoderLayer(
            qkv=(q[0], k[0], v[0]), qkv_bias=(q[1], k[1], v[1]),
            o=w[p + "attention.output.dense.weight"], o_bias=w[p + "attention.output.dense.bias"],
            norm1=_norm(w, p + "attention.output.LayerNorm", eps),
            fc=w[p + "intermediate.dense.weight"], fc_bias=w[p + "intermediate.dense.bias"],
            down=w[p + "output.dense.weight"], down_bias=w[p + "output.dense.bias"],
            norm2=_norm(w, p + "output.LayerNorm", eps),
        ))
    return tuple(layers)


def _bert(cfg: Any, w: Mapping[str, Array], base: str = "bert") -> EncoderSpec:
    pre = _prefix(w, base, "embeddings.word_embeddings.weight")
    e = pre + "embeddings."
    return EncoderSpec(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, act=_act(cfg, cfg.hidden_act),
        word=w[e + "word_embeddings.weight"], pos=w[e + "position_embeddings.weight"],
        token_type=w[e + "token_type_embeddings.weight"],
        emb_norm=_norm(w, e + "LayerNorm", float(cfg.layer_norm_eps)), layers=_bert_layers(cfg, w, pre),
    )


def _roberta(cfg: Any, w: Mapping[str, Array]) -> EncoderSpec:
    """BERT's layers under ``roberta.``; positions follow the padding rule (transformers'
    ``create_position_ids_from_input_ids``: ids equal to ``pad_token_id`` are padding, whatever the mask says)."""
    return replace(_bert(cfg, w, "roberta"), position_padding_idx=int(cfg.pad_token_id))


def _distilbert(cfg: Any, w: Mapping[str, Array]) -> EncoderSpec:
    """DistilBERT: no token types; every LayerNorm's epsilon is 1e-12 in transformers, not a config field. The
    position table is read as stored, which holds the sinusoidal values when ``sinusoidal_pos_embds`` is set."""
    pre = _prefix(w, "distilbert", "embeddings.word_embeddings.weight")
    eps = 1e-12
    layers = []
    for i in range(cfg.n_layers):
        p = f"{pre}transformer.layer.{i}."
        q, k, v, o = (_lin(w, p + f"attention.{n}_lin") for n in ("q", "k", "v", "out"))
        fc, down = _lin(w, p + "ffn.lin1"), _lin(w, p + "ffn.lin2")
        layers.append(EncoderLayer(
            qkv=(q[0], k[0], v[0]), qkv_bias=(q[1], k[1], v[1]), o=o[0], o_bias=o[1],
            norm1=_norm(w, p + "sa_layer_norm", eps), fc=fc[0], fc_bias=fc[1], down=down[0], down_bias=down[1],
            norm2=_norm(w, p + "output_layer_norm", eps),
        ))
    e = pre + "embeddings."
    return EncoderSpec(
        hidden=cfg.dim, heads=cfg.n_heads, act=_act(cfg, cfg.activation), word=w[e + "word_embeddings.weight"],
        pos=w[e + "position_embeddings.weight"], token_type=None, emb_norm=_norm(w, e + "LayerNorm", eps),
        layers=tuple(layers),
    )


def _mobilebert_layer(cfg: Any, w: Mapping[str, Array], p: str, eps: float | None,
                      default_eps: float | None) -> EncoderLayer:
    """One MobileBERT layer. Its output LayerNorm is built without ``layer_norm_eps`` in transformers, so it
    takes torch's default; the others take the config's."""
    q, k, v = (_lin(w, p + f"attention.self.{n}") for n in ("query", "key", "value"))
    o = _lin(w, p + "attention.output.dense")
    fc, down = _lin(w, p + "intermediate.dense"), _lin(w, p + "output.dense")
    bottleneck_in = bottleneck_attn = bottleneck_out = None
    qkv_from, residual_from = ("x", "x", "x"), "x"
    if cfg.use_bottleneck:
        bottleneck_in = Bottleneck(_lin(w, p + "bottleneck.input.dense"), _norm(w, p + "bottleneck.input.LayerNorm",
                                                                                  eps))
        bottleneck_out = Bottleneck(_lin(w, p + "output.bottleneck.dense"),
                                    _norm(w, p + "output.bottleneck.LayerNorm", eps))
        residual_from = "input"
        if cfg.use_bottleneck_attention:
            qkv_from = ("input", "input", "input")
        elif cfg.key_query_shared_bottleneck:
            bottleneck_attn = Bottleneck(_lin(w, p + "bottleneck.attention.dense"),
                                         _norm(w, p + "bottleneck.attention.LayerNorm", eps))
            qkv_from = ("shared", "shared", "x")
    ffns = tuple(Ffn(_lin(w, p + f"ffn.{j}.intermediate.dense"), _lin(w, p + f"ffn.{j}.output.dense"),
                     _norm(w, p + f"ffn.{j}.output.LayerNorm", eps))
                 for j in range(cfg.num_feedforward_networks - 1))
    return EncoderLayer(
        qkv=(q[0], k[0], v[0]), qkv_bias=(q[1], k[1], v[1]), o=o[0], o_bias=o[1],
        norm1=_norm(w, p + "attention.output.LayerNorm", eps), fc=fc[0], fc_bias=fc[1], down=down[0],
        down_bias=down[1], norm2=_norm(w, p + "output.LayerNorm", default_eps), qkv_from=qkv_from,
        residual_from=residual_from, bottleneck_in=bottleneck_in, bottleneck_attn=bottleneck_attn, ffns=ffns,
        bottleneck_out=bottleneck_out,
    )


def _mobilebert(cfg: Any, w: Mapping[str, Array]) -> EncoderSpec:
    layer_norm = cfg.normalization_type == "layer_norm"
    eps = float(cfg.layer_norm_eps) if layer_norm else None
    default_eps = 1e-5 if layer_norm else None  # torch's LayerNorm default, where transformers passes none
    pre = _prefix(w, "mobilebert", "embeddings.word_embeddings.weight")
    e = pre + "embeddings."
    projected = cfg.trigram_input or cfg.embedding_size != cfg.hidden_size
    return EncoderSpec(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, act=_act(cfg, cfg.hidden_act),
        word=w[e + "word_embeddings.weight"], pos=w[e + "position_embeddings.weight"],
        token_type=w[e + "token_type_embeddings.weight"], emb_norm=_norm(w, e + "LayerNorm", default_eps),
        layers=tuple(_mobilebert_layer(cfg, w, f"{pre}encoder.layer.{i}.", eps, default_eps)
                     for i in range(cfg.num_hidden_layers)),
        trigram=bool(cfg.trigram_input), embed_proj=_lin(w, e + "embedding_transformation") if projected else None,
    )


ENCODER_ADAPTERS: dict[str, Callable[[Any, Mapping[str, Array]], EncoderSpec]] = {
    "bert": _bert,
    "distilbert": _distilbert,
    "roberta": _roberta,
    "xlm-roberta": _roberta,
    "mobilebert": _mobilebert,
}


def max_tokens(config: Any) -> int:
    """The longest input the encoder's position table serves: RoBERTa's positions start at padding_idx + 1."""
    rows = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type in ROBERTA_TYPES:
        rows -= int(config.pad_token_id) + 1
    return rows
