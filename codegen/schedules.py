"""Default schedules for operators that have no tuning record.

TVM 0.27 schedules nothing on CPU by default (naive single-threaded loops, 30-150x slower
than tuned code) and its CPU dlight rules do not cover convolutions or matmuls: the
``Reduction`` rule even claims fused convolutions and serialises them (2x slower than
naive, measured). So on CPU every unscheduled function gets one sample of meta-schedule's
own design space (multi-level tiling, parallel outer loops, vectorised inner loops) with a
fixed seed: no measurement, deterministic, 3-100x faster than naive but still 2-5x slower
than tuned code. On GPUs dlight's rules are the right default, as in TVM's own pipeline.
"""
from __future__ import annotations

import logging

import tvm
from tvm.s_tir import Schedule, dlight as dl
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .intrinsics import register_intrinsics

# meta-schedule logs an INFO line per schedule rule that does not apply; not news here. A logger
# of our own at WARNING, made without the logging registry (so importing this module sets no
# level anywhere), that still hands its warnings up to graphprune.codegen's handlers.
QUIET_LOGGER = logging.Logger("graphprune.codegen.schedules", logging.WARNING)
QUIET_LOGGER.parent = logging.getLogger("graphprune.codegen")


class SampledSketch(dl.ScheduleRule):
    """A dlight rule that applies one seeded sample of meta-schedule's design space for the target."""

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed

    def apply(self, func: tvm.tirx.PrimFunc, target: Target, _tunable: bool) -> Schedule | None:
        register_intrinsics(target)
        context = ms.TuneContext(tvm.IRModule({"main": func}), target=target,
                                 space_generator="post-order-apply", rand_state=self.seed, logger=QUIET_LOGGER)
        for sketch in context.generate_design_space():
            if all(postproc.apply(sketch) for postproc in context.space_generator.postprocs):
                return sketch
        return None


def default_schedule_pass(target: Target, first: dl.ScheduleRule | None = None) -> tvm.transform.Pass:
    """Schedule every PrimFunc not yet marked ``tirx.is_scheduled`` (tuned ones are left alone);
    ``first`` (a CPU rule, such as :class:`.transfer.CarriedOver`) is tried before the sample."""
    if target.kind.name == "cuda":
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return dl.ApplyDefaultSchedule(*([first] if first is not None else []), SampledSketch())
