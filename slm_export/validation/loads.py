"""Which runtime loads which file of an artifact: the runtimes apps embed, each tried on the files it is meant for.

A check is a cheap load, no generation: the runtime opens the file (and what it reads beside it) the way an
application would, so the report can say "loads" from a fact, not from the file's name. A runtime that does not
import here is "not checked here" (nothing is claimed either way); a load that raises is "fails" with the first
line of the runtime's message. The loads run in this process, as validation runs these runtimes on the same
files.

Each runtime has a test for the files it takes (by suffix, and for ONNX Runtime GenAI and Optimum the decoder
file ``genai_config.json`` names) and a load function; ``runtime_loads`` returns one row per (file, runtime).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOADS, FAILS, NOT_CHECKED = "loads", "fails", "not checked here"
GENAI_CONFIG = "genai_config.json"
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}  # e_machine of an ELF header
HOST_ELF = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Runtime:
    """A runtime an application embeds: its name, the module whose import says it is installed, the files of
    a folder it is meant to load, and how to load one (raises when it cannot)."""

    name: str
    module: str
    files: Callable[[Path, list[str]], list[str]]
    load: Callable[[Any, Path, Path], None]


def _suffix(*suffixes: str) -> Callable[[Path, list[str]], list[str]]:
    return lambda folder, files: [f for f in files if Path(f).suffix in suffixes and "/" not in f]


def genai_decoder(folder: Path, files: list[str]) -> list[str]:
    """The decoder file ``genai_config.json`` names (GenAI and Optimum load the folder through it)."""
    path = folder / GENAI_CONFIG
    if GENAI_CONFIG not in files or not path.is_file():
        return []
    try:
        name = json.loads(path.read_text())["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError):
        return [GENAI_CONFIG]  # a damaged config: the load says why
    return [name] if isinstance(name, str) else [GENAI_CONFIG]


def _optimum_files(folder: Path, files: list[str]) -> list[str]:
    return [f for f in genai_decoder(folder, files) if f.endswith(".onnx") and "config.json" in files]


def _ort(ort: Any, folder: Path, path: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a load, not an optimization
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _genai(og: Any, folder: Path, path: Path) -> None:
    og.Tokenizer(og.Model(str(folder)))  # the model (its session) and the tokenizer it finds beside the config


def _optimum(optimum: Any, folder: Path, path: Path) -> None:
    optimum.ORTModelForCausalLM.from_pretrained(str(folder), file_name=path.name, use_cache=True, use_io_binding=False)


def _executorch(runner: Any, folder: Path, path: Path) -> None:
    # ExecuTorch's LLM runner reads the program's metadata methods and the tokenizer beside it; its kernels for
    # llama::update_cache and custom_sdpa are registered by importing the custom ops.
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401

    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise FileNotFoundError("no tokenizer.json beside the program, where the runner is given it")
    runner.TextLLMRunner(str(path), str(tokenizer)).get_vocab_size()


def _llama_cpp(llama_cpp: Any, folder: Path, path: Path) -> None:
    # the weights are mapped, not read, and a 16-position context allocates next to nothing
    llama_cpp.Llama(model_path=str(path), n_ctx=16, n_batch=16, verbose=False).close()


def _tvm(tvm: Any, folder: Path, path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(20)
    built = ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), "another machine") if head[:4] == b"\x7fELF" \
        else None
    here = HOST_ELF.get(platform.machine().lower(), platform.machine())
    if built is not None and built != here:
        raise NotHere(f"a library for {built}; this machine is {here}")
    tvm.runtime.load_module(str(path))


def _tensorrt(trt: Any, folder: Path, path: Path) -> None:
    logger = trt.Logger(trt.Logger.ERROR)
    if path.suffix == ".onnx":
        network = trt.Builder(logger).create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            raise ValueError(str(parser.get_error(0)) if parser.num_errors else "TensorRT's ONNX parser refused it")
        return
    if trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes()) is None:
        raise ValueError("TensorRT could not deserialize the engine")


class NotHere(Exception):  # noqa: N818 - a reason, not an error: the runtime cannot run this file on this machine
    """The file is for another machine: the load cannot be tried here."""


def _tensorrt_files(folder: Path, files: list[str]) -> list[str]:
    """An engine, and the ONNX graph TensorRT builds it from where the tensorrt backend wrote its script."""
    onnx = _suffix(".onnx")(folder, files) if "build_engine.sh" in files else []
    return [*onnx, *_suffix(".engine", ".plan")(folder, files)]


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("ONNX Runtime", "onnxruntime", _suffix(".onnx", ".ort"), _ort),
    Runtime("ONNX Runtime GenAI", "onnxruntime_genai", genai_decoder, _genai),
    Runtime("Optimum ORTModelForCausalLM", "optimum.onnxruntime", _optimum_files, _optimum),
    Runtime("ExecuTorch LLM runner", "executorch.extension.llm.runner", _suffix(".pte"), _executorch),
    Runtime("llama.cpp", "llama_cpp", _suffix(".gguf"), _llama_cpp),
    Runtime("TVM", "tvm", _suffix(".so"), _tvm),
    Runtime("TensorRT", "tensorrt", _tensorrt_files, _tensorrt),
)
RUNTIME_NAMES = tuple(r.name for r in RUNTIMES)


def _import(module: str) -> Any:
    import importlib

    return importlib.import_module(module)


def check(runtime: Runtime, folder: Path, file: str) -> dict[str, Any]:
    """One row: whether ``runtime`` loads ``folder/file``."""
    row: dict[str, Any] = {"file": file, "runtime": runtime.name}
    try:
        module = _import(runtime.module)
    except Exception as exc:  # noqa: BLE001 - not installed, or installed and broken: either way not checked
        return {**row, "status": NOT_CHECKED, "detail": f"{runtime.module} does not import ({type(exc).__name__})"}
    try:
        runtime.load(module, folder, folder / file)
    except NotHere as exc:
        return {**row, "status": NOT_CHECKED, "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any refusal is the runtime's answer, reported as it said it
        return {**row, "status": FAILS, "detail": first_line(exc)}
    return {**row, "status": LOADS, "detail": ""}


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, with its type when the message is empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def runtime_loads(folder: Path, files: list[str] | None = None) -> list[dict[str, Any]]:
    """Every (file, runtime) pair of the folder whose runtime is meant to load that file, checked: a list of
    ``{"file", "runtime", "status", "detail"}`` with status "loads", "fails" or "not checked here"."""
    folder = Path(folder)
    if files is None:
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [check(r, folder, f) for r in RUNTIMES for f in r.files(folder, files)]


def loads_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """The rows as a table: its files (in order), the runtimes that have a row, and the cell of each pair."""
    files = list(dict.fromkeys(r["file"] for r in rows))
    runtimes = [n for n in RUNTIME_NAMES if any(r["runtime"] == n for r in rows)]
    return files, runtimes, {(r["file"], r["runtime"]): r for r in rows}


def cell_text(row: dict[str, Any] | None) -> str:
    """A table cell: the status, with the reason after a colon for "fails" and "not checked here"."""
    if row is None:
        return "-"
    return row["status"] + (f": {row['detail']}" if row.get("detail") else "")


__all__ = ["FAILS", "LOADS", "NOT_CHECKED", "RUNTIMES", "RUNTIME_NAMES", "Runtime", "cell_text", "check",
           "loads_table", "runtime_loads"]
