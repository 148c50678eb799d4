"""Sequential, layer-by-layer calibration over a Hugging Face decoder.

The calibration set is embedded once, and each layer's own keyword arguments (masks, rotary tables) recorded;
then each decoder layer is run twice over it: once with hooks that collect what the method needs (the Hessian
X^T X, activation statistics, a token subsample), and once, after its weights are replaced by their quantized
values, to produce the next layer's inputs.
Memory stays near one layer's activations for the whole set plus the hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slm_export.errors import ConfigError
from slm_export.hessian import accumulate
from slm_export.models.traits import ArchTraits, traits_for


class _Stop(Exception):
    pass


@dataclass
class InputStats:
    """What a linear layer's inputs looked like over the calibration set."""

    hessian: torch.Tensor | None = None  # sum of x^T x, float32 [in, in]
    abs_mean: torch.Tensor | None = None  # mean |x| per input channel
    abs_max: torch.Tensor | None = None  # max |x| per input channel
    sq_sum: torch.Tensor | None = None  # sum of x^2 per input channel (Wanda's norm)
    sample: list[torch.Tensor] = field(default_factory=list)  # a few token rows, for output-error searches
    tokens: int = 0

    def update(self, x: torch.Tensor, want_hessian: bool, sample_rows: int) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if want_hessian:
            self.hessian = accumulate(self.hessian, x)
        a = x.abs()
        self.abs_mean = a.sum(0) if self.abs_mean is None else self.abs_mean + a.sum(0)
        mx = a.amax(0)
        self.abs_max = mx if self.abs_max is None else torch.maximum(self.abs_max, mx)
        sq = (x * x).sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        have = sum(s.shape[0] for s in self.sample)
        if have < sample_rows:
            step = max(1, n // max(1, (sample_rows - have) // 4))
            self.sample.append(x[::step][: sample_rows - have].clone())
        self.tokens += n

    def divide(self, s: torch.Tensor) -> None:
        """The layer reads ``x / s`` from now on (a per-channel scale folded into its producer): the
        sample rows and the Hessian (the sum of ``(x/s)^T (x/s)``) follow."""
        self.sample = [x / s for x in self.sample]
        if self.hessian is not None:
            self.hessian = self.hessian / s[:, None] / s[None, :]

    def finish(self) -> InputStats:
        if self.abs_mean is not None:
            self.abs_mean = self.abs_mean / self.tokens
        return self


def traits_of(module: nn.Module) -> ArchTraits:
    """The architecture traits of a Hugging Face module (``models.adapters.traits_for`` of its config)."""
    config = getattr(module, "config", None)
    return traits_for(getattr(config, "model_type", None), config)  # type: ignore[arg-type]


def submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """``module``'s submodule at ``path``, or None when the path is None or names nothing there."""
    if path is None:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(module: nn.Module) -> nn.ModuleList:
    """The decoder layer list, where the architecture's traits put it."""
    try:
        layers = submodule(module, traits_of(module).layers)
    except ConfigError:
        layers = None
    if layers is None:
        raise TypeError(f"{type(module).__name__}: no decoder layer list found")
    return layers  # type: ignore[return-value]


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


CACHE_ARGS = ("past_key_values", "past_key_value", "cache", "layer_past", "use_cache")  # calibration keeps no cache


def layer_kwargs(layer: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A layer call's arguments after its hidden states, all by name (GPT-2's blocks take the attention mask
    by position), less the KV cache and its switch."""
    params = [p for p in inspect.signature(layer.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {**{p.name: a for p, a in zip(params[1:], args, strict=False)}, **kwargs}
    return {k: v for k, v in named.items() if k not in CACHE_ARGS}


def capture_layer_inputs(module: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The hidden states entering layer 0, one per batch, and the keyword arguments each layer receives, per
    layer and batch. Hybrid models give their layers different ones (sliding or full masks, local or global
    rotary tables), so each layer's own call is recorded: every layer is replaced by a catcher that records
    its arguments and passes the hidden states through, so no layer computes; the last stops the forward."""
    layers = decoder_layers(module)
    originals = list(layers)
    hidden: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in originals]

    class Catcher(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.i == 0:
                hidden.append(h)
            per_layer[self.i].append(layer_kwargs(originals[self.i], args, kwargs))
            if self.i == len(originals) - 1:
                raise _Stop
            return h

    for i in range(len(originals)):
        layers[i] = Catcher(i)
    try:
        with torch.no_grad():
            for ids in batches:
                with contextlib.suppress(_Stop):
                    module(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, per_layer


def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The layer's outputs, written over ``inputs`` batch by batch: one set of hidden states stays resident
    (128 x 512 tokens of smollm2 are 151 MB), not the inputs and outputs side by side."""
    with torch.no_grad():
        for i, (hidden, kwargs) in enumerate(inputs):
            out = layer(hidden, **kwargs)
            inputs[i] = (out[0] if isinstance(out, tuple) else out, kwargs)
            del hidden, out
    return inputs


def _shared_input_pass(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], new: Callable[[], Any],
                       update: Callable[[Any, torch.Tensor], None]) -> dict[str, Any]:
    """Run ``layer`` over ``inputs`` with hooks on its linear modules, feeding each input to ``update``.

    Linears that read the very same tensor (q/k/v, gate/up) share one record (from ``new``), which sees
    that tensor once. Once every linear has had its input the forward stops: the rest (the last linear's
    product, the residual add) feeds nothing recorded. Every linear of a decoder layer runs once per call.
    """
    records: dict[str, Any] = {}
    seen: dict[tuple[int, tuple[int, ...]], Any] = {}
    alive: list[torch.Tensor] = []
    called: set[str] = set()
    hooks = []
    linears = linear_modules(layer)
    for name, lin in linears.items():
        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            called.add(name)
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if name not in records:
                records[name] = seen[key] if key in seen else new()
            if seen.get(key) is not records[name]:  # else a sibling already recorded this very tensor
                seen[key] = records[name]
                alive.append(x)  # holding it keeps its address from being reused by a later tensor
                update(records[name], x)
            if len(called) == len(linears):
                raise _Stop
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for hidden, kwargs in inputs:
            seen.clear()
            alive.clear()
            called.clear()
            with torch.no_grad(), contextlib.suppress(_Stop):
                layer(hidden, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return records


def collect_stats(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], want_hessian: bool,
                  sample_rows: int = 2048) -> dict[str, InputStats]:
    """Input statistics of every linear in ``layer`` (shared by linears reading the same tensor)."""
    stats = _shared_input_pass(layer, inputs, InputStats, lambda st, x: st.update(x, want_hessian, sample_rows))
    done: dict[int, InputStats] = {}
    for st in stats.values():
        if id(st) not in done:
            done[id(st)] = st.finish()
    return stats


def observe_inputs(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]],
                   factory: Callable[[], Any]) -> dict[str, Any]:
    """Activation observers (from ``factory``) over the input of every linear in ``layer``."""
    return _shared_input_pass(layer, inputs, factory, lambda ob, x: ob.update(x))


# (layer index, layer, input statistics, the layer's inputs over the calibration set)
LayerStep = Callable[[int, nn.Module, dict[str, InputStats], list[tuple[torch.Tensor, dict]]], None]


def sequential_calibration(module: nn.Module, batches: list[torch.Tensor], step: LayerStep, want_hessian: bool,
                           after: Callable[[int, nn.Module], None] | None = None,
                           final: Callable[[list[tuple[torch.Tensor, dict]]], None] | None = None,
                           before: Callable[[int, nn.Module], None] | None = None) -> None:
    """For each layer: ``before`` (a streamed model's layer reads its weights), collect stats, let ``step``
    quantize it (replacing weights), recompute outputs from the quantized layer, then ``after`` (which may
    restore the layer: it is not run again). ``final`` gets the last (quantized) layer's outputs over the
    calibration set: the LM head's inputs before the final norm."""
    limit_heap_growth()
    layers = decoder_layers(module)
    first, per_layer = capture_layer_inputs(module, batches)
    hidden: list[tuple[torch.Tensor, dict]] = [(h, {}) for h in first]
    del first
    for i, layer in enumerate(layers):
        hidden = [(h, kw) for (h, _), kw in zip(hidden, per_layer[i], strict=True)]  # this layer's own kwargs
        if before:
            before(i, layer)
        stats = collect_stats(layer, hidden, want_hessian)
        step(i, layer, stats, hidden)
        del stats
        hidden = run_layer(layer, hidden)
        if after:
            after(i, layer)
        trim_heap()
    if final:
        final(hidden)


def limit_heap_growth() -> None:
    """Serve allocations over 32 MB by mmap, the rest from the heap, and give the heap's top back past 4 MB.

    32 MB is the most glibc's own adjustment ever raises its mmap threshold to; fixing it there from the start
    keeps a layer's per-batch activations in reused heap pages. A 1 MB threshold mapped and faulted each of them
    afresh: the stage then spent a third of its time in the kernel, for a peak memory only a sixth lower
    (docs/compression.md, "Compress stage time").
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 22)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give freed heap pages back to the OS: the per-layer temporaries otherwise fragment glibc's heap
    and resident memory creeps up layer after layer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
