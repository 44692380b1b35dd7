"""Pad awkward matmul axes before tiling, so the CPU search can find register tiles for them.

Meta-schedule tiles a loop only by exact divisors of its extent. A matmul over 37 tokens (a
small ViT: 36 patches and the class token; ViT-B has 197) can then hold 1 row or all 37 in
registers, nothing between, and the best schedule found reads a full weight row per row of
output (one FMA per load). onnxruntime's kernel handles the ragged edge and keeps a 6x64
tile. Padding the axis to a multiple of 8 (zeros in, the extra rows never written out)
costs 8% more arithmetic at 37 and opens the 4- and 8-row tiles; the tuned kernel reaches
onnxruntime's speed where the unpadded one trails it by ~1.5x (37x144 @ 144x576, 32 trials).

Only axes that index activations are padded: padding a weight axis would copy the weights on
every call. The padding is a schedule instruction (``pad_einsum``) in the tuning record's
trace, so the compiler replays it exactly where the record applies and nowhere else.
"""
from __future__ import annotations

import tvm
from tvm.ir.expr import TensorLoad
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError
from tvm.s_tir.meta_schedule.schedule_rule import PyScheduleRule, ScheduleRule

#: Axes are padded up to a multiple of this (two AVX-512 rows of 4, or one of 8).
PAD_MULTIPLE = 8
#: An axis is awkward when no tile factor in this range divides it.
TILE_FACTORS = range(4, 17)


def awkward(extent: int) -> bool:
    """True when every register tile of this axis is 1 or the whole axis (e.g. 37, 74, 197)."""
    return extent > TILE_FACTORS.stop - 1 and not any(extent % f == 0 for f in TILE_FACTORS)


def _contraction(block: tvm.tirx.SBlock) -> bool:
    """``C[..] = C[..] + A[..] * B[..]`` with A and B distinct tensors: a matmul or an attention
    product. A norm's reductions (``sum(x * x)``, ``sum((x - mean)²)``) are not: padded, they
    were tuned to a kernel 40x slower (a ViT's layer norm, 4 trials)."""
    store = block.body
    if not isinstance(store, tvm.tirx.BufferStore) or not isinstance(store.value, tvm.tirx.Add):
        return False
    total = store.value
    for accumulator, product in ((total.a, total.b), (total.b, total.a)):
        if (isinstance(accumulator, TensorLoad) and isinstance(product, tvm.tirx.Mul)
                and isinstance(product.a, TensorLoad) and isinstance(product.b, TensorLoad)
                and not product.a.source.same_as(product.b.source)):
            return True
    return False


def einsum_padding(block: tvm.tirx.SBlock, layout_free: set[tvm.tirx.Var]) -> list[int] | None:
    """The padded extent of each iteration axis of ``block``, or None when nothing is to pad.

    Only contractions qualify (:func:`_contraction`); a spatial axis is padded when it is
    awkward and indexes no weight (layout-free) buffer.
    """
    weight_vars: set[tvm.tirx.Var] = set()
    for region in block.reads:
        if region.source in layout_free:
            for r in region.region:
                weight_vars.update(tvm.tirx.analysis.undefined_vars(r.min))
    if not _contraction(block):
        return None
    padding, changed = [], False
    for iv in block.iter_vars:
        extent = iv.dom.extent
        if not isinstance(extent, tvm.tirx.IntImm):
            return None
        n = int(extent)
        if iv.iter_type == tvm.tirx.IterVar.DataPar and iv.var not in weight_vars and awkward(n):
            n, changed = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE, True
        padding.append(n)
    return padding if changed else None


def block_padding(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> list[int] | None:
    """What :class:`PadAwkwardEinsum` pads ``block`` of ``sch``'s function to (None: nothing)."""
    func = sch.mod["main"]
    layout_free = {func.params[int(i)] for i in (func.attrs or {}).get("layout_free_buffers", [])}
    return einsum_padding(sch.get(block), layout_free)


@derived_object
class PadAwkwardEinsum(PyScheduleRule):
    """Schedule rule: ``pad_einsum`` awkward activation axes of matmul-like blocks, then leave
    the block to the usual rules (tiling, vectorising); other blocks pass through untouched."""

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> list[Schedule]:
        padding = block_padding(sch, block)
        if padding is None:
            return [sch]
        padded = sch.copy()
        try:
            padded.pad_einsum(block, padding)
        except ScheduleError:  # not an einsum (e.g. a convolution's shifted reads): no padding
            return [sch]
        # the copy of the padded result into the real one: its consumers read the padded buffer
        # directly (where the result is the function's output, the copy stays)
        for consumer in padded.get_consumers(block):
            try:
                padded.compute_inline(consumer)
            except ScheduleError:
                pass
        return [padded]

    def clone(self) -> ScheduleRule:
        return PadAwkwardEinsum()


def cpu_schedule_rules() -> list[ScheduleRule]:
    """meta-schedule's LLVM rules with awkward-axis padding first."""
    return [PadAwkwardEinsum(), *ScheduleRule.create("llvm")]
