"""The GGUF format: one pass over the header, tensors dequantized one at a time to float32.

transformers' own GGUF path parses the file three times and maps names per module (about 17 s and
2.2x the weights in memory for SmolLM2-135M); this reads the header once and keeps one float32 copy.

Every count, length and offset the file declares is checked against the file's size before it is used,
so a damaged file ends in a ModelLoadError that names it, never in a struct or numpy error.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.errors import ModelLoadError

# GGUF metadata value types -> struct format (strings and arrays handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_DEPTH = 4  # arrays of arrays exist in the format; deeper nesting is a damaged file, not a model
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in int64
MAX_COUNT = (1 << 31) - 1  # sizes, counts and ids are int32 in the exported graphs
_INTEGER_TYPES = (24, 25, 26, 27)  # I8, I16, I32, I64: not weight formats
_F64 = 28
GGUF_VERSIONS = (2, 3)

@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int


class ArrayCount(int):
    """A metadata array read as its length only (``keep_arrays=False``); ``etype`` is its element type.

    An int, so counts such as ``tokenizer.ggml.tokens`` read as numbers, yet distinguishable from a scalar
    where the config needs one value and the file holds a per-layer array.
    """

    etype: int

    def __new__(cls, count: int, etype: int) -> ArrayCount:
        obj = super().__new__(cls, count)
        obj.etype = etype
        return obj


class _Damaged(Exception):
    """Raised inside the parser; ``read_gguf`` turns it into a ModelLoadError naming the file."""


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise _Damaged(f"{what} at byte {self.pos} needs {n} bytes but the file ends at {len(self.buf)}: "
                           "truncated or corrupt")

    def take(self, fmt: str, what: str = "a value") -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str = "a string") -> str:
        n = self.take("Q", what)
        self.need(n, f"{what} of {n} bytes")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise _Damaged(f"{what}: arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            etype, count = self.take("I", what), self.take("Q", what)
            if etype not in _SCALAR and etype not in (_STRING, _ARRAY):
                raise _Damaged(f"{what}: unknown GGUF array element type {etype}")
            # The smallest encoding of one element bounds the count by the bytes left.
            least = struct.calcsize("<" + _SCALAR[etype]) if etype in _SCALAR else 8 if etype == _STRING else 12
            self.need(least * count, f"{what}: an array of {count} elements")
            if etype in _SCALAR and not keep_arrays:
                self.pos += least * count
                return ArrayCount(count, etype)
            items = [self.value(etype, keep_arrays, what, depth + 1) for _ in range(count)]
            return items if keep_arrays else ArrayCount(count, etype)
        raise _Damaged(f"{what}: unknown GGUF value type {vtype}")


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GgufTensorInfo], mmap.mmap, int]:
    """Parse header, metadata (arrays as ``ArrayCount``) and tensor infos; return the mapped file too.

    Raises:
        ModelLoadError: not GGUF, an unsupported version, or a header that is truncated or corrupt.
    """
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 24:  # magic, version and the two counts
                raise ModelLoadError(f"{path} is truncated ({size} bytes): not a GGUF file")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        meta, infos, start = _parse(mm, path)
    except _Damaged as exc:
        mm.close()
        raise ModelLoadError(f"{path}: cannot read GGUF (truncated or corrupt?): {exc}") from None
    except ModelLoadError:
        mm.close()
        raise
    return meta, infos, mm, start


def _parse(mm: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[GgufTensorInfo], int]:
    cur = _Cursor(mm)
    if cur.take("I") != 0x46554747:  # b"GGUF"
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
    version = cur.take("I")
    if version not in GGUF_VERSIONS:
        why = "too old" if version < 2 else "unknown (a big-endian file, or damaged)"
        raise ModelLoadError(f"{path}: cannot read GGUF version {version}, which is {why}; this reader takes "
                             "versions 2 and 3")
    n_tensors, n_kv = cur.take("Q", "the tensor count"), cur.take("Q", "the metadata count")
    cur.need(13 * n_kv, f"{n_kv} metadata entries")  # a key's length, a type, a one-byte value
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        meta[key] = cur.value(cur.take("I", f"the type of {key!r}"), keep_arrays=False, what=f"metadata {key!r}")
    cur.need(24 * n_tensors, f"{n_tensors} tensor descriptions")  # name length, dim count, type, offset
    infos: list[GgufTensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.take("I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = tuple(cur.take("Q", f"the dimensions of {name!r}") for _ in range(n_dims))
        ggml_type, offset = cur.take("I", f"the type of {name!r}"), cur.take("Q", f"the offset of {name!r}")
        if name in names:
            raise _Damaged(f"tensor {name!r} is described twice")
        names.add(name)
        info = GgufTensorInfo(name, dims, ggml_type, offset)
        _tensor_bytes(info)  # type and dimensions are checked here, before any data is touched
        infos.append(info)
    align = meta.get("general.alignment", 32)
    if not is_int(align) or align < 1 or align & (align - 1):
        raise _Damaged(f"general.alignment is {align!r}; it must be a power of two")
    data_start = (cur.pos + align - 1) // align * align
    data_len = len(mm) - data_start
    for info in infos:
        end = info.offset + _tensor_bytes(info)
        if end > data_len:
            raise _Damaged(f"tensor {info.name!r} ends at byte {end} of the data section, which has "
                           f"{max(data_len, 0)}: the file is truncated")
    return meta, infos, data_start


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool | ArrayCount)


def _tensor_bytes(info: GgufTensorInfo) -> int:
    """Bytes of ``info``'s data; raises _Damaged for an unknown type or dimensions its blocks cannot tile."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Damaged(f"tensor {info.name!r} has unknown ggml type {info.ggml_type}") from None
    if any(d < 1 for d in info.dims) or math.prod(info.dims) > _MAX_ELEMENTS:
        raise _Damaged(f"tensor {info.name!r} has impossible dimensions {info.dims}")
    if info.dims[0] % block:
        raise _Damaged(f"tensor {info.name!r}: its rows of {info.dims[0]} do not fill {qtype.name} blocks of "
                       f"{block}")
    return math.prod(info.dims) // block * type_size


def dequantize(info: GgufTensorInfo, mm: mmap.mmap, start: int) -> np.ndarray:
    import gguf

    try:
        nbytes = _tensor_bytes(info)
    except _Damaged as exc:
        raise ModelLoadError(str(exc)) from None
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    begin = start + info.offset
    if begin + nbytes > len(mm):
        raise ModelLoadError(f"tensor {info.name} runs past the end of the file: the GGUF is truncated")
    if info.ggml_type in _INTEGER_TYPES:
        raise ModelLoadError(f"tensor {info.name} holds integers ({qtype.name}), not weights: the GGUF is damaged "
                             "or not a model this tool reads")
    n = math.prod(info.dims)
    raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=begin)
    shape = tuple(reversed(info.dims))
    if info.ggml_type == 0:
        return raw.view(np.float32).reshape(shape).copy()
    if info.ggml_type == 1:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    if info.ggml_type == _F64:
        return raw.view(np.float64).reshape(shape).astype(np.float32)
    rows = raw.reshape(n // info.dims[0], -1)
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # damaged scales give NaN: the loader refuses those
            values = gguf.quants.dequantize(rows, qtype)
    except NotImplementedError:
        raise ModelLoadError(f"tensor {info.name} is {qtype.name}, which this reader cannot dequantize; "
                             "convert the model to another GGUF type (Q4_0, Q4_K, Q8_0, F16 ...)") from None
    return np.asarray(values, dtype=np.float32).reshape(shape)
