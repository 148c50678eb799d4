"""The ONNX Runtime side of the runner: a session, and the project's own generation loop over an exported
decoder (KV cache kept in OrtValues).

Each decode step binds the previous step's present tensors as the next step's past without a copy
through NumPy; only the last position's logits come back to Python. A graph whose metadata says its
attention appends in place (ONNX Runtime's GroupQueryAttention, ``slm_export.kv_cache =
shared-buffer``) gets one preallocated cache per layer, bound as both past and present, so no step
copies the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Model metadata written by the exporter: the graph's attention can append to a shared past/present buffer.
KV_CACHE_KEY, KV_SHARED_BUFFER = "slm_export.kv_cache", "shared-buffer"
# Optional input of the fused ORT graphs: logits for the last N positions (0, the graph's default: all).
LOGITS_TO_KEEP = "logits_to_keep"


@dataclass(frozen=True)
class GenerationTiming:
    """Timings of one greedy generation (seconds)."""

    prefill_s: float
    decode_s: list[float]


def greedy_loop(prefill: Callable[[], np.ndarray], step: Callable[[int, int], np.ndarray], n: int,
                max_new_tokens: int, eos_token_id: int | None,
                on_token: Callable[[int], None] | None) -> tuple[list[int], GenerationTiming]:
    """Greedy decoding with a KV cache: ``prefill()`` runs the ``n``-token prompt and returns the last
    position's logits; ``step(token, position)`` feeds one token and returns its logits."""
    t0 = time.perf_counter()
    last = prefill()
    prefill_s = time.perf_counter() - t0
    out: list[int] = []
    decode_s: list[float] = []
    while True:
        token = int(last.argmax())
        out.append(token)
        if on_token:
            on_token(token)
        if len(out) >= max_new_tokens or token == eos_token_id:
            break
        t = time.perf_counter()
        last = step(token, n + len(out) - 1)
        decode_s.append(time.perf_counter() - t)
    return out, GenerationTiming(prefill_s, decode_s)


def make_session(model_path: str | Path, threads: int = 0, optimize: bool = True, exact_qdq: bool = False,
                 config: dict[str, str] | None = None) -> Any:
    """An ONNX Runtime CPU session with the given intra-op thread count (0: all cores).

    ``exact_qdq``: leave QuantizeLinear/DequantizeLinear pairs unfused, so each quantized MatMul runs as
    a float MatMul of the dequantized int8 values: the exact products of the integer arithmetic a GPU or
    DPU performs. ORT's fused int8 kernels on x86 CPUs without VNNI multiply u8 x s8 pairs into int16
    with saturation (pmaddubsw), which can move logits by whole units; they are the truth only for an
    artifact whose runtime is ORT on such a CPU.

    ``config``: further session config entries (a job's ``ort_config``), e.g. ``{"mlas.disable_kleidiai":
    "1"}`` to take ORT's own NEON kernels instead of KleidiAI's on aarch64 (scripts/diag_ort_arm.py).

    A fused graph's optional ``logits_to_keep`` defaults to 1 in these sessions (0, every position, in
    the file, for callers that never feed it): IOBinding cannot bind it, and the generation loop's prefill
    then runs the LM head on the last position only. Scoring feeds 0 explicitly."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    keep_last = ort.OrtValue.ortvalue_from_numpy(np.asarray(1, np.int64))
    so.add_initializer(LOGITS_TO_KEEP, keep_last)  # ignored by graphs without it or taking it as an input
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if exact_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    session.slm_keep_last = keep_last  # ORT reads the initializer's memory for the session's lifetime
    return session


class OnnxDecoder:
    """Runs an exported decoder: full forward for scoring, and greedy generation with a KV cache."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        # A static-shape graph (no cache, fixed [1, N] input) is run window by window.
        self.static_len: int | None = None
        if not self.past_names:
            seq = session.get_inputs()[0].shape[1]
            self.static_len = int(seq) if isinstance(seq, int) else None
            if self.static_len is None:
                raise ValueError("a decoder without a KV cache must have a static sequence length")
            return
        first = next(i for i in session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.past_dtype = np.float16 if "float16" in first.type else np.float32
        meta = session.get_modelmeta().custom_metadata_map
        self.shared_kv = meta.get(KV_CACHE_KEY) == KV_SHARED_BUFFER
        self.vocab = next(o for o in session.get_outputs() if o.name == "logits").shape[-1]
        # The exporter's fused ORT graphs can run the LM head on the last position only (a prefill needs no
        # more); they always share the cache buffer, so only _shared_generate relies on it. Their
        # logits_to_keep is an optional input (an overridable initializer, which IOBinding cannot bind:
        # make_session's sessions default it to 1); artifacts of earlier versions take it as a required
        # input, which generation binds to 1.
        required = {i.name for i in session.get_inputs()}
        optional = {i.name for i in session.get_overridable_initializers()}
        self.keep_last = LOGITS_TO_KEEP in required | optional
        self.bind_keep = LOGITS_TO_KEEP in required

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype)
        return {n: empty for n in self.past_names}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for every position of ``input_ids`` [batch, seq] (no cache)."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.static_len is not None:
            return np.concatenate([self._static_logits(row[m > 0].tolist())[None] for row, m in zip(input_ids, mask,
                                                                                                     strict=True)])
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), **self._empty_past(input_ids.shape[0])}
        if self.keep_last:
            feed[LOGITS_TO_KEEP] = np.asarray(0, np.int64)  # every position
        return self.session.run(["logits"], feed)[0]

    def _static_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of ``tokens`` through the fixed-length graph: right-padded, padding masked."""
        n, size = len(tokens), self.static_len
        assert size is not None
        if n > size:
            raise ValueError(f"{n} tokens do not fit the static graph's {size}-token window")
        ids = np.zeros((1, size), np.int64)
        ids[0, :n] = tokens
        mask = np.zeros((1, size), np.int64)
        mask[0, :n] = 1
        pos = np.minimum(np.arange(size, dtype=np.int64), max(n - 1, 0))[None]
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0][0, :n]

    def _static_generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None,
                         on_token: Callable[[int], None] | None) -> tuple[list[int], GenerationTiming]:
        tokens, out, times = list(prompt), [], []
        while len(out) < max_new_tokens:
            t = time.perf_counter()
            token = int(self._static_logits(tokens)[-1].argmax())
            times.append(time.perf_counter() - t)
            out.append(token)
            tokens.append(token)
            if on_token:
                on_token(token)
            if token == eos_token_id:
                break
        return out, GenerationTiming(times[0], times[1:])

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationTiming]:
        """Greedy decoding of up to ``max_new_tokens`` after ``prompt`` (batch 1)."""
        if self.static_len is not None:
            return self._static_generate(prompt, max_new_tokens, eos_token_id, on_token)
        if self.shared_kv:
            return self._shared_generate(prompt, max_new_tokens, eos_token_id, on_token)
        sess = self.session
        n = len(prompt)
        feeds: dict[str, Any] = {"input_ids": np.asarray([prompt], dtype=np.int64),
                                 "attention_mask": np.ones((1, n), np.int64),
                                 "position_ids": np.arange(n, dtype=np.int64)[None], **self._empty_past(1)}
        presents: list[Any] = []  # the last run's KV outputs, left on ORT's side and bound as the next inputs

        def run(binding: Any) -> np.ndarray:
            for name in ["logits", *self.present_names]:
                binding.bind_output(name)
            sess.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            presents[:] = outputs[1:]
            return outputs[0].numpy()[0, -1]

        def prefill() -> np.ndarray:
            binding = sess.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            return run(binding)

        def step(token: int, pos: int) -> np.ndarray:
            binding = sess.io_binding()
            binding.bind_cpu_input("input_ids", np.asarray([[token]], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, pos + 1), np.int64))
            binding.bind_cpu_input("position_ids", np.asarray([[pos]], np.int64))
            for past, present in zip(self.past_names, presents, strict=True):
                binding.bind_ortvalue_input(past, present)
            return run(binding)

        return greedy_loop(prefill, step, n, max_new_tokens, eos_token_id, on_token)

    def _shared_generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None,
                         on_token: Callable[[int], None] | None) -> tuple[list[int], GenerationTiming]:
        """Greedy decoding with one cache buffer per layer (prompt + new tokens long), bound as both the
        past input and the present output: the attention kernel writes each new position in place and
        reads only the filled part (its ``seqlens_k``). A step's logits land in one reused array."""
        import onnxruntime as ort

        sess = self.session
        n = len(prompt)
        shape = (1, self.kv_heads, n + max_new_tokens, self.head_dim)
        caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.past_dtype)) for _ in self.past_names]
        binding = sess.io_binding()
        for name, cache in zip(self.past_names, caches, strict=True):
            binding.bind_ortvalue_input(name, cache)
        step_logits = np.zeros((1, 1, int(self.vocab)), np.float32) if isinstance(self.vocab, int) else None
        step_out = ort.OrtValue.ortvalue_from_numpy(step_logits) if step_logits is not None else None

        ones = np.ones((1, n + max_new_tokens), np.int64)  # attention_mask: a prefix of it each run
        if self.bind_keep:  # stays bound: each run's logits are its last position's
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.asarray(1, np.int64))

        def bind_outputs(logits: Any) -> None:
            binding.clear_binding_outputs()
            if logits is None:
                binding.bind_output("logits")
            else:
                binding.bind_ortvalue_output("logits", logits)
            for present, cache in zip(self.present_names, caches, strict=True):
                binding.bind_ortvalue_output(present, cache)

        def run(ids: np.ndarray, total: int, positions: np.ndarray) -> None:
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", ones[:, :total])
            binding.bind_cpu_input("position_ids", positions)
            sess.run_with_iobinding(binding)

        def prefill() -> np.ndarray:
            bind_outputs(None)  # the prompt's logits: ORT allocates them
            run(np.asarray([prompt], np.int64), n, np.arange(n, dtype=np.int64)[None])
            last = binding.get_outputs()[0].numpy()[0, -1]
            if step_out is not None:
                bind_outputs(step_out)  # from here on, each step writes into the same arrays
            return last  # type: ignore[no-any-return]

        def step(token: int, pos: int) -> np.ndarray:
            if step_out is None:  # a symbolic vocabulary: let ORT allocate each step's logits afresh
                bind_outputs(None)
            run(np.asarray([[token]], np.int64), pos + 1, np.asarray([[pos]], np.int64))
            if step_logits is None:
                return binding.get_outputs()[0].numpy()[0, -1]  # type: ignore[no-any-return]
            return step_logits[0, -1]

        return greedy_loop(prefill, step, n, max_new_tokens, eos_token_id, on_token)
