"""The traits of each decoder architecture: the module paths and the structural facts that the compress stage
and the adapters read (``traits_for``), spelt once per Hugging Face ``model_type``.

``scale_groups`` lists only the folds that leave the float model's function exactly unchanged: a per-channel
scale ``s`` given to the columns of the linears reading an input, and ``1 / s`` to the op producing it. That op
must feed those linears and nothing else: a pre-norm (its weight, and its bias for a LayerNorm), or a linear
whose output reaches the reader through a map that commutes with a positive per-channel scale (the gated MLP's
``act(gate) * up``, ReLU). A norm on a block's output (post-norm, post-LN) also feeds the residual stream, and
GELU/SiLU between two linears does not commute with a scale: neither folds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from slm_export.errors import ConfigError

ScaleGroup = tuple[str, tuple[str, ...]]  # (the op producing an input, the linears reading it), paths in a layer
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# A gated MLP's down_proj reads act(gate) * up: dividing up_proj's rows by s divides that product by s.
UP_DOWN: ScaleGroup = ("mlp.up_proj", ("mlp.down_proj",))
LLAMA_SCALE_GROUPS: tuple[ScaleGroup, ...] = (("input_layernorm", QKV), ("post_attention_layernorm", GATE_UP), UP_DOWN)
LLAMA_PROJECTIONS: tuple[ScaleGroup, ...] = (
    ("qkv", QKV), ("o", ("self_attn.o_proj",)), ("gate_up", GATE_UP), ("down", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ArchTraits:
    """Facts about a decoder architecture that more than one stage reads, spelt once. Module paths inside a
    decoder layer unless said otherwise; weight names are Hugging Face's."""

    layers: str = "model.layers"  # the decoder layer list: its module path, and the prefix of its weights' names
    norm_offset: float = 0.0  # the RMSNorm multiplies by (w + offset): Gemma's (1 + w)
    embed_scaled: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    # Linears stored [in, out] as Conv1D (GPT-2): the compress stage works on nn.Linear twins of them, and its
    # quantized weights (QuantizedTensor) are [out, in] like every other linear's; float ones keep Conv1D's layout.
    conv1d: bool = False
    # AWQ and SmoothQuant move a per-channel scale from the input of each group's linears into the op producing
    # it (a norm, or the linear before); only exact folds are listed (see the module's docstring).
    scale_groups: tuple[ScaleGroup, ...] = ()
    # The projection groups the accuracy budget keeps at int4 or raises to int8 together, named.
    projection_groups: tuple[ScaleGroup, ...] = LLAMA_PROJECTIONS
    # The MLP's output projection: W8A8's online rotation turns its input (exact for any linear: (xR)(WR)^T).
    # None where the family's adapter (models/decoders.py) reads no ``down_rotation`` yet, so the graph would
    # lack the online half: Phi-1.5/2 (mlp.fc2), GPT-NeoX (mlp.dense_4h_to_h), OPT (fc2), GPT-2 (mlp.c_proj).
    down_proj: str | None = "mlp.down_proj"
    # The value and output projections: the offline head rotation's pair; None where v is fused with q and k.
    v_proj: str | None = "self_attn.v_proj"
    o_proj: str | None = "self_attn.o_proj"
    final_norm: str = "model.norm"  # module path from the top: the norm after the last layer (may be absent)
    head_proj: str | None = None  # module path from the top: a linear between the final norm and the LM head
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"

    @property
    def folds_scales(self) -> bool:
        return bool(self.scale_groups)

    def head_producer(self, weights: Mapping[str, Any]) -> tuple[str, bool] | None:
        """The op whose output the LM head reads, where AWQ folds the head's ``1 / s``: (its weights' prefix,
        whether it is a linear): OPT-350m's project_out, else the final norm; None when neither has a weight."""
        if self.head_proj and self.head_proj + ".weight" in weights:
            return self.head_proj, True
        if self.final_norm + ".weight" in weights:
            return self.final_norm, False
        return None


LLAMA = ArchTraits(scale_groups=LLAMA_SCALE_GROUPS)
GEMMA = ArchTraits(norm_offset=1.0, embed_scaled=True, scale_groups=LLAMA_SCALE_GROUPS)
PHI = ArchTraits(
    # One LayerNorm feeds q/k/v and fc1 side by side (parallel block): a single group folds into it, bias
    # included; fc1 -> fc2 has GELU between them: no fold.
    scale_groups=(("input_layernorm", (*QKV, "mlp.fc1")),),
    projection_groups=(("qkv", QKV), ("o", ("self_attn.dense",)), ("fc", ("mlp.fc1",)), ("down", ("mlp.fc2",))),
    down_proj=None, o_proj="self_attn.dense", final_norm="model.final_layernorm",  # mlp.fc2: no down_rotation read
)
NEOX_QKV, NEOX_FC = "attention.query_key_value", "mlp.dense_h_to_4h"
GPT_NEOX = ArchTraits(
    # Each LayerNorm feeds one linear in both block orders (the fused, per-head interleaved query_key_value and
    # dense_h_to_4h): the fold into the norm is exact whatever the fused rows' order; GELU before dense_4h_to_h.
    layers="gpt_neox.layers",
    scale_groups=(("input_layernorm", (NEOX_QKV,)), ("post_attention_layernorm", (NEOX_FC,))),
    projection_groups=(("qkv", (NEOX_QKV,)), ("o", ("attention.dense",)), ("fc", (NEOX_FC,)),
                       ("down", ("mlp.dense_4h_to_h",))),
    down_proj=None, v_proj=None, o_proj="attention.dense", final_norm="gpt_neox.final_layer_norm",  # dense_4h_to_h
    embed="gpt_neox.embed_in.weight",
)
OPT_PRE_LN: tuple[ScaleGroup, ...] = (("self_attn_layer_norm", QKV), ("final_layer_norm", ("fc1",)))
OPT = ArchTraits(
    # Pre-LN (do_layer_norm_before, all but the 350m layout): each norm feeds q/k/v or fc1 only. ReLU between fc1
    # and fc2 commutes with a positive scale: fc1's rows and bias take 1/s. ``opt_traits`` adapts it per config.
    layers="model.decoder.layers", scale_groups=(*OPT_PRE_LN, ("fc1", ("fc2",))),
    projection_groups=(("qkv", QKV), ("o", ("self_attn.out_proj",)), ("fc", ("fc1",)), ("down", ("fc2",))),
    down_proj=None, o_proj="self_attn.out_proj", final_norm="model.decoder.final_layer_norm",  # fc2
    head_proj="model.decoder.project_out", embed="model.decoder.embed_tokens.weight",
)
STABLELM = ArchTraits(scale_groups=LLAMA_SCALE_GROUPS)  # the sequential block; ``stablelm_traits`` per config

TRAITS: dict[str, ArchTraits] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,  # q/k norms act on q/k_proj's outputs, per head: the inputs fold as in Llama
    "smollm3": LLAMA,  # the no-rope layers change attention, not the norms feeding the linears
    "granite": LLAMA,  # the multipliers scale the residual branches and scores, after the linears
    # q/k/v and gate/up fused (qkv_proj, gate_up_proj): each pre-norm feeds one linear and folds into it; up is
    # half of gate_up_proj's rows, which a fold into the whole linear cannot single out: no up -> down fold.
    "phi3": ArchTraits(scale_groups=(("input_layernorm", ("self_attn.qkv_proj",)),
                                     ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                       v_proj=None, projection_groups=(("qkv", ("self_attn.qkv_proj",)), LLAMA_PROJECTIONS[1],
                                                       ("gate_up", ("mlp.gate_up_proj",)), LLAMA_PROJECTIONS[3])),
    "gemma": GEMMA,
    # Pre and post norms: input_layernorm feeds q/k/v and pre_feedforward_layernorm gate/up; the post norms sit
    # on the attention and MLP outputs, before the residual add: they feed no linear of the layer.
    "gemma2": replace(GEMMA, scale_groups=(("input_layernorm", QKV), ("pre_feedforward_layernorm", GATE_UP), UP_DOWN)),
    "gemma3_text": replace(GEMMA, scale_groups=(("input_layernorm", QKV), ("pre_feedforward_layernorm", GATE_UP),
                                                UP_DOWN)),
    # Post-norm order: the norms are on the attention and MLP outputs, so q/k/v and gate/up read the residual
    # stream itself (no producer to fold into); q/k norms span the whole projection. Only up -> down folds.
    "olmo2": ArchTraits(scale_groups=(UP_DOWN,)),
    "phi": PHI,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
    "stablelm": STABLELM,
    # ln_1 feeds the fused c_attn and ln_2 c_fc (LayerNorms: weight and bias fold); GELU before c_proj. The
    # budget's twin swaps weights into the Conv1D modules in their own layout: no projection groups yet.
    "gpt2": ArchTraits(layers="transformer.h", conv1d=True, scale_groups=(("ln_1", ("attn.c_attn",)),
                                                                         ("ln_2", ("mlp.c_fc",))),
                       projection_groups=(), down_proj=None, v_proj=None, o_proj="attn.c_proj",  # mlp.c_proj
                       final_norm="transformer.ln_f", embed="transformer.wte.weight"),
}


def opt_traits(config: Any) -> ArchTraits:
    """OPT's folds for this config: post-LN (350m: do_layer_norm_before false) puts each norm after its residual
    add, where its output is also the residual stream: no norm folds; fc1 -> fc2 only through ReLU."""
    pre_ln = getattr(config, "do_layer_norm_before", True)
    relu = getattr(config, "activation_function", "relu") == "relu"
    groups = (OPT_PRE_LN if pre_ln else ()) + ((("fc1", ("fc2",)),) if relu else ())
    return replace(OPT, scale_groups=groups)


def stablelm_traits(config: Any) -> ArchTraits:
    """StableLM's folds for this config: the parallel block's one LayerNorm feeds q/k/v and gate/up together;
    the sequential block has Llama's two pre-norms (LayerNorms with bias)."""
    if getattr(config, "use_parallel_residual", False):
        return replace(STABLELM, scale_groups=(("input_layernorm", (*QKV, *GATE_UP)), UP_DOWN))
    return STABLELM


# Families whose structure, and so whose folds, depend on the config.
CONFIG_TRAITS: dict[str, Callable[[Any], ArchTraits]] = {"opt": opt_traits, "stablelm": stablelm_traits}


def traits_for(model_type: str, config: Any = None) -> ArchTraits:
    """The traits of a decoder architecture, for ``config`` where its structure depends on it (without one, the
    family's common layout); a ``ConfigError`` naming the known architectures for any other."""
    if model_type not in TRAITS:
        raise ConfigError(f"no decoder traits for architecture {model_type!r}; known: {', '.join(TRAITS)}")
    if config is not None and model_type in CONFIG_TRAITS:
        return CONFIG_TRAITS[model_type](config)
    return TRAITS[model_type]


def folding_types() -> list[str]:
    """The architectures whose norms AWQ and SmoothQuant fold scales into."""
    return [name for name, t in TRAITS.items() if t.folds_scales]
