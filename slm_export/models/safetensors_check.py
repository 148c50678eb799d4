"""Check a *.safetensors file's header before transformers reads it.

The safetensors library trusts the header's dtypes: a float tensor relabelled I32 loads as integers and
becomes NaN or garbage once cast to float32. This reads the header (8-byte little-endian length, then
JSON) as the format defines it and refuses, naming the tensor, whatever the library would reject with an
obscure message or, worse, accept.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.errors import ModelLoadError

# The safetensors library's own limit on the header; a larger declared length is a damaged file.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype the format defines (sub-byte float formats included).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Integer buffers that older checkpoints persist beside the parameters (BERT ids, GPT-2 causal masks).
_INTEGER_BUFFERS = ("position_ids", "token_type_ids")
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_TOO_BIG = 1 << 64  # offsets and dimensions are u64 in the format


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header; offsets are relative to the data section (after the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Read and validate ``path``'s header. Raises ModelLoadError naming the file and the fault."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) == 8:
                n = struct.unpack("<Q", prefix)[0]
                if 0 < n <= MAX_HEADER_BYTES and n <= size - 8:
                    prefix += fh.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return parse_header(prefix, size, str(path))


def check_safetensors(path: Path) -> dict[str, TensorEntry]:
    """``read_header`` and ``check_float_dtypes``: the checks to run before loading the weights."""
    entries = read_header(path)
    check_float_dtypes(entries, str(path))
    return entries


def parse_header(data: bytes, file_size: int, where: str) -> dict[str, TensorEntry]:
    """Validate a header held in ``data`` (the file's first bytes, at least 8 + the header length).

    The rules are the format's: offsets ascend without gap or overlap from 0 to the end of the file,
    and each tensor's byte size is its dtype's size times the product of its shape.
    """
    if file_size < 8 or len(data) < 8:
        raise ModelLoadError(f"{where}: truncated safetensors file ({file_size} bytes; the header length alone "
                             "takes 8)")
    n = struct.unpack_from("<Q", data)[0]
    if n == 0 or n > MAX_HEADER_BYTES:
        raise ModelLoadError(f"{where}: not a safetensors file or damaged: declared header length {n} bytes "
                             f"(must be 1 to {MAX_HEADER_BYTES})")
    if n > file_size - 8 or len(data) < 8 + n:
        raise ModelLoadError(f"{where}: truncated safetensors file: the header declares {n} bytes but the file "
                             f"has {file_size} in all")
    raw = bytes(data[8:8 + n])
    if not raw.startswith(b"{"):
        raise ModelLoadError(f"{where}: not a safetensors file or damaged: the header does not start with '{{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{where}: damaged safetensors header (not UTF-8 JSON): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where}: damaged safetensors header: expected a JSON object")
    data_len = file_size - 8 - n
    entries = [_entry(name, info, where) for name, info in header.items() if name != "__metadata__"]
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelLoadError(f"{where}: damaged safetensors header: __metadata__ must map names to strings")
    pos = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin > data_len or e.end > data_len:
            raise ModelLoadError(f"{where}: tensor {e.name!r} ends at byte {e.end} of the data section, which "
                                 f"has {data_len}: the file is truncated")
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else f"leaves a gap after byte {pos}"
            raise ModelLoadError(f"{where}: tensor {e.name!r} starts at byte {e.begin} and {what}: damaged "
                                 "header")
        pos = e.end
    if pos != data_len:
        raise ModelLoadError(f"{where}: the header covers {pos} bytes of data but the file holds {data_len}: "
                             "damaged or truncated file")
    return {e.name: e for e in entries}


def check_float_dtypes(entries: Mapping[str, TensorEntry], where: str) -> None:
    """Refuse a non-float parameter: the cast to float32 would turn its bits into garbage, not weights."""
    for e in entries.values():
        if e.dtype in FLOAT_DTYPES or _integer_buffer(e.name):
            continue
        raise ModelLoadError(f"{where}: tensor {e.name!r} has dtype {e.dtype}; model weights must be float "
                             f"({', '.join(FLOAT_DTYPES)}). The header is damaged or the checkpoint is quantized "
                             "in a format this tool does not read: export the float model")


def _integer_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _INTEGER_BUFFERS or name.endswith(_MASK_BUFFERS)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _entry(name: str, info: Any, where: str) -> TensorEntry:
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: tensor {name[:200]!r}: {why}: damaged safetensors header")

    if not isinstance(info, dict):
        raise bad("expected {dtype, shape, data_offsets}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, not {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise bad(f"data_offsets must be [begin, end], not {str(offsets)[:80]}")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets end {end} is before begin {begin}")
    bits = DTYPE_BITS[dtype] * _product(shape)
    if bits % 8:
        raise bad(f"{dtype} x {str(shape)[:80]} is not a whole number of bytes")
    if bits // 8 != end - begin:
        size = "more than 2**64" if bits >= _TOO_BIG else str(bits // 8)
        raise bad(f"{dtype} x {str(shape)[:80]} is {size} bytes but its offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _TOO_BIG


def _product(shape: list[int]) -> int:
    """The element count, capped: a count past 2**64 is no file's (and would cost time to multiply out)."""
    total = 1
    for d in shape:
        total = min(total * d, _TOO_BIG)
    return total
