"""The Apache TVM side of the runner: a compiled Relax decoder (``.so``) through TVM's runtime alone.

Imports only NumPy and ``tvm``'s runtime (``tvm.runtime.load_module``, ``tvm.runtime.vm.VirtualMachine``),
so it runs with ``TVM_USE_RUNTIME_LIB=1`` or a runtime-only install on the board. The library holds
code only; the weights come from the params file beside it (an uncompressed ``.npz`` whose
``__meta__`` entry is a JSON header, loaded without pickle), passed after the user inputs on each call.

The module's interface (``slm_export/backends/tvm/build.py``): ``input_ids``, ``attention_mask`` and
``position_ids`` [batch, seq] (the mask covers the new tokens only), past keys/values per layer
[batch, kv_heads, past, head_dim]; it returns the logits and the present keys/values. Decoding keeps
the present tensors on the TVM side and passes them back as the next step's past (no NumPy copy).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_run import GenerationTiming, greedy_loop

PARAMS_FILE = "tvm_params.npz"
META_KEY = "__meta__"


def params_path(library: Path) -> Path:
    """The params file for ``library``: ``tvm_params.npz`` in the same folder."""
    return Path(library).with_name(PARAMS_FILE)


def set_threads(threads: int) -> None:
    """TVM's CPU thread pool size (0: leave TVM's default, one worker per core)."""
    if threads:
        import tvm

        # (affinity mode 0 = big cores first, as the default pool does; the thread count)
        tvm.get_global_func("runtime.config_threadpool")(0, threads)


class TvmDecoder:
    """Runs a TVM-compiled decoder with the ``OnnxDecoder`` interface: full logits for scoring, greedy
    generation with the KV cache."""

    static_len = None

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.tvm = tvm
        path = Path(path)
        pfile = params_path(path)
        if not pfile.is_file():
            raise FileNotFoundError(f"{path.name} needs its weights in {pfile} (written beside it by the build)")
        with np.load(pfile, allow_pickle=False) as data:
            self.meta: dict[str, Any] = json.loads(str(data[META_KEY]))
            count = len(self.meta["params"])
            self.params = [tvm.runtime.tensor(np.ascontiguousarray(data[f"p{i:04d}"])) for i in range(count)]
        set_threads(threads)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        self.main = self.vm["main"]
        self.layers, self.kv_heads = int(self.meta["layers"]), int(self.meta["kv_heads"])
        self.head_dim, self.max_len = int(self.meta["head_dim"]), int(self.meta["max_len"])

    def _tensor(self, a: np.ndarray) -> Any:
        return self.tvm.runtime.tensor(np.ascontiguousarray(a))

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any]) -> tuple[Any, list[Any]]:
        # The embedding and rotary lookups use TVM's unchecked gather: check ids and positions here.
        if pos.size and (pos.min() < 0 or pos.max() >= self.max_len):
            raise ValueError(f"positions must lie in [0, {self.max_len}), the build's max_seq_len")
        if ids.size and (ids.min() < 0 or ids.max() >= int(self.meta["vocab"])):
            raise ValueError(f"token ids must lie in [0, {self.meta['vocab']})")
        out = self.main(self._tensor(ids.astype(np.int64)), self._tensor(mask.astype(np.int64)),
                        self._tensor(pos.astype(np.int64)), *past, *self.params)
        return out[0], list(out)[1:]

    def _empty_past(self, batch: int) -> list[Any]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [self._tensor(empty) for _ in range(2 * self.layers)]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for every position of ``input_ids`` [batch, seq] (no cache); a 0 in ``attention_mask``
        marks (left) padding, as for ``OnnxDecoder``."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        logits, _ = self._run(input_ids, mask, positions, self._empty_past(input_ids.shape[0]))
        return logits.numpy()

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationTiming]:
        """Greedy decoding of up to ``max_new_tokens`` after ``prompt`` (batch 1) with the KV cache."""
        n = len(prompt)
        state: list[Any] = [self._empty_past(1)]  # the KV cache, replaced by each run's

        def run(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
            logits, state[0] = self._run(ids, mask, pos, state[0])
            return logits.numpy()[0, -1]

        return greedy_loop(lambda: run(np.asarray([prompt]), np.ones((1, n)), np.arange(n)[None]),
                           lambda token, pos: run(np.asarray([[token]]), np.ones((1, 1)), np.asarray([[pos]])),
                           n, max_new_tokens, eos_token_id, on_token)
