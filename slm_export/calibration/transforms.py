"""Transforms that leave the float model's function unchanged and make it easier to quantize: Hadamard
rotations (down_proj's input online, the attention heads offline) and per-channel scales moved from a
linear's input into the op that produces it (SmoothQuant, AWQ, and AWQ for the LM head through the final
norm). Each updates the calibration statistics of the inputs it changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slm_export.calibration.awq import AWQConfig, search_scale
from slm_export.calibration.rotation import Rotation, block_size, make_rotation
from slm_export.calibration.sequential import InputStats, decoder_layers, submodule, traits_of
from slm_export.calibration.smoothquant import choose_scales
from slm_export.models.traits import ArchTraits, traits_for

if TYPE_CHECKING:
    from slm_export.calibration.config import CompressConfig


def rotate_down(work: nn.Module, cfg: CompressConfig, rotate_weights: bool) -> dict[int, Rotation]:
    """A rotation per layer for down_proj's input; ``rotate_weights``: give the weights ``W R`` now
    (no calibration to follow: nothing runs the module again)."""
    out = {}
    path = traits_of(work).down_proj
    for i, layer in enumerate(decoder_layers(work)):
        down = submodule(layer, path)
        if down is None or block_size(down.in_features, cfg.rotate, strict=False) < 16:
            return {}  # no down_proj, or no power-of-two block of 16+ channels: the caller notes it
        out[i] = make_rotation(down.in_features, cfg.seed + i, cfg.rotate)
        if rotate_weights:
            down.weight = nn.Parameter(out[i].apply(down.weight.detach()), requires_grad=False)
    return out


def rotate_heads(work: nn.Module, config: Any, seed: int) -> int | None:
    """Rotate o_proj's input offline: each head's values ``v_h`` become ``v_h R`` (v_proj's rows and
    bias) and o_proj's columns take ``R`` per head, so the attention output reaching o_proj is rotated
    with no op added. One ``R`` for all heads, as grouped-query heads share their value heads.
    Returns the order of ``R``, or None when the heads are not a power-of-two size."""
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    if d < 16 or d & (d - 1):
        return None
    traits = traits_for(config.model_type, config)
    for i, layer in enumerate(decoder_layers(work)):
        v_proj, o_proj = submodule(layer, traits.v_proj), submodule(layer, traits.o_proj)
        if v_proj is None or o_proj is None:
            return None
        one = make_rotation(d, seed + 1000 + i, d)
        kv = v_proj.out_features // d
        per_v = Rotation(one.signs.repeat(kv), one.block)
        per_o = Rotation(one.signs.repeat(o_proj.in_features // d), one.block)
        v_proj.weight = nn.Parameter(per_v.apply(v_proj.weight.detach().T).T.contiguous(), requires_grad=False)
        if v_proj.bias is not None:
            v_proj.bias = nn.Parameter(per_v.apply(v_proj.bias.detach()), requires_grad=False)
        o_proj.weight = nn.Parameter(per_o.apply(o_proj.weight.detach()), requires_grad=False)
    return d


def apply_rotation(down: nn.Module, rot: Rotation, st: InputStats) -> Any:
    """From now on ``down`` (down_proj) reads ``x R`` and holds ``W R`` (after any smoothing: smooth, then rotate,
    so that the rotation spreads what the smoothing left over many channels); its calibration statistics
    move to the rotated basis. Returns the hook to remove once the layer's outputs exist."""
    down.weight = nn.Parameter(rot.apply(down.weight.detach()), requires_grad=False)
    st.sample = [rot.apply(x) for x in st.sample]
    if st.hessian is not None:  # R^T H R, H symmetric
        st.hessian = rot.apply(rot.apply(st.hessian).T.contiguous())
        st.sq_sum = torch.diagonal(st.hessian).clone()
    st.abs_max = torch.cat(st.sample).abs().amax(0)
    return down.register_forward_pre_hook(lambda m, args, r=rot: (r.apply(args[0]),))


def input_groups(layer: nn.Module, traits: ArchTraits) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(producer, linears reading its output, stats key) for the input-sharing groups of a layer
    (``ArchTraits.scale_groups``); the producer absorbs 1/s of a per-channel scale given to the linears. A norm
    without a weight (OPT's ``layer_norm_elementwise_affine`` off) has nothing to absorb it: its group is left out."""
    out = []
    for prev, readers in traits.scale_groups:
        producer = layer.get_submodule(prev)
        if getattr(producer, "weight", None) is not None:
            out.append((producer, [layer.get_submodule(n) for n in readers], readers[0]))
    return out  # type: ignore[return-value]


def fold_scales(prev: nn.Module, lins: list[nn.Linear], s: torch.Tensor, offset: float) -> None:
    """The linears read ``x / s`` from now on: multiply their columns by ``s``, divide the producer's output (a
    linear's rows, or a norm's weight, and either one's bias)."""
    for m in lins:
        m.weight = nn.Parameter(m.weight.detach() * s, requires_grad=False)
    if isinstance(prev, nn.Linear):  # fold 1/s into the rows of the producing linear
        prev.weight = nn.Parameter(prev.weight.detach() / s.unsqueeze(1), requires_grad=False)
    else:
        prev.weight = nn.Parameter(fold_into_norm(prev.weight.detach(), s, offset), requires_grad=False)
    if getattr(prev, "bias", None) is not None:  # a LayerNorm's or a linear's bias is part of the output
        prev.bias = nn.Parameter(prev.bias.detach() / s, requires_grad=False)


def fold_into_norm(weight: torch.Tensor, s: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm's weight after its output is divided by ``s``: ``y = norm(x) * (w + offset)`` (plus a bias, which
    the caller divides by ``s``)."""
    return (weight + offset) / s - offset


def smooth_layer(layer: nn.Module, stats: dict[str, InputStats], cfg: CompressConfig,
                 traits: ArchTraits, rotation: Rotation | None = None) -> dict[str, float | None]:
    """SmoothQuant's scale migration for each input group; returns the alpha chosen per group.
    ``rotation``: down_proj's input will be rotated after smoothing; the alpha search accounts for it."""
    chosen: dict[str, float | None] = {}
    for prev, lins, key in input_groups(layer, traits):
        st = stats[key]
        x = torch.cat(st.sample)
        rot = rotation.apply if rotation is not None and key == traits.down_proj else None
        s, alpha = choose_scales(x, st.abs_max, [m.weight.detach() for m in lins],  # type: ignore[arg-type]
                                 cfg.smooth_alpha, cfg.pow2_scales, rot)
        fold_scales(prev, lins, s, traits.norm_offset)
        for m_name, m in layer.named_modules():
            if any(m is lin for lin in lins):
                chosen[m_name] = alpha
        st.divide(s)
        st.abs_max = st.abs_max / s  # type: ignore[operator]
    return chosen


def awq_layer(layer: nn.Module, stats: dict[str, InputStats], cfg: CompressConfig, traits: ArchTraits,
              prefix: str) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Search and fold AWQ scales for the input-sharing groups of a layer; returns how each linear's weight
    was rescaled (``CompressResult.channel_scales``)."""
    acfg = AWQConfig(cfg.bits, cfg.group_size, cfg.symmetric, signed=cfg.signed_scales)
    names = {id(m): n for n, m in layer.named_modules()}
    cols: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    for prev, lins, key in input_groups(layer, traits):
        st = stats[key]
        x = torch.cat(st.sample)
        s = search_scale([m.weight.detach() for m in lins], x, st.abs_mean, acfg)  # type: ignore[arg-type]
        fold_scales(prev, lins, s, traits.norm_offset)
        cols.update({f"{prefix}.{names[id(m)]}.weight": s for m in lins})
        if isinstance(prev, nn.Linear):
            rows[f"{prefix}.{names[id(prev)]}.weight"] = s
        st.divide(s)  # the linears now read x / s (siblings share ``st``)
    return {n: (cols.get(n), rows.get(n)) for n in {*cols, *rows}}


def awq_head(w: torch.Tensor, st: InputStats, cfg: CompressConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's scale search for the LM head, whose ``1 / s`` the caller folds into the op producing its input (the
    final norm, or OPT's project_out; ``ArchTraits.head_producer``): the head's columns become ``W * s``, so the float
    model is unchanged. A tied head is its own tensor once quantized, so the embedding table is not touched.
    Updates ``st`` (sample, Hessian) to the scaled inputs; returns the scaled head and ``s``."""
    x = torch.cat(st.sample)
    x = x[:: max(1, x.shape[0] // 512)]  # the head is vocab x hidden: a few hundred tokens rank alpha
    acfg = AWQConfig(cfg.lm_head_bits, cfg.group_size, cfg.symmetric, signed=cfg.signed_scales)
    s = search_scale([w], x, st.abs_mean, acfg)
    st.divide(s)
    return w * s, s
