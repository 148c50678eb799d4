"""A small ONNX graph builder that streams weights to an external-data file.

Initializers are recorded lazily (a function returning the array), so a transposed, merged or cast
weight exists in memory only while it is being written: export peak memory stays near the model's
own float32 weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ArrayFn = Callable[[], np.ndarray]
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint16): TensorProto.UINT16}
EXTERNAL_MIN_BYTES = 1024
ALIGN = 64


class GraphBuilder:
    """Collects nodes, inputs, outputs and lazy initializers; ``save`` writes model + data file."""

    def __init__(self, name: str, opset: int, ms_opset: bool = False) -> None:
        self.name, self.opset, self.ms_opset = name, opset, ms_opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._inits: list[tuple[str, ArrayFn, int | None]] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[str, bytes], str] = {}
        self._count = 0
        self.metadata: dict[str, str] = {}  # model metadata_props (runtimes expose them as custom metadata)

    # ---- naming ---------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    # ---- graph interface --------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, elem: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def init(self, name: str, fn: ArrayFn, elem: int | None = None) -> str:
        """Register a lazily produced initializer (a weight). ``elem`` packs uint8 values as UINT4/INT4."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self._inits.append((name, fn, elem))
        return name

    def const(self, value: float | int | Sequence[int] | np.ndarray, dtype: type = np.int64) -> str:
        """A small constant, deduplicated."""
        arr = np.asarray(value, dtype=dtype)
        key = (str(arr.dtype) + str(arr.shape), arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self._consts[key] = self.init(name, lambda a=arr: a)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "",
           name: str | None = None, **attrs: object) -> str | list[str]:
        """Add a node; returns its output name (or names when ``n_out`` > 1)."""
        base = name or self.fresh(op_type.lower())
        outs = [f"{base}_out{i}" if n_out > 1 else f"{base}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def op_to(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "",
              **attrs: object) -> None:
        """Add a node writing to named outputs (graph outputs)."""
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(op_type.lower()),
                                           domain=domain, **attrs))

    # ---- opset-dependent helpers --------------------------------------------------------------
    def reduce_mean(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(list(axes))], keepdims=1)  # type: ignore[return-value]
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=1)  # type: ignore[return-value]

    def reduce_max(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMax", [x, self.const(list(axes))], keepdims=1)  # type: ignore[return-value]
        return self.op("ReduceMax", [x], axes=list(axes), keepdims=1)  # type: ignore[return-value]

    def split(self, x: str, sizes: Sequence[int], axis: int) -> list[str]:
        return self.op("Split", [x, self.const(list(sizes))], n_out=len(sizes), axis=axis)  # type: ignore[return-value]

    # ---- save ------------------------------------------------------------------------------
    def save(self, path: Path, data_name: str | None = None) -> tuple[int, int]:
        """Write ``path`` and its external data file; returns (model bytes, data bytes)."""
        data_name = data_name or path.name + ".data"
        data_path = path.parent / data_name
        initializers = []
        with open(data_path, "wb") as fh:
            for name, fn, elem in self._inits:
                arr = np.asarray(fn())
                arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # keeps 0-d scalars 0-d
                tensor = TensorProto(name=name, data_type=elem or _NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
                if elem in (TensorProto.UINT4, TensorProto.INT4):  # two 4-bit values a byte, low first
                    flat = arr.reshape(-1).astype(np.uint8) & 0x0F
                    flat = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
                    arr = flat[0::2] | (flat[1::2] << 4)
                if arr.nbytes >= EXTERNAL_MIN_BYTES:
                    pad = (-fh.tell()) % ALIGN
                    fh.write(b"\0" * pad)
                    offset = fh.tell()
                    fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
                    tensor.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = k, v
                else:
                    tensor.raw_data = arr.tobytes()
                initializers.append(tensor)
                del arr
            fh.flush()
            os.fsync(fh.fileno())
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.ms_opset:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="slm-export")
        if self.metadata:
            helper.set_model_props(model, self.metadata)
        # The lowest IR version that carries the opset: older runtimes (TensorRT 8.x) read it.
        model.ir_version = 7 if self.opset <= 15 else 8 if self.opset <= 18 else 10
        onnx.save_model(model, str(path))
        return path.stat().st_size, data_path.stat().st_size
