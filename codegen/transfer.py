"""Tuned schedules carried over to functions that differ only in their extents.

Pruning changes channel counts, not operators: the pruned form of a tuned model has the
same fused functions (a 3x3 convolution with bias and ReLU, a matmul with its add) at
new widths, and none of them has a record.  A build then gives them default schedules
(a pruned ResNet-18 ran 4.5 times slower than its tuned dense form), and meta-schedule's
search starts each of them blind.  But a tuned schedule is a trace of scheduling steps
whose only shape-bound parts are its tile sizes: replayed on a function of the same
structure with each ``SamplePerfectTile`` decision refactored to the new loop extent
(the innermost factors kept where they divide it, the rest in the outer loop), it is a
valid, usually good schedule there.  :func:`seed_tasks` does that for every task without a
measured record, from the best records of the most similar functions in the database,
measures the candidates like tuning trials and commits them; :class:`CarriedOver` gives a
build the nearest one unmeasured.  ResNet-18 pruned to half its MACs (widths multiples
of 16), with only its dense form tuned (4 minutes, 39 ms on 2 busy cores): default
schedules 175 ms, carried over 21 ms, carried over and measured (75 candidates, 30 s)
18.5 ms.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import tvm
import tvm_ffi
from tvm.s_tir import Schedule, dlight as dl
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.utils import remove_build_dir
from tvm.s_tir.schedule import Instruction, Trace
from tvm.target import Target

from .padding import block_padding
from .records import STORED_FAILURE, measured_seconds
from .schedules import QUIET_LOGGER

#: candidates measured per task: the best records of the two nearest functions
CANDIDATES = 4
#: records tried from one donor function (its best first)
PER_DONOR = 2

Signature = tuple[tuple[str, tuple[int, ...]], ...]


def signature(mod: tvm.IRModule) -> tuple[Signature, tuple[int, ...]] | None:
    """A function's structure without its extents (each block's name and iterator kinds),
    and its extents; None where the function has no root block to read."""
    try:
        sch = Schedule(mod)
        blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001  (an unanalysable function has no donors)
        return None
    structure = tuple((b.name_hint, tuple(int(v.iter_type) for v in b.iter_vars)) for b in blocks)
    extents = tuple(int(v.dom.extent) if isinstance(v.dom.extent, tvm.tirx.IntImm) else 1
                    for b in blocks for v in b.iter_vars)
    return structure, extents


def rescaled(decision: Sequence[int], extent: int) -> list[int]:
    """Tile sizes for ``extent`` like ``decision`` (the sizes of a loop of another extent):
    from the innermost out, the divisor of what is left that shares the most with the old
    size, then one no larger than the old size, then the nearest to it (log scale, the
    smaller on a tie), the outermost taking the rest.  Sharing first keeps a vector tile a
    multiple of the vector width: 176 channels where a 32-wide tile was tuned get 16, not
    the nearer 44 (a 44-lane tile of a ResNet-18 convolution ran 20 times slower than the
    16-lane one).  An inner tile never grows past the tuned one on a tie: a tuned tile is a
    register and cache block, and a larger one spills.  A 32-lane tile carried to 48
    channels as 48 lanes made ResNet-18's pruned stem 17 times slower than the dense one
    (42 ms against 2.5); as 16 lanes it runs in 2.2 ms.  Built from their dense forms'
    records alone, ResNet-18 and MobileNetV2 pruned to half their MACs ran 77.0 and 12.8 ms
    with larger tiles, 21.1 and 6.0 ms with this rule (dense: 46.5 and 12.2 ms)."""
    out, left = [1] * len(decision), extent
    for i in range(len(decision) - 1, 0, -1):
        want = max(1, int(decision[i]))
        out[i] = min((d for d in range(1, left + 1) if left % d == 0),
                     key=lambda d: (-math.gcd(d, want), d > want, abs(math.log(d / want)), d))
        left //= out[i]
    out[0] = left
    return out


def repadded(trace: ms.Trace, mod: tvm.IRModule) -> ms.Trace | None:
    """``trace`` with each ``pad_einsum`` padding what :mod:`.padding`'s rule pads in ``mod``
    (None where it pads nothing there).  The recorded padding holds the donor's extents: a
    pruned ViT matmul (37x144 @ 144x576) replayed with the dense one's [40, 576, 192] padded
    its weights back to dense size on every call and ran 2.5 times slower (0.29 -> 0.11 ms)."""
    if not any(inst.kind.name == "PadEinsum" for inst in trace.insts):
        return trace
    sch, names = Schedule(mod), {}
    insts, decisions = [], {}
    for inst in trace.insts:
        new = inst
        if inst.kind.name == "GetSBlock":
            names[inst.outputs[0]] = str(inst.attrs[0])
        elif inst.kind.name == "PadEinsum":
            padding = block_padding(sch, sch.get_sblock(names[inst.inputs[0]]))
            if padding is None:
                return None
            new = Instruction(inst.kind, inst.inputs, [padding], inst.outputs)
        insts.append(new)
        if inst in trace.decisions:
            decisions[new] = trace.decisions[inst]
    return Trace(insts, decisions)


def carried_over(mod: tvm.IRModule, trace: ms.Trace, postprocs: Sequence[ms.Postproc]) -> Schedule | None:
    """``trace`` (a record of another function) replayed on ``mod`` with its tile sizes
    :func:`rescaled` and its padding :func:`repadded`, then post-processed; None where it
    does not apply."""
    sch = Schedule(mod)

    def decide(inst: tvm.s_tir.schedule.Instruction, inputs: list, attrs: list, decision: object) -> object:
        if inst.kind.name == "SamplePerfectTile":
            extent = sch.get(inputs[0]).extent
            sizes = [int(d) for d in decision]
            if isinstance(extent, tvm.tirx.IntImm) and math.prod(sizes) != int(extent):
                return rescaled(sizes, int(extent))
        return decision

    try:
        trace = repadded(trace, mod)
        if trace is None:
            return None
        trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
        sch.enter_postproc()  # marks what a replay of the record leaves out, as the search does
        return sch if all(p.apply(sch) for p in postprocs) else None
    except Exception:  # noqa: BLE001  (TVM raises its own errors for a step that does not apply)
        return None


class Donors:
    """The measured records of a database by function structure, best first; indexed on the
    first :meth:`nearest` (a build whose functions all have records reads no record here)."""

    def __init__(self, database: ms.Database) -> None:
        self._database = database

    @functools.cached_property
    def _by_structure(self) -> dict[Signature, list[tuple[tuple[int, ...], list[ms.database.TuningRecord], int]]]:
        by_workload: dict[ms.database.Workload, list[ms.database.TuningRecord]] = {}
        for record in self._database.get_all_tuning_records():
            if measured_seconds(record) is not None:
                by_workload.setdefault(record.workload, []).append(record)
        index: dict[Signature, list[tuple[tuple[int, ...], list[ms.database.TuningRecord], int]]] = {}
        for workload, records in by_workload.items():
            sig = signature(workload.mod)
            if sig is not None:
                index.setdefault(sig[0], []).append(
                    (sig[1], sorted(records, key=measured_seconds), tvm_ffi.structural_hash(workload.mod)))
        return index

    def wider_best(self, mod: tvm.IRModule) -> float | None:
        """The best measured seconds of a function structured like ``mod`` (not ``mod`` itself)
        at least as large in every extent; None where the database has no such function."""
        sig = signature(mod)
        if sig is None:
            return None
        own = tvm_ffi.structural_hash(mod)
        times = [measured_seconds(records[0]) for extents, records, key in self._by_structure.get(sig[0], [])
                 if key != own and len(extents) == len(sig[1]) and all(a >= b for a, b in zip(extents, sig[1]))]
        return min((t for t in times if t is not None), default=None)

    def nearest(self, mod: tvm.IRModule) -> list[ms.database.TuningRecord]:
        """Records of functions structured like ``mod`` (not ``mod`` itself), the nearest
        extents first (summed log ratios), each function's best :data:`PER_DONOR`."""
        sig = signature(mod)
        if sig is None:
            return []
        own = tvm_ffi.structural_hash(mod)
        donors = [(sum(abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(sig[1], extents)), records)
                  for extents, records, key in self._by_structure.get(sig[0], []) if key != own
                  and len(extents) == len(sig[1])]
        donors.sort(key=lambda d: d[0])
        return [r for _, records in donors for r in records[:PER_DONOR]]


@dataclass
class Seeded:
    """What :func:`seed_tasks` did: tasks that got a measured record, candidates measured, time."""

    tasks: list[str]
    measured: int
    seconds: float


def seed_tasks(database: ms.Database, tasks: Sequence[ms.ExtractedTask], target: Target,
               builder: ms.builder.Builder, runner: ms.runner.Runner, postprocs: Sequence[ms.Postproc],
               limit: int = CANDIDATES) -> Seeded:
    """For each of ``tasks``: up to ``limit`` schedules :func:`carried_over` from the nearest
    donors' records, built by ``builder``, measured by ``runner`` and committed to
    ``database`` as that task's records (failed ones too, as tuning stores them)."""
    start = time.perf_counter()
    donors = Donors(database)
    jobs: list[tuple[ms.ExtractedTask, Schedule]] = []
    for task in tasks:
        mod, seen = task.dispatched[0], set()
        for record in donors.nearest(mod):
            sch = carried_over(mod, record.trace, postprocs)
            if sch is None:
                continue
            key = tvm_ffi.structural_hash(sch.mod)
            if key not in seen:
                seen.add(key)
                jobs.append((task, sch))
            if len(seen) == limit:
                break
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in jobs]) if jobs else []
    runs = [(task, sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True), b)
            for (task, sch), b in zip(jobs, built) if b.error_msg is None]
    device = tvm_ffi.Device(target.get_target_device_type(), 0).type  # "cpu" for llvm, as runners name it
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, device, args) for _, _, args, b in runs])
    seeded: set[str] = set()
    for (task, sch, args, b), future in zip(runs, futures):
        result = future.result()
        secs = result.run_secs if result.error_msg is None else [STORED_FAILURE]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(task.dispatched[0]), secs, target, args))
        if result.error_msg is None:
            seeded.add(task.task_name)
        remove_build_dir(b.artifact_path)  # as tuning's own callback does once a candidate ran
    return Seeded(sorted(seeded), len(runs), time.perf_counter() - start)


class CarriedOver(dl.ScheduleRule):
    """A dlight rule for a build: a function without a record gets the schedule of the
    nearest :class:`Donors` record that :func:`carried_over` applies, unmeasured at this
    shape (a tuned schedule of a similar function is a far better guess than a default
    sample); ``applied`` counts them."""

    def __init__(self, donors: Donors) -> None:
        self.donors = donors
        self.applied = 0

    def apply(self, func: tvm.tirx.PrimFunc, target: Target, _tunable: bool) -> Schedule | None:
        mod = tvm.IRModule({"main": func})
        records = self.donors.nearest(mod)
        if not records:
            return None
        postprocs = ms.TuneContext(mod, target=target, space_generator="post-order-apply",
                                   logger=QUIET_LOGGER).space_generator.postprocs
        for record in records:
            sch = carried_over(mod, record.trace, postprocs)
            if sch is not None:
                self.applied += 1
                return sch
        return None
