"""ExecuTorch with the XNNPACK delegate: the ``.pte`` program an Android (or any arm64) app loads.

The decoder is rebuilt in PyTorch from the same spec and weights the ONNX exporter used
(``executorch/torch_decoder.py``: a static in-place KV cache, ExecuTorch's LLM attention kernels),
exported with one dynamic sequence dimension so a single ``forward(tokens, input_pos)`` method serves
prefill and decode, lowered with the XNNPACK partitioner and written as ``model.pte``.

Quantized weights go in as the compress stage made them (int4 or int8 codes and per-group scales)
with int8 activations quantized per token at run time: XNNPACK's fast form on ARM (8da4w / 8da8w).
``pte_delegation.json`` lists every operator of the lowered program, delegated to XNNPACK or not,
with the reason for those that are not.
The program also carries the constant metadata methods that ExecuTorch's LLM runner reads, and the
tokenizer's files go beside it (``executorch/runner_ready.py``), so the runner in ExecuTorch's apps loads
the folder as it is.

Validation runs the ``.pte`` through ExecuTorch's own runtime (its Python bindings) on the host.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.backends.executorch.runner_ready import place_tokenizer, runner_metadata, vocab_note
from slm_export.errors import CompileError

INSTALL = ("pip install --no-deps executorch==1.5.1 torchao==0.18.0, then its runtime needs: flatbuffers "
           "pandas pyyaml ruamel.yaml tabulate (scripts/setup.sh does this)")
PTE_FILE = "model.pte"
CACHES = ["k_cache", "v_cache"]

# Why an operator left outside the XNNPACK partitions is there (by edge op name fragment).
_NOT_DELEGATED = {
    "llama_update_cache": "ExecuTorch's LLM kernel: writes the new keys/values into the cache in place",
    "auto_functionalized": "the in-place cache write (llama::update_cache) as the exported graph records it",
    "llama_custom_sdpa": "ExecuTorch's LLM attention kernel (optimized CPU op: causal from input_pos, "
                         "grouped-query heads without copies)",
    "embedding": "XNNPACK has no gather/embedding operator: the table lookup runs on the CPU kernels",
    "mean_dim": "XNNPACK's mean takes only the two innermost dims of a 4-D tensor; the norm's mean over the "
                "hidden dim of a 3-D tensor stays on the CPU kernels",
    "_local_scalar_dense": "reads input_pos (a scalar) for the cache position",
    "sym_size": "shape arithmetic of the dynamic sequence length",
    "_assert": "shape guard on the sequence length and position",
    "view_copy": "reshape between XNNPACK partitions (memory only)",
    "unsqueeze_copy": "reshape between XNNPACK partitions (memory only)",
    "alias_copy": "aliases of the cache buffers (memory only)",
    "select_copy": "picks input_pos out of its tensor",
    "slice_copy": "slices the rotary tables at input_pos (data-dependent offset) or splits a projection",
    "split_with_sizes": "splits the fused q/k/v and gate/up projections (memory only)",
    "getitem": "picks one output of a split or of a delegate call (no computation)",
    # the masked attention of windowed or soft-capped layers (torch_decoder.masked_attention)
    "arange": "cache and query positions for the sliding-window or causal mask (masked attention)",
    "bitwise_or": "joins the causal and sliding-window conditions of the mask (masked attention)",
    "ge_scalar": "compares cache positions with the query's for the mask (masked attention)",
    "lt_scalar": "compares cache positions with the query's for the mask (masked attention)",
    "to_dim_order_copy": "turns the boolean mask into the additive float mask (masked attention)",
    "expand_copy": "broadcasts each kv head's cache to its query heads in the masked attention (memory only)",
}


# Operators off XNNPACK that compute something (the rest move memory or check shapes).
_COMPUTE = ("llama_", "embedding", "mean_dim")


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("executorch")
    except Exception:
        return None


def _why(op: str) -> str:
    for key, why in _NOT_DELEGATED.items():
        if key in op:
            return why
    if op in ("add", "ge", "le", "sub", "mul"):
        return "integer arithmetic and checks on input_pos and the sequence length"
    return "not an operator or shape the XNNPACK partitioner takes here: runs on ExecuTorch's CPU kernels"


def unsupported(spec: Any, max_len: int) -> str | None:
    """What of a ``DecoderSpec`` the PyTorch rebuild behind this backend cannot build for ``max_len`` positions,
    in words; None when it builds all of it (``preflight.check_rebuilds`` asks before any work)."""
    from slm_export.backends.executorch.torch_decoder import unsupported as why

    return why(spec, max_len)


class ExecuTorchBackend:
    name = "executorch"

    def check(self) -> Availability:
        version = _version()
        if version is None:
            return Availability(self.name, False, None, "the executorch package is not installed", INSTALL)
        try:
            import torchao  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        except Exception as exc:  # a broken install: say what failed
            return Availability(self.name, False, version, f"executorch does not import: {exc}", INSTALL)
        return Availability(self.name, True, version, "lowers decoders to XNNPACK (.pte) and runs them with "
                            "ExecuTorch's runtime on this machine")

    def compile(self, job: CompileJob) -> CompileResult:
        plan = job.plan
        if job.model is None or job.model_kind != "decoder":
            return CompileResult(self.name, "not run", "the ExecuTorch step builds decoder LMs in this version; "
                                 "the encoder ships as the ONNX Runtime artifact")
        if plan.precision not in ("fp32", "int8", "int4"):
            return CompileResult(self.name, "not run", f"the .pte is built from fp32, int8 or int4 weights; "
                                 f"{plan.precision} ships as the ONNX Runtime artifact")
        avail = self.check()
        if not avail.usable:
            raise CompileError(f"{job.profile.id} lists executorch as its backend, but {avail.reason}; "
                               f"install: {avail.install}")
        from slm_export.models.adapters import spec_for

        model = job.model
        spec = spec_for(model.config, job.weights if job.weights is not None else model.weights)
        if any(getattr(w, "act_scale", None) is not None for layer in spec.layers for w in (*layer.qkv, layer.o)):
            note_act = ("static int8 activation scales from calibration are not used: XNNPACK quantizes "
                        "activations per token at run time")
        else:
            note_act = ""
        t0 = time.perf_counter()
        metadata = runner_metadata(model, spec, plan.max_seq_len)
        program, partitions, table = lower(spec, plan.max_seq_len, metadata)
        out = job.model_path.parent / PTE_FILE
        tmp = out.with_suffix(".pte.partial")
        with open(tmp, "wb") as f:
            program.write_to_file(f)
        tmp.rename(out)
        tokenizer = place_tokenizer(out.parent)
        seconds = time.perf_counter() - t0
        delegated = sum(r["count"] for r in table if r["delegated"])
        kept = [r for r in table if not r["delegated"]]
        (out.parent / "pte_delegation.json").write_text(json.dumps({"xnnpack_partitions": partitions,
                                                                     "operators": table}, indent=1) + "\n")
        quant = {"int4": "int8 dynamic activations x int4 weights (8da4w)",
                 "int8": "int8 dynamic activations x int8 weights (8da8w)", "fp32": "float32"}[plan.precision]
        compute = [r["op"] for r in kept if any(k in r["op"] for k in _COMPUTE)]
        note = (f"ExecuTorch {avail.version} program, XNNPACK delegate, {quant}; {delegated} operators delegated "
                f"in {partitions} XNNPACK partitions; on ExecuTorch's CPU kernels: {', '.join(compute) or 'none'} "
                f"(plus {sum(r['count'] for r in kept if r['op'] not in compute)} reshapes, splits and shape "
                f"guards; pte_delegation.json says why for each); static KV cache of {plan.max_seq_len} positions")
        note += "; " + _runner_note(metadata, tokenizer, vocab_note(model, metadata))
        if note_act:
            note += f"; {note_act}"
        return CompileResult(self.name, "done", note, (PTE_FILE, "pte_delegation.json", *tokenizer),
                             runtime_model=PTE_FILE,
                             details={"pte_bytes": out.stat().st_size, "lower_s": round(seconds, 1),
                                      "delegated_ops": delegated, "xnnpack_partitions": partitions,
                                      "max_len": plan.max_seq_len, "metadata_methods": metadata,
                                      "not_delegated": {r["op"]: r["count"] for r in kept}})


def _runner_note(metadata: dict[str, Any], tokenizer: tuple[str, ...], warning: str) -> str:
    eos = metadata.get("get_eos_ids") or "the tokenizer's"
    where = f"{tokenizer[0]} beside it" if tokenizer else "no tokenizer.json to put beside it (the model has none)"
    note = f"{len(metadata)} metadata methods for ExecuTorch's LLM runner (end ids {eos}), {where}"
    return f"{note}; {warning}" if warning else note


def lower(spec: Any, max_len: int, metadata: dict[str, Any] | None = None) -> tuple[Any, int, list[dict[str, Any]]]:
    """Export, lower to XNNPACK and emit; returns the ExecuTorch program and the per-operator table.
    ``metadata`` becomes the program's constant methods (name -> int, bool or list of ints)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    from slm_export.backends.executorch.torch_decoder import build_torch_decoder

    module = build_torch_decoder(spec, max_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    dynamic = {"tokens": {1: Dim("seq", min=1, max=max_len)}, "input_pos": None}
    # torch and ExecuTorch warn about their own internals while tracing (about a hundred FutureWarnings from
    # ExecuTorch's custom ops on smollm2-135m), and about the KV cache buffers that the program mutates,
    # which InitializedMutableBufferPass below stores: none of it is the user's to act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Mutation on a buffer")
        ep = export(module, example, dynamic_shapes=dynamic, strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata or None)
        partitions, table = _delegation(edge.exported_program().graph_module)
        program = edge.to_executorch(ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass(CACHES)],  # store the zero caches, not "uninitialized"
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        ))
    return program, partitions, table


def _delegation(graph_module: Any) -> tuple[int, list[dict[str, Any]]]:
    """Operators of the lowered program: inside XNNPACK partitions (counted from each delegate's
    original graph) or left on ExecuTorch's CPU kernels, with why."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    rows: list[dict[str, Any]] = []
    for op, counts in sorted(info.delegation_by_operator.items()):
        if counts.delegated:
            rows.append({"op": op, "delegated": True, "count": counts.delegated})
        if counts.non_delegated:
            rows.append({"op": op, "delegated": False, "count": counts.non_delegated, "why": _why(op)})
    return info.num_delegated_subgraphs, rows

