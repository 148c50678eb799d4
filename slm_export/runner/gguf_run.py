"""The llama.cpp side of the runner: a ``.gguf`` decoder through llama.cpp's Python bindings (llama-cpp-python).

Scoring evaluates a window's tokens with every position's logits kept (``logits_all``); generation uses a
second context that keeps only the last position's, read through llama.cpp's C API
(``llama_get_logits_ith``), so a prompt costs what it costs an application. Both keep llama.cpp's own
defaults otherwise (f16 KV cache, its threads and kernels): the figures are what a llama.cpp user gets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_run import greedy_loop

CONTEXT_STEP = 256  # a context holds the run's positions rounded up to this; a longer run opens a larger one


class GgufDecoder:
    """Runs a ``.gguf`` through llama.cpp with the ``OnnxDecoder`` interface: full logits for scoring, greedy
    generation with llama.cpp's own KV cache."""

    static_len = None

    def __init__(self, path: Path, threads: int = 0) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        self._contexts: dict[bool, Any] = {}

    def _context(self, all_logits: bool, tokens: int) -> Any:
        """A llama.cpp context with room for ``tokens`` positions (kept, and grown when a run needs more)."""
        llm = self._contexts.get(all_logits)
        if llm is None or llm.n_ctx() < tokens:
            n_ctx = -(-max(tokens, 1) // CONTEXT_STEP) * CONTEXT_STEP
            llm = self.lib.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                 n_threads=self.threads, n_threads_batch=self.threads, logits_all=all_logits,
                                 verbose=False)
            self._contexts[all_logits] = llm
        return llm

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits of every position, one row at a time from position 0 (the cache is cleared first)."""
        rows = []
        for i, row in enumerate(input_ids):
            keep = [int(x) for x in (row if attention_mask is None else row[attention_mask[i] > 0])]
            llm = self._context(True, len(keep))
            llm.reset()
            llm.eval(keep)
            rows.append(np.array(llm.scores[: len(keep)], dtype=np.float32))
        return np.stack(rows)

    def _last_logits(self, llm: Any) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Any = None) -> tuple[list[int], Any]:
        llm = self._context(False, len(prompt) + max_new_tokens)
        llm.reset()

        def prefill() -> np.ndarray:
            llm.eval([int(t) for t in prompt])
            return self._last_logits(llm)

        def step(token: int, pos: int) -> np.ndarray:
            if llm.n_tokens != pos:
                raise RuntimeError(f"llama.cpp's cache holds {llm.n_tokens} positions, the loop is at {pos}")
            llm.eval([token])
            return self._last_logits(llm)

        return greedy_loop(prefill, step, len(prompt), max_new_tokens, eos_token_id, on_token)
