"""Weights read from the model's files when asked for, not held: the streaming load.

A model whose float32 weights do not fit beside the rest of a run (a 3-8 B model on a 24 GiB machine) is read
tensor by tensor: ``LazyWeights`` maps the module's parameter names to their place in the safetensors shards
and reads one with ``pread`` each time it is asked for, in its stored dtype, then casts it to float32. Nothing
is cached and nothing is memory-mapped, so the process holds only the tensors its caller keeps (pages of a
mapped file would count in its resident memory until unmapped; the page cache does not).

``lazy_view`` hands the exporter stand-ins (``LazyTensor``) that read their tensor only when the graph writer
asks for its bytes, so a graph is written holding one weight at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.errors import ModelLoadError
from slm_export.models.safetensors_check import FLOAT_DTYPES, TensorEntry, read_header

_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are: the file, the byte offset of its data, its dtype and shape."""

    path: Path
    offset: int
    entry: TensorEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def numel(self) -> int:
        return int(np.prod(self.entry.shape, dtype=np.int64))


def _data_start(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def index_safetensors(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of the shards by its checkpoint name (headers checked by ``read_header``)."""
    out: dict[str, Stored] = {}
    for f in files:
        start = _data_start(f)
        for name, e in read_header(f).items():
            out[name] = Stored(f, start + e.begin, e)
    return out


CHUNK_BYTES = 64 << 20  # read and cast this much at a time: a 1 GB bf16 embedding never needs 3 GB at once


def read_tensor(s: Stored) -> Any:
    """One tensor read with ``pread`` (no mapping left behind), float dtypes cast to float32 chunk by chunk into
    the result, so the peak is the float32 tensor plus one chunk of stored bytes."""
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[s.entry.dtype])
    n, numel = s.entry.end - s.entry.begin, s.numel
    floats = s.entry.dtype in FLOAT_DTYPES
    out = torch.empty(numel, dtype=torch.float32 if floats else dtype)
    if not numel:
        return out.reshape(s.shape)
    width = n // numel
    step = max(1, CHUNK_BYTES // width)
    buf = bytearray(min(n, step * width))
    try:
        _read_into(out, buf, s, dtype, step, width)
    except OSError as exc:  # the checks at load passed: the file changed or went away since
        raise ModelLoadError(f"{s.path}: tensor {s.entry.name} cannot be read any more ({exc.strerror or exc}): was "
                             "the model file changed, truncated or removed during the run?") from None
    return out.reshape(s.shape)


def _read_into(out: Any, buf: bytearray, s: Stored, dtype: Any, step: int, width: int) -> None:
    import torch

    numel = s.numel
    fd = os.open(s.path, os.O_RDONLY)
    try:
        for first in range(0, numel, step):
            count = min(step, numel - first)
            view = memoryview(buf)[:count * width]
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], s.offset + first * width + done)
                if got <= 0:
                    raise OSError(f"{s.path}: short read of tensor {s.entry.name}")
                done += got
            out[first:first + count] = torch.frombuffer(view, dtype=dtype)
    finally:
        os.close(fd)


class LazyWeights(Mapping[str, Any]):
    """Parameter name -> float32 tensor, read from the files at each access. ``sources`` maps every name to
    the checkpoint tensor that holds it (a tied LM head names the embedding's)."""

    def __init__(self, stored: Mapping[str, Stored], sources: Mapping[str, str]) -> None:
        self._stored, self._sources = dict(stored), dict(sources)

    def __getitem__(self, key: str) -> Any:
        return read_tensor(self._stored[self._sources[key]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, key: object) -> bool:
        return key in self._sources

    def unique_keys(self) -> list[str]:
        """One parameter name per checkpoint tensor (a tied head's is left out)."""
        first: dict[str, str] = {}
        for name, src in self._sources.items():
            first.setdefault(src, name)
        return list(first.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._stored[self._sources[key]].shape

    def source(self, key: str) -> str:
        return self._sources[key]

    @property
    def float32_bytes(self) -> int:
        """Bytes of the weights as float32, each checkpoint tensor counted once (tied ones share)."""
        return sum(4 * self._stored[s].numel for s in set(self._sources.values()))

    def largest_float32_bytes(self) -> int:
        return max((4 * self._stored[s].numel for s in set(self._sources.values())), default=0)


def lazy_sources(stored: Mapping[str, Stored], wanted: Mapping[str, tuple[int, ...]],
                 tied: Mapping[str, str]) -> dict[str, str] | None:
    """Parameter name -> checkpoint name for every name the module wants, by exact name or a tie; None when
    a name has no tensor of its shape (the eager loader then names the fault as transformers reports it)."""
    out = {}
    for name, shape in wanted.items():
        src = name if name in stored else tied.get(name)
        if src is None or src not in stored or tuple(stored[src].shape) != tuple(shape):
            return None
        out[name] = src
    return out


class LazyTensor:
    """A stand-in for a float weight the exporter will write: its shape now, its values (read from ``weights``)
    only when converted to an array. Row slices and transposes stay lazy (the adapters split fused projections
    and turn Conv1D weights at spec time); arithmetic reads the tensor (the graph writer does it, at write time)."""

    def __init__(self, weights: Mapping[str, Any], key: str, shape: tuple[int, ...],
                 ops: tuple[tuple[str, Any], ...] = ()) -> None:
        self._weights, self._key, self._ops = weights, key, ops
        self.shape = tuple(shape)

    def numpy(self) -> np.ndarray:
        arr = np.asarray(self._weights[self._key].numpy())
        for op, arg in self._ops:
            arr = arr[arg] if op == "slice" else arr.T
        return arr

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr.astype(dtype) if dtype is not None else arr

    def __getitem__(self, index: Any) -> Any:
        """A row slice stays lazy; any other index reads the tensor."""
        if not isinstance(index, slice):
            return self.numpy()[index]
        rows = len(range(self.shape[0])[index])
        return LazyTensor(self._weights, self._key, (rows, *self.shape[1:]), (*self._ops, ("slice", index)))

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        return LazyTensor(self._weights, self._key, self.shape[::-1], (*self._ops, ("T", None)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> Any:
        return np.dtype(np.float32)

    def __add__(self, other: Any) -> np.ndarray:
        return self.numpy() + other

    __radd__ = __add__

    def __mul__(self, other: Any) -> np.ndarray:
        return self.numpy() * other

    __rmul__ = __mul__

    def __sub__(self, other: Any) -> np.ndarray:
        return self.numpy() - other

    def __neg__(self) -> np.ndarray:
        return -self.numpy()


def is_float_array(x: Any) -> bool:
    """A float weight as the adapters see it: an array, or a streamed model's stand-in for one."""
    return isinstance(x, (np.ndarray, LazyTensor))


class LazyView(Mapping[str, Any]):
    """``weights`` (float tensors and the compress stage's quantized ones) with every float weight of a lazily
    loaded model replaced by a ``LazyTensor``; one stand-in per name, so that a tied head stays the embedding's."""

    def __init__(self, weights: Mapping[str, Any], lazy: LazyWeights) -> None:
        self._weights, self._lazy = weights, lazy
        self._made: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._made:
            return self._made[key]
        value = self._weights[key] if not self._is_lazy(key) else None
        if value is None:
            src = self._lazy.source(key)
            value = self._made.get(src) or LazyTensor(self._lazy, key, self._lazy.shape(key))
            self._made[src] = value
        self._made[key] = value
        return value

    def _is_lazy(self, key: str) -> bool:
        base = self._weights
        return key in self._lazy and (base is self._lazy or getattr(base, "base_of", lambda k: None)(key) is self._lazy)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, key: object) -> bool:
        return key in self._weights


class Overlay(Mapping[str, Any]):
    """A base mapping (a model's lazily read weights) with some entries replaced, without reading the rest."""

    def __init__(self, base: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
        self._base, self._changes = base, dict(changes)

    def __getitem__(self, key: str) -> Any:
        return self._changes[key] if key in self._changes else self._base[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._changes
        yield from (k for k in self._base if k not in self._changes)

    def __len__(self) -> int:
        return len(set(self._base) | set(self._changes))

    def __contains__(self, key: object) -> bool:
        return key in self._changes or key in self._base

    def __setitem__(self, key: str, value: Any) -> None:
        self._changes[key] = value

    def base_of(self, key: str) -> Mapping[str, Any] | None:
        """The mapping ``key`` comes from when it is not replaced here."""
        return None if key in self._changes else self._base


# A model whose float32 weights take more than this share of the machine's memory is streamed: a held run peaks at
# 2 to 2.4 times them (the held weights beside the runtime's session in compile and validation), so beyond an
# eighth the run would crowd a machine that also runs other work; streaming gives the same artifact, only slower.
STREAM_SHARE = 0.125


# A container's memory limit (cgroup v2, then v1): a CI runner's job may see the host's RAM but get far less.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def total_memory(limits: tuple[str, ...] = CGROUP_LIMITS) -> int:
    """The memory this process may use: the machine's, or its container's limit where that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 1 << 62
    for path in limits:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge number (v1) mean no limit
            total = min(total, int(text))
    return total


def lazy_weights(config: Any, kind: str, files: list[Path]) -> LazyWeights | None:
    """The weights as a ``LazyWeights`` when every parameter the module wants is a tensor of the shards (a tied
    LM head: the embedding's); None otherwise (``.bin`` files, renamed or missing tensors: the eager load
    handles and names them)."""
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    bare = skeleton(config, kind)
    wanted = {k: tuple(v.shape) for k, v in bare.state_dict().items()}
    tied = {}
    if getattr(config, "tie_word_embeddings", False) and kind == "decoder":
        names = {id(m): n for n, m in bare.named_modules()}
        inp, outp = bare.get_input_embeddings(), bare.get_output_embeddings()
        if inp is not None and outp is not None:
            tied[f"{names[id(outp)]}.weight"] = f"{names[id(inp)]}.weight"
    sources = lazy_sources(index_safetensors(files), wanted, tied)
    return None if sources is None else LazyWeights(index_safetensors(files), sources)


def skeleton(config: Any, kind: str) -> Any:
    """The module with its parameters on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config).eval()


def streamed_module(model: Any, hook_layers: bool = True) -> Any:
    """The PyTorch reference of a streamed model: its parameters stay on the meta device except while their
    block runs. Each decoder layer, and each other module owning parameters (embeddings, final norm, head),
    reads its weights just before its forward and drops them after, so a forward holds one block's float32
    weights at a time, whatever the model's size; the price is reading the weights again at every forward.
    Without ``hook_layers`` the decoder layers stay on the meta device for their caller to fill (the sequential
    calibration runs each layer several times over the weights it rounds)."""
    import torch
    from torch import nn

    module = skeleton(model.config, model.kind)
    names = {id(m): n for n, m in module.named_modules()}
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) and
             all(sum(1 for _ in b.parameters()) > 1 for b in m)]
    nested = {id(x) for lst in lists for x in lst.modules() if x is not lst}
    layers = [m for m in lists if id(m) not in nested]  # the decoder's own list, not a list inside a layer
    inside = {id(x) for lst in layers for x in lst.modules()}
    blocks = [b for lst in layers if hook_layers for b in lst] + [
        m for m in module.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]

    def params(block: nn.Module) -> list[tuple[nn.Module, str, str]]:
        out = []
        for sub in block.modules():
            for pname, _ in sub.named_parameters(recurse=False):
                out.append((sub, pname, f"{names[id(sub)]}.{pname}".lstrip(".")))
        return out

    def load(block: nn.Module, _args: Any) -> None:
        for sub, pname, full in params(block):
            setattr(sub, pname, nn.Parameter(model.weights[full], requires_grad=False))

    def drop(block: nn.Module, _args: Any, _out: Any) -> None:
        for sub, pname, _full in params(block):
            p = getattr(sub, pname)
            setattr(sub, pname, nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False))

    for b in blocks:
        b.register_forward_pre_hook(load)
        b.register_forward_hook(drop)
    module.streamed = True
    return module
