"""A fixed CPU loop schedule for TVM's legalized PrimFuncs, and the compile call that applies it.

MetaSchedule (TVM's tuner) segfaults in the 0.27 wheel and would need the board to measure on, so the
libraries get a hand-written schedule instead: the Linear matmul split into vector-lane column blocks
across threads with a small register tile, every other loop nest's outer loops run in parallel. (The
decoder's linears, attention and gated SiLU are the hand-written PrimFuncs of ``kernels.py`` and
``attention.py``, marked ``slm.kernel``: this schedule leaves them as they are and covers what is left,
norms, rotary, cache concatenation.)
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _iter_kinds(sch: Any, block: Any, loops: list[Any]) -> str | None:
    """"S"/"R" per loop when each loop binds exactly one block axis in order (TOPI's legalized form), else None."""
    realize = sch.get_sref(block).stmt
    kinds = {0: "S", 2: "R"}
    if len(realize.iter_vars) != len(loops):
        return None
    out = ""
    for iv, loop in zip(realize.iter_vars, loops, strict=True):
        if int(iv.iter_type) not in kinds or sch.get(loop).extent is None:
            return None
        out += kinds[int(iv.iter_type)]
    return out


def _schedule_matmul(sch: Any, block: Any, lanes: int) -> bool:
    """``C[i, j] += A[i, k] * B[k, j]`` (the legalized Linear, weight [in, out]): columns in blocks of
    ``lanes`` vector lanes across threads, four rows share each loaded weight vector, accumulators stay
    in a local tile; LLVM does not vectorize the default i-j-k loop nest (a float reduction) at all."""
    import tvm

    loops = sch.get_loops(block)
    if _iter_kinds(sch, block, loops) != "SSR":
        return False
    i, j, k = loops
    n = sch.get(j).extent
    if not isinstance(n, tvm.tirx.IntImm) or int(n) % lanes:
        return False
    jo, ji = sch.split(j, [None, lanes])
    io, ii = sch.split(i, [None, 4])
    sch.reorder(jo, io, k, ii, ji)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, io)
    sch.parallel(jo)
    sch.vectorize(ji)
    sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(local)[-1])
    return True


def _parallel_outer(sch: Any, block: Any) -> None:
    """Threads over the outer data-parallel loops of a loop nest (all but the innermost one)."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block, loops)
    if not kinds or len(loops) < 2:
        return
    lead = len(kinds) - len(kinds.lstrip("S"))  # leading spatial loops
    outer = loops[: min(lead, len(loops) - 1)]
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def schedule_cpu(func: Any, lanes: int) -> Any:
    """A fixed CPU schedule for one legalized PrimFunc, or ``func`` unchanged where it does not apply."""
    from tvm.s_tir import Schedule

    if func.attrs and "slm.kernel" in func.attrs:  # the hand-written kernels' own loops
        return func
    try:
        sch = Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # (no root block: an already scheduled or extern function)
        return func
    for block in blocks:
        try:
            name = sch.get(block).name_hint
            if not (name.startswith("matmul") and len(sch.get(block).reads) == 2 and _schedule_matmul(sch, block,
                                                                                                     lanes)):
                _parallel_outer(sch, block)
        except Exception as exc:  # keep the default loops of this block: still correct, only slower
            log.debug("tvm schedule skipped for %s: %s", func, exc)
            return func
    return sch.mod["main"]


def cpu_pipeline(target: Any, lanes: int = 16) -> Any:
    """TVM's default CPU pipeline with ``schedule_cpu`` on every PrimFunc after fusion."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cp

    @tvm.transform.module_pass(opt_level=0)
    def _schedule(mod: Any, _ctx: Any) -> Any:
        out = mod
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                out[gv] = schedule_cpu(func, lanes).with_attr("global_symbol", gv.name_hint) \
                    if func.attrs and "global_symbol" in func.attrs else schedule_cpu(func, lanes)
        return out

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(
                cp.library_dispatch_passes(target) + cp.legalize_passes(target) + [_schedule]
                + cp.dataflow_lower_passes(target) + cp.finalize_passes(target))(mod)

    return _pipeline


def compile_module(mod: Any, target: dict[str, Any], schedule: bool = True) -> Any:
    """``tvm.compile`` for ``target`` (a JSON target dict); ``schedule`` adds ``schedule_cpu`` (threads,
    vector lanes, register tiles) to the default CPU pipeline."""
    import tvm

    tgt = tvm.target.Target(target)
    if not schedule:
        return tvm.compile(mod, target=tgt)
    return tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))
