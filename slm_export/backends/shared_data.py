"""One copy of each weight in an artifact folder holding two graphs of one model.

ONNX Runtime's offline optimization writes the optimized graph with its own external-data file, most of it the
exported graph's weights byte for byte: a float32 artifact then held its weights twice. ``share_weights`` points
each of the optimized graph's external tensors that equals one of the exported graph's at that copy, and keeps
only the others (those the optimizations made) in the optimized graph's own file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import TensorProto

from slm_export.exporters.graph import ALIGN

READ = 64 << 20  # bytes a read: a tensor is hashed and copied without holding it whole


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _chunks(path: Path, offset: int, length: int):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        fh.seek(offset)
        while length > 0:
            block = fh.read(min(READ, length))
            if not block:
                raise OSError(f"{path.name} ends before a tensor it should hold")
            length -= len(block)
            yield block


def _key(t: TensorProto, folder: Path) -> tuple[int, tuple[int, ...], str]:
    ext = _external(t)
    digest = hashlib.sha256()
    for block in _chunks(folder / ext["location"], int(ext.get("offset", 0)), int(ext["length"])):
        digest.update(block)
    return t.data_type, tuple(t.dims), digest.hexdigest()


def _externals(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def share_weights(exported: Path, optimized: Path) -> tuple[int, bool]:
    """Point ``optimized``'s external tensors equal to one of ``exported``'s at that one; returns the bytes no
    longer stored twice and whether the optimized graph still has a data file of its own (removed when not)."""
    folder = optimized.parent
    source = onnx.load(str(exported), load_external_data=False)
    by_length: dict[int, list[TensorProto]] = {}
    for t in _externals(source):
        by_length.setdefault(int(_external(t)["length"]), []).append(t)
    model = onnx.load(str(optimized), load_external_data=False)
    own = _externals(model)
    if not own:
        return 0, False
    old_data = folder / _external(own[0])["location"]
    keys: dict[tuple, dict[str, str]] = {}  # hashed lazily: only tensors of a length the optimized graph has
    saved, kept = 0, []
    for t in own:
        length = int(_external(t)["length"])
        if length not in by_length:  # nothing of its size in the exported graph: made by the optimizations
            kept.append(t)
            continue
        for cand in by_length[length]:
            keys.setdefault(_key(cand, folder), _external(cand))
        by_length[length] = []
        match = keys.get(_key(t, folder))
        if match is None:
            kept.append(t)
            continue
        _point(t, match)
        saved += length
    _rewrite(model, optimized, old_data, kept)
    return saved, bool(kept)


def _point(t: TensorProto, ext: dict[str, str]) -> None:
    del t.external_data[:]
    for k in ("location", "offset", "length"):
        if k in ext:
            entry = t.external_data.add()
            entry.key, entry.value = k, ext[k]


def _rewrite(model: onnx.ModelProto, optimized: Path, old_data: Path, kept: list[TensorProto]) -> None:
    """Write the kept tensors to a new data file, then the graph, each by a rename, then drop the old file."""
    new_data = old_data.with_name(old_data.name + ".part")
    moves = []
    if kept:
        with open(new_data, "wb") as fh:
            for t in kept:
                ext = _external(t)
                fh.write(b"\0" * ((-fh.tell()) % ALIGN))
                offset = fh.tell()
                for block in _chunks(old_data, int(ext.get("offset", 0)), int(ext["length"])):
                    fh.write(block)
                moves.append((t, {"location": old_data.name, "offset": str(offset), "length": ext["length"]}))
            fh.flush()
            os.fsync(fh.fileno())
    for t, ext in moves:
        _point(t, ext)
    graph_part = optimized.with_name(optimized.name + ".part")
    onnx.save_model(model, str(graph_part))
    if kept:
        os.replace(new_data, old_data)
    else:
        old_data.unlink()
    os.replace(graph_part, optimized)
