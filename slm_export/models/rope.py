"""Rotary position embeddings as a model fact: the base, the rotated width and the scaling a config asks for.

Every builder (the ONNX graphs, the ExecuTorch and TVM rebuilds) gets its cos/sin tables from
``Rope.tables``, so one computation serves them all and matches transformers' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The rope types the tables implement; any other is refused when the model is adapted (exit 2).
ROPE_TYPES = ("default",)


@dataclass(frozen=True)
class Rope:
    theta: float
    dim: int  # the rotated channels of each head (partial rotary: fewer than head_dim)
    kind: str = "default"  # transformers' rope_type
    params: tuple[tuple[str, Any], ...] = ()  # the rest of rope_parameters (factor, original context, ...)

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def tables(self, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed sin, [max_pos, dim], float32, computed the way transformers does."""
        inv_freq = (1.0 / (self.theta ** (np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32)
                                          / self.dim))).astype(np.float32)
        freqs = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
        return np.concatenate([cos, cos], -1), np.concatenate([-sin, sin], -1)
