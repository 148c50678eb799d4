"""The peers bench_decode.py times beside this tool's artifacts: ONNX Runtime GenAI's model builder and
generator, and llama.cpp through llama-cpp-python. Each is optional: its functions return None when its
package does not import. Their runners are ``slm_export.bench.Runner``s, timed by its interleaved rounds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.bench import Runner

MATMUL_OPS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "FusedMatMul", "QLinearMatMul", "DequantizeLinear",
              "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 21: 0.5, 22: 0.5}


def bytes_read_per_token(onnx_path: Path) -> int:
    """Bytes of the initializers that matmul-like nodes read: what one decoded token streams from memory. For a
    peer's graph, which has no report; this tool's artifacts record theirs (``roofline.weight_bytes_read_per_token``
    in report.json)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    size: dict[str, float] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else int(np.prod(t.dims)) * ONNX_ITEMSIZE.get(
            t.data_type, 4)
    used = {i for n in model.graph.node if n.op_type in MATMUL_OPS for i in n.input if i in size}
    return int(sum(size[n] for n in used))


# ---- ONNX Runtime GenAI --------------------------------------------------------------------------
def genai_export(work: Path, model: Any, threads: int, folder: str = "genai-int4",
                 extra: str = "accuracy_level=4") -> Path | None:
    """GenAI's model builder, int4 for the CPU, on the float model saved beside it; ``extra``: its
    ``--extra_options`` (the default is its default RTN at accuracy level 4). None when GenAI does not import."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    out = work / folder
    if not (out / "genai_config.json").is_file():
        hf = work / "hf-float32"
        if not (hf / "config.json").is_file():
            model.torch_module().save_pretrained(hf)
            model.tokenizer.save_pretrained(hf)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                              "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"),
                              "--extra_options", *extra.split(",")], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"the GenAI builder failed:\n{res.stderr[-3000:]}")
        print(f"  GenAI builder: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"], opts["inter_op_num_threads"] = threads, 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def genai_runner(out: Path, prompt: list[int], new: int, threads: int | None = None) -> Runner:
    """GenAI's own generator; ``threads`` overrides the config's intra-op thread count (genai_export wrote the
    bench's), so the same artifact is timed on 1 thread too."""
    import onnxruntime_genai as og

    config = og.Config(str(out))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def run() -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        gen.get_next_tokens()
        first = time.perf_counter() - t
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            steps.append(time.perf_counter() - t)
        return first, steps

    return run


class GenAIScorer:
    """GenAI's decoder graph scored like any artifact: full windows, empty KV cache."""

    def __init__(self, path: Path, threads: int) -> None:
        from slm_export.runner.onnx_run import make_session

        self.session = make_session(path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])  # dims are symbolic

    def logits(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        feed: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64),
                                       "attention_mask": np.ones((1, n), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, i in self.inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in i.type else np.float32
                feed[name] = np.zeros(self.kv_shape, dtype)
        return self.session.run(["logits"], feed)[0]


# ---- llama.cpp (optional) ---------------------------------------------------------------------------
def llama_cpp_runner(prompt: list[int], new: int, threads: int) -> Runner | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from slm_export.models.builtin import BUILTIN_MODELS

    llm = llama_cpp.Llama(model_path=str(BUILTIN_MODELS.get("smollm2-135m").path()), n_threads=threads, n_ctx=512,
                          verbose=False)

    def run() -> tuple[float, list[float]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        first = time.perf_counter() - t
        steps, token = [], int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(new - 1):
            t = time.perf_counter()
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
        return first, steps

    return run
