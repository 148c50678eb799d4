"""Hand-written TIR kernels for the TVM decoder: the linear (this module), the attention and the gated SiLU
(``attention.py``); ``ops.py`` puts them into the graph.

Every Linear of the decoder (float or quantized, the tied LM head included) is one PrimFunc that reads
the weight as it is stored, ``[out, in]`` (float32, or uint8 codes with float32 scales and uint8 zero
points per group), and never materialises a transposed or dequantized copy of the whole matrix:

- prefill: output rows go in panels (up to 16, at most ``PANEL_BYTES`` as float32) across threads; a
  quantized panel is dequantized once into a stack buffer (``(code - zero) * scale``,
  ``QuantizedTensor.dequantize``'s arithmetic) that all input rows then read, six at a time, in a
  register tile of 6 x 2 dot products (8-lane vector accumulators, summed across lanes at the end);
- the rows left over (a decode step's single row) run in a parallel loop of their own, four output rows
  at a time, straight from the weight: int4 codes go into the dot products as they are and the zero
  point comes out of the group sums (``scale * (sum x code - zero * sum x)``), no dequantized copy;
- int4 codes are packed two to a byte in blocks of 16 input columns (``ops.pack_int4``): byte ``8b + p`` of
  a row holds column ``16b + p`` in its low nibble and ``16b + 8 + p`` in its high one, so one 8-byte load
  gives two 8-lane vectors with a mask and a shift, no shuffles (NEON and AVX2 alike).

The kernel's loop nests are TVMScript macros (one function each: the panel's dequantization, the register
tiles, the leftover rows), expanded where ``linear_kernel``'s PrimFunc calls them. The kernels carry
``op_pattern`` opaque (FuseOps leaves them alone) and ``slm.kernel`` (``schedule`` does not reschedule
them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROW_TILE, COL_TILE, TAIL_TILE = 6, 2, 4  # input rows x output rows of the register tile; output rows of the tail
PANEL_BYTES = 20 * 1024  # a panel of weight rows at most this big (in float32): it stays in L1 with the rows


def divisor(n: int, options: tuple[int, ...]) -> int:
    """The first of ``options`` that divides ``n``."""
    return next(o for o in options if n % o == 0)


@dataclass(frozen=True)
class _LinearPlan:
    """The fixed choices of one ``linear_kernel``: its tiles, which loops it has, how the weight is stored.
    Its ``zval``/``qval`` build the dequantization arithmetic while a kernel is parsed."""

    n: int
    k: int
    group: int
    packed: bool  # int4 codes, two a byte (pack_int4)
    is_q: bool  # quantized: codes, scales and zero points
    bias: bool
    lanes: int
    panel: int
    # rows left over (a decode step's one row) read the weight itself in their own parallel loop: float, or
    # int4 codes with the zero point taken out of the group sums; other codes read the dequantized panel
    direct: bool
    vpanel: int
    per_group: bool  # zero points per group (else the constant dz)
    dz: float

    @classmethod
    def of(cls, n: int, k: int, quant: str | None, group: int, zero: float | None, bias: bool) -> _LinearPlan:
        packed, is_q = quant == "int4", quant is not None
        lanes = 8 if packed else divisor(k, (8, 4, 2, 1))
        panel = divisor(n, tuple(p for p in (16, 8, 4, 2, 1) if p * k * 4 <= PANEL_BYTES or p == 1))
        direct = not is_q or (packed and group % 16 == 0)
        vpanel = divisor(n, (16, 8, 4, 2, 1)) if direct else panel
        return cls(n, k, group, packed, is_q, bias, lanes, panel, direct, vpanel, zero is None,
                   float(zero) if zero is not None else 0.0)

    @property
    def kv(self) -> int:
        return self.k // self.lanes

    @property
    def tiles(self) -> tuple[int, int, int]:
        """Output rows of the register tile and of the tail loops, input rows of the register tile."""
        return min(COL_TILE, self.panel), min(TAIL_TILE, self.vpanel), ROW_TILE

    @property
    def ngroups(self) -> int:
        return self.k // self.group if self.is_q else 1

    @property
    def g_lane(self) -> bool:
        return self.is_q and self.group % self.lanes == 0  # each lane vector within one group

    def zval(self, zeros: Any, j: Any, g: Any) -> Any:
        from tvm.script import tirx as T

        return T.Cast("float32", zeros[j, g]) if self.per_group else T.float32(self.dz)

    def qval(self, scales: Any, zeros: Any, j: Any, c: Any, col: Any, col0: Any) -> Any:
        """(code - zero) * scale of ``w[j, col]`` (code ``c``; ``col0`` the first column of its lane vector)."""
        from tvm.script import tirx as T

        g = col0 // self.group if self.g_lane else col // self.group
        return (T.Cast("float32", c) - self.zval(zeros, j, g)) * scales[j, g]


def _nibble(w: Any, j: Any, byte: Any, h: Any) -> Any:
    from tvm.script import tirx as T

    return (w[j, byte] >> T.uint8(4 * h)) & T.uint8(15)


def linear_kernel(n: int, k: int, quant: str | None = None, group: int = 0, zero: float | None = None,
                  bias: bool = False) -> Any:
    """``out[m, j] = sum_i x[m, i] * w[j, i] (+ bias[j])`` for a dynamic ``m``, ``w`` ``[n, k]``.

    ``quant``: None (``w`` float32 ``[n, k]``), ``"int4"`` (``ops.pack_int4`` codes ``[n, k / 2]``) or
    ``"byte"`` (one code per byte ``[n, k]``); with ``scales`` ``[n, k / group]`` and either ``zeros``
    (uint8, same shape) or the constant ``zero``. Parameters in order: x, weight or codes, scales,
    zeros, bias, out; the scales, zeros and bias of a variant without them are not read."""
    from tvm.script import tirx as T

    plan = _LinearPlan.of(n, k, quant, group, zero, bias)
    is_q, per_group, ngroups, direct, panel = plan.is_q, plan.per_group, plan.ngroups, plan.direct, plan.panel
    mi = ROW_TILE
    wshape = (n, k // 2) if plan.packed else (n, k)
    wdtype = "uint8" if is_q else "float32"
    gemm_from = mi if direct else 0  # (the panel loop runs for m >= this)
    dequantize, gemm, panel_tail, direct_tail = (_dequantize(plan), _gemm(plan), _panel_tail(plan),
                                                 _direct_tail(plan))

    @T.prim_func(private=True)
    def kernel(a: T.handle, wh: T.handle, sh: T.handle, zh: T.handle, bh: T.handle, o: T.handle) -> None:
        # (the inputs a variant does not read stay untyped handles: the caller passes any tensor there)
        T.func_attr({"tirx.noalias": True})
        bsz, seq = T.int64(), T.int64()
        x3 = T.match_buffer(a, (bsz, seq, k), "float32")
        out3 = T.match_buffer(o, (bsz, seq, n), "float32")
        w = T.match_buffer(wh, wshape, wdtype)
        if is_q:  # noqa: SIM108 (a TVMScript statement, evaluated while parsing)
            scales = T.match_buffer(sh, (n, ngroups), "float32")
        else:
            scales = T.meta_var(None)
        if is_q and per_group:  # noqa: SIM108
            zeros = T.match_buffer(zh, (n, ngroups), "uint8")
        else:
            zeros = T.meta_var(None)
        if bias:  # noqa: SIM108
            b = T.match_buffer(bh, (n,), "float32")
        else:
            b = T.meta_var(None)
        m = T.meta_var(bsz * seq)
        x = T.decl_buffer((m, k), "float32", data=x3.data)  # (rows flattened: batch and sequence alike)
        out = T.decl_buffer((m, n), "float32", data=out3.data)
        if m >= gemm_from:
            for jp in T.parallel(n // panel):
                wp = T.alloc_buffer((panel, k), "float32", scope="local")
                dequantize(w, scales, zeros, wp, jp)
                gemm(x, w, wp, b, out, m, jp)
                if not direct:  # the rows left over, from the dequantized panel
                    panel_tail(x, wp, b, out, m, jp)
        if direct and m % mi > 0:
            direct_tail(x, w, scales, zeros, b, out, m)

    return kernel.with_attr("op_pattern", 8).with_attr("slm.kernel", True)


def _dequantize(plan: _LinearPlan) -> Any:
    """A quantized panel's weight rows as float32 into ``wp`` (float weights are read where they are)."""
    from tvm.script import tirx as T

    packed, is_q, panel, k, kv, lanes, qval = plan.packed, plan.is_q, plan.panel, plan.k, plan.kv, plan.lanes, plan.qval
    nibble = _nibble

    @T.macro
    def dequantize(w: Any, scales: Any, zeros: Any, wp: Any, jp: Any) -> None:
        if packed:
            for r, kb in T.grid(panel, k // 16):
                for h in T.unroll(2):
                    for lane in T.vectorized(8):
                        wp[r, kb * 16 + h * 8 + lane] = qval(
                            scales, zeros, jp * panel + r, nibble(w, jp * panel + r, kb * 8 + lane, h),
                            kb * 16 + h * 8 + lane, kb * 16 + h * 8)
        elif is_q:
            for r, kb in T.grid(panel, kv):
                for lane in T.vectorized(lanes):
                    wp[r, kb * lanes + lane] = qval(scales, zeros, jp * panel + r,
                                                    w[jp * panel + r, kb * lanes + lane], kb * lanes + lane,
                                                    kb * lanes)

    return dequantize


def _gemm(plan: _LinearPlan) -> Any:
    """Every full tile of input rows against the panel, in register tiles of input x output rows."""
    from tvm.script import tirx as T

    panel, lanes, (ji, _, mi) = plan.panel, plan.lanes, plan.tiles
    accumulate, store = _tile_accumulate(plan), _tile_store(plan)

    @T.macro
    def gemm(x: Any, w: Any, wp: Any, b: Any, out: Any, m: Any, jp: Any) -> None:
        for mo in range(m // mi):
            for jo in range(panel // ji):
                acc = T.alloc_buffer((mi, ji, lanes), "float32", scope="local")
                accumulate(x, w, wp, acc, mo, jo, jp)
                store(b, out, acc, mo, jo, jp)

    return gemm


def _tile_accumulate(plan: _LinearPlan) -> Any:
    """One register tile's dot products in vector lanes: from the dequantized panel, or the float weight."""
    from tvm.script import tirx as T

    is_q, panel, kv, lanes, (ji, _, mi) = plan.is_q, plan.panel, plan.kv, plan.lanes, plan.tiles

    @T.macro
    def accumulate(x: Any, w: Any, wp: Any, acc: Any, mo: Any, jo: Any, jp: Any) -> None:
        for r, c in T.grid(mi, ji):
            for lane in T.vectorized(lanes):
                acc[r, c, lane] = T.float32(0)
        for kb in range(kv):
            for r in T.unroll(mi):
                for c in T.unroll(ji):
                    for lane in T.vectorized(lanes):
                        if is_q:
                            acc[r, c, lane] = acc[r, c, lane] + x[
                                mo * mi + r, kb * lanes + lane] * wp[jo * ji + c, kb * lanes + lane]
                        else:
                            acc[r, c, lane] = acc[r, c, lane] + x[mo * mi + r, kb * lanes + lane] * w[
                                jp * panel + jo * ji + c, kb * lanes + lane]

    return accumulate


def _tile_store(plan: _LinearPlan) -> Any:
    """One register tile's outputs: the bias, plus the lanes' sums."""
    from tvm.script import tirx as T

    bias, panel, lanes, (ji, _, mi) = plan.bias, plan.panel, plan.lanes, plan.tiles

    @T.macro
    def store(b: Any, out: Any, acc: Any, mo: Any, jo: Any, jp: Any) -> None:
        for r in T.unroll(mi):
            for c in T.unroll(ji):
                out[mo * mi + r, jp * panel + jo * ji + c] = T.float32(0)
                if bias:
                    out[mo * mi + r, jp * panel + jo * ji + c] = b[jp * panel + jo * ji + c]
                for lane in range(lanes):
                    out[mo * mi + r, jp * panel + jo * ji + c] = out[
                        mo * mi + r, jp * panel + jo * ji + c] + acc[r, c, lane]

    return store


def _row_store(plan: _LinearPlan) -> Any:
    """One leftover row's outputs ``col0 ...`` (as many as ``acc`` holds): the bias, plus the lanes' sums."""
    from tvm.script import tirx as T

    bias, lanes, (_, jt, _) = plan.bias, plan.lanes, plan.tiles

    @T.macro
    def store_row(b: Any, out: Any, acc: Any, i: Any, col0: Any) -> None:
        for c in T.unroll(jt):
            out[i, col0 + c] = T.float32(0)
            if bias:
                out[i, col0 + c] = b[col0 + c]
            for lane in range(lanes):
                out[i, col0 + c] = out[i, col0 + c] + acc[c, lane]

    return store_row


def _panel_tail(plan: _LinearPlan) -> Any:
    """The rows left over after the full tiles, from the dequantized panel (codes other than int4)."""
    from tvm.script import tirx as T

    panel, kv, lanes, (_, jt, mi) = plan.panel, plan.kv, plan.lanes, plan.tiles
    store_row = _row_store(plan)

    @T.macro
    def panel_tail(x: Any, wp: Any, b: Any, out: Any, m: Any, jp: Any) -> None:
        for i in range(m // mi * mi, m):
            for jo in range(panel // jt):
                acc1 = T.alloc_buffer((jt, lanes), "float32", scope="local")
                for c in T.unroll(jt):
                    for lane in T.vectorized(lanes):
                        acc1[c, lane] = T.float32(0)
                for kb in range(kv):
                    for c in T.unroll(jt):
                        for lane in T.vectorized(lanes):
                            acc1[c, lane] = acc1[c, lane] + x[i, kb * lanes + lane] * wp[
                                jo * jt + c, kb * lanes + lane]
                store_row(b, out, acc1, i, jp * panel + jo * jt)

    return panel_tail


def _direct_tail(plan: _LinearPlan) -> Any:
    """The rows left over (a decode step's single row), straight from the weight in a parallel loop of
    their own: float, or int4 codes with the zero point taken out of the group sums."""
    from tvm.script import tirx as T

    is_q, n, ngroups, vpanel, lanes, (_, jt, mi) = plan.is_q, plan.n, plan.ngroups, plan.vpanel, plan.lanes, plan.tiles
    group_sums, qdot, fdot, store_row = _group_sums(plan), _qdot(plan), _fdot(plan), _row_store(plan)

    @T.macro
    def direct_tail(x: Any, w: Any, scales: Any, zeros: Any, b: Any, out: Any, m: Any) -> None:
        for jp in T.parallel(n // vpanel):
            for i in range(m // mi * mi, m):
                xs = T.alloc_buffer((ngroups, 8), "float32", scope="local")
                part = T.alloc_buffer((jt, lanes), "float32", scope="local")
                acc2 = T.alloc_buffer((jt, lanes), "float32", scope="local")
                if is_q:  # sum_c x (code - zero) scale = scale (sum_c x code - zero sum_c x), per group
                    group_sums(x, xs, i)
                for jo in range(vpanel // jt):
                    for c in T.unroll(jt):
                        for lane in T.vectorized(lanes):
                            acc2[c, lane] = T.float32(0)
                    if is_q:
                        qdot(x, w, scales, zeros, xs, part, acc2, i, jp, jo)
                    else:
                        fdot(x, w, acc2, i, jp, jo)
                    store_row(b, out, acc2, i, jp * vpanel + jo * jt)

    return direct_tail


def _group_sums(plan: _LinearPlan) -> Any:
    """``xs[g]``: the sums of row ``i``'s inputs over each group, in 8 lanes."""
    from tvm.script import tirx as T

    ngroups, group = plan.ngroups, plan.group

    @T.macro
    def group_sums(x: Any, xs: Any, i: Any) -> None:
        for g in range(ngroups):
            for lane in T.vectorized(8):
                xs[g, lane] = T.float32(0)
            for kb in range(group // 8):
                for lane in T.vectorized(8):
                    xs[g, lane] = xs[g, lane] + x[i, g * group + kb * 8 + lane]

    return group_sums


def _qdot(plan: _LinearPlan) -> Any:
    """Row ``i`` against ``jt`` output rows of int4 codes, group by group: ``scale * (sum x code - zero *
    sum x)``."""
    from tvm.script import tirx as T

    ngroups, group, vpanel, zval, (_, jt, _) = plan.ngroups, plan.group, plan.vpanel, plan.zval, plan.tiles
    nibble = _nibble

    @T.macro
    def qdot(x: Any, w: Any, scales: Any, zeros: Any, xs: Any, part: Any, acc2: Any, i: Any, jp: Any,
             jo: Any) -> None:
        for g in range(ngroups):
            for c in T.unroll(jt):
                for lane in T.vectorized(8):
                    part[c, lane] = T.float32(0)
            for kb in range(group // 16):
                for c in T.unroll(jt):
                    for h in T.unroll(2):
                        for lane in T.vectorized(8):
                            part[c, lane] = part[c, lane] + x[
                                i, g * group + kb * 16 + h * 8 + lane] * T.Cast("float32", nibble(
                                    w, jp * vpanel + jo * jt + c, g * (group // 2) + kb * 8 + lane,
                                    h))
            for c in T.unroll(jt):
                for lane in T.vectorized(8):
                    acc2[c, lane] = acc2[c, lane] + scales[jp * vpanel + jo * jt + c, g] * (
                        part[c, lane] - zval(zeros, jp * vpanel + jo * jt + c, g) * xs[g, lane])

    return qdot


def _fdot(plan: _LinearPlan) -> Any:
    """Row ``i`` against ``jt`` output rows of the float weight."""
    from tvm.script import tirx as T

    kv, vpanel, lanes, (_, jt, _) = plan.kv, plan.vpanel, plan.lanes, plan.tiles

    @T.macro
    def fdot(x: Any, w: Any, acc2: Any, i: Any, jp: Any, jo: Any) -> None:
        for kb in range(kv):
            for c in T.unroll(jt):
                for lane in T.vectorized(lanes):
                    acc2[c, lane] = acc2[c, lane] + x[i, kb * lanes + lane] * w[
                        jp * vpanel + jo * jt + c, kb * lanes + lane]

    return fdot
