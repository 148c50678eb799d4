"""The ExecuTorch side of the runner: a ``.pte`` decoder through ExecuTorch's runtime (Python bindings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .onnx_run import greedy_loop


class PteDecoder:
    """Runs a ``.pte`` decoder through ExecuTorch's runtime with the ``OnnxDecoder`` interface: full
    logits for scoring, greedy generation with the program's own KV cache."""

    static_len = None

    def __init__(self, path: Path, threads: int = 0) -> None:
        # The program calls llama::update_cache / custom_sdpa: importing ExecuTorch's custom ops registers
        # their kernels with the runtime.
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import torch
        from executorch.extension.pybindings import portable_lib

        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.torch = torch
        self.module = portable_lib._load_for_executorch(str(path))

    def _run(self, tokens: list[int], pos: int, last: bool = False) -> np.ndarray:
        """Logits [S, vocab] of ``tokens`` fed at ``pos`` (only the last row's, [vocab], with ``last``).

        The output is the program's own buffer, overwritten by the next call, so NumPy copies what is kept
        (on this thread): the bindings' default, a torch clone, copies a logits row on torch's OpenMP pool,
        whose threads then spin and take the cores from XNNPACK's threads during the next call, slowing
        every decode step where cores are few. ExecuTorch's C++ runner copies nothing."""
        t = self.torch
        inputs = (t.tensor([tokens], dtype=t.long), t.tensor([pos], dtype=t.long))
        logits = self.module.run_method("forward", inputs, clone_outputs=False)[0].numpy()[0]
        return np.array(logits[-1] if last else logits)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits of every position, one row at a time from position 0 (the cache is overwritten)."""
        rows = []
        for i, row in enumerate(input_ids):
            keep = row if attention_mask is None else row[attention_mask[i] > 0]
            rows.append(self._run([int(x) for x in keep], 0))
        return np.stack(rows)

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Any = None) -> tuple[list[int], Any]:
        return greedy_loop(lambda: self._run(list(prompt), 0, last=True),
                           lambda token, pos: self._run([token], pos, last=True),
                           len(prompt), max_new_tokens, eos_token_id, on_token)

