"""Decoder adapters: each family's config and weights -> the one ``DecoderSpec`` every builder reads.

Most families are Llama's block with a few named differences (``LayerNames`` and the config fields read in
``_llama_like``); Phi-1.5/2, GPT-NeoX, OPT and GPT-2 differ enough in their weights to get their own.
A config feature no builder implements is refused here, before any work, naming the field (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_export.errors import ConfigError
from slm_export.models.adapters import ADAPTERS, DecoderLayer, DecoderSpec, lm_head_of, rope_of, traits_for
from slm_export.models.lazy import is_float_array

Array = np.ndarray
Norm = tuple[Array, Array | None]
ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class LayerNames:
    """Where a Llama-like layer keeps its weights (paths inside the layer; None: the layer has no such part)."""

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    norm1: str | None = "input_layernorm"  # before attention
    norm2: str | None = "post_attention_layernorm"  # before the MLP
    post1: str | None = None  # on the attention output
    post2: str | None = None  # on the MLP output
    q_norm: str | None = None
    k_norm: str | None = None


LLAMA_NAMES = LayerNames()
QK_NORM = LayerNames(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
GEMMA2_NAMES = LayerNames(norm2="pre_feedforward_layernorm", post1="post_attention_layernorm",
                          post2="post_feedforward_layernorm")
GEMMA3_NAMES = LayerNames(norm2="pre_feedforward_layernorm", post1="post_attention_layernorm",
                          post2="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
OLMO2_NAMES = LayerNames(norm1=None, norm2=None, post1="post_attention_layernorm",
                         post2="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
NAMES: dict[str, LayerNames] = {
    "llama": LLAMA_NAMES, "mistral": LLAMA_NAMES, "qwen2": LLAMA_NAMES, "phi3": LLAMA_NAMES, "gemma": LLAMA_NAMES,
    "granite": LLAMA_NAMES, "smollm3": LLAMA_NAMES, "stablelm": LLAMA_NAMES, "qwen3": QK_NORM,
    "gemma2": GEMMA2_NAMES, "gemma3_text": GEMMA3_NAMES, "olmo2": OLMO2_NAMES,
}
LAYER_NORM_TYPES = ("stablelm",)  # LayerNorm with bias instead of RMSNorm


def _norm(w: Mapping[str, Array], key: str | None) -> Norm | None:
    if key is None or key + ".weight" not in w:
        return None
    return w[key + ".weight"], w.get(key + ".bias")


def _bias(w: Mapping[str, Array], key: str) -> Array | None:
    return w.get(key + ".bias")


def _act(cfg: Any, name: str | None) -> str:
    if name not in ACTS:
        raise ConfigError(f"{cfg.model_type}: activation {name!r} is not supported (supported: {', '.join(ACTS)})")
    return ACTS[name]


def refuse_custom_code(cfg: Any) -> None:
    """A model that needs its own Python code (``auto_map``) is not one these adapters describe."""
    if getattr(cfg, "auto_map", None):
        raise ConfigError(f"{cfg.model_type}: config.json's auto_map asks for custom model code "
                          f"({', '.join(sorted(cfg.auto_map))}); only transformers' own architectures are exported")


def check_config(cfg: Any) -> None:
    """What the adapter will refuse, found when the model is loaded rather than after calibration: custom
    code, an activation or a rope type no builder implements (a ConfigError naming the field, exit 2)."""
    refuse_custom_code(cfg)
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    _act(cfg, act or getattr(cfg, "activation_function", None))
    if hasattr(cfg, "num_attention_heads") and cfg.model_type not in ("opt", "gpt2"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        _ropes(cfg, head_dim)


def windows(cfg: Any, n: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers' masks apply them."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return [None] * n
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n


def _ropes(cfg: Any, head_dim: int) -> tuple[tuple[Any, ...], list[int | None]]:
    """The rotary embeddings and each layer's index into them (None: no rope in that layer)."""
    n = cfg.num_hidden_layers
    rotary = int(head_dim * _partial(cfg))
    params = getattr(cfg, "rope_parameters", None) or {}
    if cfg.model_type == "gemma3_text":  # sliding layers have their own base; the global ones their scaling
        ropes = (rope_of(cfg, rotary, params["full_attention"]), rope_of(cfg, rotary, params["sliding_attention"]))
        return ropes, [1 if t == "sliding_attention" else 0 for t in cfg.layer_types]
    which: list[int | None] = [0] * n
    if cfg.model_type == "smollm3":
        which = [0 if use else None for use in cfg.no_rope_layers]
    return (rope_of(cfg, rotary),), which


def _partial(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))


def _qk_norm(w: Mapping[str, Array], p: str, key: str | None, heads: int) -> Norm | None:
    """A q or k norm: one weight per head channel, per head (StableLM: one LayerNorm per head), or over the
    whole projection (OLMo 2)."""
    if key is None:
        return None
    if p + key + ".norms.0.weight" in w:
        return np.stack([w[f"{p}{key}.norms.{h}.weight"] for h in range(heads)]), None
    return _norm(w, p + key)


def _llama_layer(cfg: Any, w: Mapping[str, Array], p: str, names: LayerNames, head_dim: int) -> DecoderLayer:
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if p + "self_attn.qkv_proj.weight" in w:  # Phi-3 stores q, k, v and gate, up fused
        qkv = w[p + "self_attn.qkv_proj.weight"]
        nq, nkv = heads * head_dim, kv * head_dim
        q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
        gu = w[p + "mlp.gate_up_proj.weight"]
        up: tuple[Array, ...] = (gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2:])
    else:
        q, k, v = (w[p + n + ".weight"] for n in (names.q, names.k, names.v))
        up = (w[p + names.up + ".weight"],)
        if names.gate:
            up = (w[p + names.gate + ".weight"], *up)
    bias = None
    if p + names.q + ".bias" in w:
        bias = tuple(w[p + n + ".bias"] for n in (names.q, names.k, names.v))
    up_bias = _bias(w, p + names.up)
    if names.gate and up_bias is not None:
        up_bias = np.concatenate([w[p + names.gate + ".bias"], up_bias])
    return DecoderLayer(
        qkv=(q, k, v), qkv_bias=bias, o=w[p + names.o + ".weight"], o_bias=_bias(w, p + names.o), up=up,
        up_bias=up_bias, down=w[p + names.down + ".weight"], down_bias=_bias(w, p + names.down),
        norm1=_norm(w, p + names.norm1 if names.norm1 else None),  # type: ignore[arg-type]
        norm2=_norm(w, p + names.norm2 if names.norm2 else None),  # type: ignore[arg-type]
        post_norm1=_norm(w, p + names.post1 if names.post1 else None),
        post_norm2=_norm(w, p + names.post2 if names.post2 else None),
        q_norm=_qk_norm(w, p, names.q_norm, heads), k_norm=_qk_norm(w, p, names.k_norm, kv),
        down_rotation=_rotation(w, f"{p}{names.down}.rotation."),
    )


def _rotation(w: Mapping[str, Array], prefix: str) -> tuple[Array, Array] | None:
    """The (signs, Hadamard block) of an online rotation the compress stage gave a linear's input, if any."""
    return (w[prefix + "signs"], w[prefix + "block"]) if prefix + "signs" in w else None


def _stablelm_names(cfg: Any) -> LayerNames:
    names = LLAMA_NAMES
    if cfg.qk_layernorm:
        names = LayerNames(q_norm="self_attn.q_layernorm", k_norm="self_attn.k_layernorm")
    return LayerNames(**{**names.__dict__, "norm2": None}) if cfg.use_parallel_residual else names


def _llama_like(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    refuse_custom_code(cfg)
    traits = traits_for(cfg.model_type)
    names = _stablelm_names(cfg) if cfg.model_type == "stablelm" else NAMES[cfg.model_type]
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    ropes, which = _ropes(cfg, head_dim)
    wins = windows(cfg, cfg.num_hidden_layers)
    layers = []
    for i in range(cfg.num_hidden_layers):
        layer = _llama_layer(cfg, w, f"{traits.layers}.{i}.", names, head_dim)
        layers.append(DecoderLayer(**{**layer.__dict__, "window": wins[i], "rope": which[i]}))
    granite = cfg.model_type == "granite"
    embed_scale = float(cfg.hidden_size) ** 0.5 if traits.embed_scaled else 1.0
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    tied = getattr(cfg, "tie_word_embeddings", False) or traits.lm_head not in w
    return DecoderSpec(
        model_type=cfg.model_type, hidden=cfg.hidden_size, heads=heads, kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim, vocab=cfg.vocab_size, norm="layer" if cfg.model_type in LAYER_NORM_TYPES else "rms",
        eps=float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-6)),
        norm_offset=traits.norm_offset, act=_act(cfg, getattr(cfg, "hidden_activation", None) or cfg.hidden_act),
        ropes=ropes, embed=w[traits.embed], embed_scale=float(cfg.embedding_multiplier) if granite else embed_scale,
        pos_embed=None, lm_head=lm_head_of(w, traits.lm_head, tied), final_norm=_norm(w, traits.final_norm),
        layers=tuple(layers),
        attn_scale=(float(cfg.attention_multiplier) if granite else float(scalar) ** -0.5 if scalar else None),
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        logit_scale=1.0 / float(cfg.logits_scaling) if granite else 1.0,
        residual_scale=float(cfg.residual_multiplier) if granite else 1.0,
        parallel=cfg.model_type == "stablelm" and bool(cfg.use_parallel_residual),
        qk_norm="full" if cfg.model_type == "olmo2" else "head",
    )


def _phi(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    """Phi-1.5 / Phi-2: attention and MLP side by side on one LayerNorm, dense biases, partial rotary, a biased head."""
    refuse_custom_code(cfg)
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    names = LayerNames(o="self_attn.dense", gate=None, up="mlp.fc1", down="mlp.fc2", norm2=None,
                       q_norm="self_attn.q_layernorm" if cfg.qk_layernorm else None,
                       k_norm="self_attn.k_layernorm" if cfg.qk_layernorm else None)
    layers = tuple(_llama_layer(cfg, w, f"model.layers.{i}.", names, head_dim) for i in range(cfg.num_hidden_layers))
    return DecoderSpec(
        model_type="phi", hidden=cfg.hidden_size, heads=heads, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        vocab=cfg.vocab_size, norm="layer", eps=float(cfg.layer_norm_eps), norm_offset=0.0,
        act=_act(cfg, cfg.hidden_act), ropes=(rope_of(cfg, int(head_dim * _partial(cfg))),),
        embed=w["model.embed_tokens.weight"], embed_scale=1.0, pos_embed=None,
        lm_head=lm_head_of(w, "lm_head.weight", cfg.tie_word_embeddings or "lm_head.weight" not in w),
        final_norm=_norm(w, "model.final_layernorm"), layers=layers, parallel=True,
        lm_head_bias=w.get("lm_head.bias"),
    )


def _gpt_neox(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    """Pythia: q/k/v fused and interleaved per head, two LayerNorms, parallel or sequential residual."""
    refuse_custom_code(cfg)
    heads, h = cfg.num_attention_heads, cfg.hidden_size
    d = h // heads
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"gpt_neox.layers.{i}."
        # q, k, v interleaved per head: rows [heads, 3, d]; gathered by index, which the compress stage's
        # quantized tensors support too
        rows = np.arange(heads * 3 * d).reshape(heads, 3, d)
        qkv, qkv_b = w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"]
        layers.append(DecoderLayer(
            qkv=tuple(qkv[rows[:, j].reshape(-1)] for j in range(3)),  # type: ignore[arg-type]
            qkv_bias=tuple(qkv_b[rows[:, j].reshape(-1)] for j in range(3)),  # type: ignore[arg-type]
            o=w[p + "attention.dense.weight"], o_bias=w[p + "attention.dense.bias"],
            up=(w[p + "mlp.dense_h_to_4h.weight"],), up_bias=w[p + "mlp.dense_h_to_4h.bias"],
            down=w[p + "mlp.dense_4h_to_h.weight"], down_bias=w[p + "mlp.dense_4h_to_h.bias"],
            norm1=_norm(w, p + "input_layernorm"), norm2=_norm(w, p + "post_attention_layernorm"),  # type: ignore[arg-type]
        ))
    return DecoderSpec(
        model_type="gpt_neox", hidden=h, heads=heads, kv_heads=heads, head_dim=d, vocab=cfg.vocab_size, norm="layer",
        eps=float(cfg.layer_norm_eps), norm_offset=0.0, act=_act(cfg, cfg.hidden_act),
        ropes=(rope_of(cfg, int(d * _partial(cfg))),), embed=w["gpt_neox.embed_in.weight"], embed_scale=1.0,
        pos_embed=None, lm_head=lm_head_of(w, "embed_out.weight", cfg.tie_word_embeddings)
        if "embed_out.weight" in w else lm_head_of(w, "lm_head.weight", cfg.tie_word_embeddings),
        final_norm=_norm(w, "gpt_neox.final_layer_norm"), layers=tuple(layers),  # type: ignore[arg-type]
        parallel=bool(cfg.use_parallel_residual),
    )


def _opt(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    """OPT: learned positions offset by 2, ReLU, biases everywhere; the 350m form adds project_in/out and puts
    the norms after the residual adds."""
    refuse_custom_code(cfg)
    if not getattr(cfg, "layer_norm_elementwise_affine", True):
        raise ConfigError("opt: layer_norm_elementwise_affine false (norms without weights) is not supported")
    heads, h = cfg.num_attention_heads, cfg.hidden_size
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        a = p + "self_attn."
        layers.append(DecoderLayer(
            qkv=tuple(w[a + f"{n}_proj.weight"] for n in "qkv"),  # type: ignore[arg-type]
            qkv_bias=tuple(w[a + f"{n}_proj.bias"] for n in "qkv") if a + "q_proj.bias" in w else None,  # type: ignore[arg-type]
            o=w[a + "out_proj.weight"], o_bias=_bias(w, a + "out_proj"), up=(w[p + "fc1.weight"],),
            up_bias=_bias(w, p + "fc1"), down=w[p + "fc2.weight"], down_bias=_bias(w, p + "fc2"),
            norm1=_norm(w, p + "self_attn_layer_norm"), norm2=_norm(w, p + "final_layer_norm"),  # type: ignore[arg-type]
        ))
    proj = None
    if "model.decoder.project_in.weight" in w:
        proj = (w["model.decoder.project_in.weight"], w["model.decoder.project_out.weight"])
    return DecoderSpec(
        model_type="opt", hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, vocab=cfg.vocab_size,
        norm="layer", eps=1e-5, norm_offset=0.0, act=_act(cfg, cfg.activation_function), ropes=(),
        embed=w["model.decoder.embed_tokens.weight"], embed_scale=1.0,
        pos_embed=w["model.decoder.embed_positions.weight"][2:],  # OPT's positions start at row 2
        lm_head=lm_head_of(w, "lm_head.weight", cfg.tie_word_embeddings or "lm_head.weight" not in w),
        final_norm=_norm(w, "model.decoder.final_layer_norm"), layers=tuple(layers),  # type: ignore[arg-type]
        post_ln=not cfg.do_layer_norm_before, embed_proj=proj,
    )


def _conv1d(x: Any) -> Any:
    """A Conv1D weight in the linear layout: float ones are [in, out]; the compress stage's quantized ones are
    already [out, in] (``ArchTraits.conv1d``)."""
    return x.T if is_float_array(x) else x


def _gpt2(cfg: Any, w: Mapping[str, Array]) -> DecoderSpec:
    h = cfg.n_embd
    pre = "transformer." if "transformer.wte.weight" in w else ""
    layers = []
    for i in range(cfg.n_layer):
        p = f"{pre}h.{i}."
        qkv, qkv_b = _conv1d(w[p + "attn.c_attn.weight"]), w[p + "attn.c_attn.bias"]
        layers.append(DecoderLayer(
            qkv=(qkv[:h], qkv[h:2 * h], qkv[2 * h:]), qkv_bias=(qkv_b[:h], qkv_b[h:2 * h], qkv_b[2 * h:]),
            o=_conv1d(w[p + "attn.c_proj.weight"]), o_bias=w[p + "attn.c_proj.bias"],
            up=(_conv1d(w[p + "mlp.c_fc.weight"]),), up_bias=w[p + "mlp.c_fc.bias"],
            down=_conv1d(w[p + "mlp.c_proj.weight"]), down_bias=w[p + "mlp.c_proj.bias"],
            norm1=(w[p + "ln_1.weight"], w[p + "ln_1.bias"]), norm2=(w[p + "ln_2.weight"], w[p + "ln_2.bias"]),
        ))
    return DecoderSpec(
        model_type="gpt2", hidden=h, heads=cfg.n_head, kv_heads=cfg.n_head, head_dim=h // cfg.n_head,
        vocab=cfg.vocab_size, norm="layer", eps=float(cfg.layer_norm_epsilon), norm_offset=0.0,
        act=_act(cfg, cfg.activation_function), ropes=(), embed=w[pre + "wte.weight"],
        embed_scale=1.0, pos_embed=w[pre + "wpe.weight"],
        lm_head=lm_head_of(w, "lm_head.weight", "lm_head.weight" not in w or cfg.tie_word_embeddings),
        final_norm=(w[pre + "ln_f.weight"], w[pre + "ln_f.bias"]), layers=tuple(layers),
    )


for _name in NAMES:
    ADAPTERS.register(_name, _llama_like)
ADAPTERS.register("phi", _phi)
ADAPTERS.register("gpt_neox", _gpt_neox)
ADAPTERS.register("opt", _opt)
ADAPTERS.register("gpt2", _gpt2)
