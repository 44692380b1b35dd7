"""Meta-schedule tuning into an on-disk JSON database, one per (model, target), resumable.

A run extracts the fused functions of the model (the same ones :mod:`.pipeline` compiles),
counts the trials the database already holds for each (incremental re-tuning after pruning
changes a few layers; a larger budget on an old folder tops each task up), and runs only the
trials each task still lacks, with a budget that reaches every task.
Records are appended to ``database_workload.json``/``database_tuning_record.json`` by
meta-schedule itself, so a second run on the same folder resumes from them, also after a
kill (:func:`open_database` repairs a line torn by it). Each run leaves
a tuning curve (CSV, JSON, PNG) and a ``tuning_report.json`` next to the database.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.meta_schedule.builder import PyBuilder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.utils import fork_seed
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind
from tvm.ir.utils import derived_object
from tvm.target import Target

from graphprune.errors import TuningError

from graphprune.atomic import atomic_write_bytes, atomic_write_text
from graphprune.figures import png_bytes
from graphprune.report import plot_tuning
from .frontend import import_model
from .intrinsics import register_intrinsics
from .padding import cpu_schedule_rules
from .pipeline import fuse
from .records import FAILED_RUN_SECS, measured_seconds
from .targets import CodegenTarget, resolve_target
from .time_budget import TaskState, run_for
from .transfer import Donors, Seeded, seed_tasks

#: trials per call when the budget is time: small enough that the run ends close to its
#: budget, large enough that a call's fixed cost (search start, builder round) stays minor
CHUNK_TRIALS = 8
#: per-task cap of a timed run that names no ``trials_per_task``: in effect, no cap
TIMED_TRIALS_CAP = 1024


#: The two tables of meta-schedule's JSON database, one JSON value per line, append-only.
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def open_database(work_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The JSON database in ``work_dir`` (created empty if missing), its tables repaired first.

    A run killed while meta-schedule appends a line can leave the tail of a table damaged
    (see :func:`repair_table`); TVM's loader then refuses the whole database ("Unexpected end
    of string"), so every earlier record of a long tuning run would be lost to a crash.
    """
    os.makedirs(work_dir, exist_ok=True)
    for name in DATABASE_FILES:
        action = repair_table(Path(work_dir) / name)
        if action:
            warnings.warn(f"{Path(work_dir) / name}: {action} (left by an interrupted tuning run)", stacklevel=2)
    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=True)
    except RuntimeError:  # TVM's loader raises a bare RuntimeError for any bad record
        rejected = reject_unreplayable(Path(work_dir))
        if not rejected:
            raise
        warnings.warn(f"{Path(work_dir) / DATABASE_FILES[1]}: {rejected} record(s) whose schedule no longer "
                      f"replays on its workload moved to {REJECTED_RECORDS}", stacklevel=2)
        return ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=True)


def has_records(work_dir: str | os.PathLike) -> bool:
    """Whether ``work_dir`` holds a tuning-record table with anything in it."""
    table = Path(work_dir) / DATABASE_FILES[1]
    return table.is_file() and table.stat().st_size > 0


#: Where :func:`reject_unreplayable` keeps the records it takes out of a database, for inspection.
REJECTED_RECORDS = "database_tuning_record.rejected.json"


def reject_unreplayable(work_dir: Path) -> int:
    """Move the records TVM cannot replay on their workload out of the table; returns how many.

    TVM's loader replays every record's schedule trace and fails the whole database on the
    first that raises (seen: a batch of 60 layer-norm records of one tuning run, measured fine,
    whose traces raise ScheduleError on reload). One bad batch must not cost the thousands of
    good records beside it; the rejected lines are appended to :data:`REJECTED_RECORDS`.
    """
    table = work_dir / DATABASE_FILES[1]
    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for line in (work_dir / DATABASE_FILES[0]).read_text().splitlines() if line.strip()]
    kept, rejected = [], []
    for line in table.read_text().splitlines():
        index, record = json.loads(line)
        try:
            ms.database.TuningRecord.from_json(record, workloads[index])
            kept.append(line)
        except RuntimeError:  # ScheduleError and its kin
            rejected.append(line)
    if rejected:
        with open(work_dir / REJECTED_RECORDS, "a") as f:
            f.write("".join(line + "\n" for line in rejected))
        atomic_write_text(table, "".join(line + "\n" for line in kept))
    return len(rejected)


def repair_table(path: Path) -> str | None:
    """Make the last line of a database table whole; returns what was done, or None.

    meta-schedule appends ``line`` and then ``"\\n"`` (``os << line << std::endl``); a line
    longer than the stream buffer (workload lines are ~40 KB) reaches the file in two writes,
    so a SIGKILL can leave either a prefix of a line or a complete line without its newline.
    A complete line (it parses as JSON: a prefix of a JSON array never does) gets its newline,
    otherwise the next append would glue two values into one unreadable line; a prefix is cut
    off, losing only the record whose write was interrupted. Earlier lines are never touched.
    """
    if not path.is_file():
        return None
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            f.truncate(start)
            return f"cut a partial line of {size - start} bytes"
        f.write(b"\n")
        return "added the missing newline"


def best_seconds(database: ms.Database | None, task: ms.ExtractedTask, target: Target) -> float | None:
    """Best measured time of ``task`` in ``database``; None if it has no successful record."""
    if database is None:
        return None
    record = database.query_tuning_record(task.dispatched[0], target, task.task_name)
    return None if record is None else measured_seconds(record)


def trials_done(database: ms.Database, tasks: Sequence[ms.ExtractedTask]) -> list[int]:
    """How many trials ``database`` holds for each task, failed ones included.

    A task without a single successful record counts none: its trials bought no schedule, so
    it is tuned afresh (as a run on a device-less folder would need).
    """
    counts: dict[str, int] = {}
    succeeded: set[str] = set()
    for record in database.get_all_tuning_records():
        key = function_key(record.workload.mod)
        counts[key] = counts.get(key, 0) + 1
        if measured_seconds(record) is not None:
            succeeded.add(key)
    keys = [function_key(task.dispatched[0]) for task in tasks]
    return [counts[key] if key in succeeded else 0 for key in keys]


def best_by_function(database: ms.Database) -> dict[str, float]:
    """The best measured seconds of every function ``database`` holds a successful record of,
    keyed by :func:`function_key`."""
    best: dict[str, float] = {}
    for record in database.get_all_tuning_records():
        seconds = measured_seconds(record)
        if seconds is not None:
            key = function_key(record.workload.mod)
            best[key] = min(seconds, best.get(key, math.inf))
    return best


def function_key(mod: tvm.IRModule) -> str:
    """A tuning task's function, as :func:`best_by_function` keys it: its structural hash."""
    return str(tvm_ffi.structural_hash(mod))


def extract_tasks(fused: tvm.IRModule, target: Target) -> list[ms.ExtractedTask]:
    """The tuning tasks of a :func:`.pipeline.fuse`-d module (structurally equal functions merged)."""
    return list(ms.relax_integration.extract_tasks(fused, target))


def recorded_seconds(database: ms.Database | None, fused: tvm.IRModule, target: Target) -> dict[str, float | None]:
    """Each tuning task of a fused module, by :func:`function_key`, with the best time
    ``database`` records for it at its shape (None where it has no successful record)."""
    return {function_key(t.dispatched[0]): best_seconds(database, t, target) for t in extract_tasks(fused, target)}


#: how much slower than a wider function of its structure a function may run before
#: :func:`lagging` names it (a few percent is timing noise)
LAG_MARGIN = 1.1


def lagging(database: ms.Database, tasks: Sequence[ms.ExtractedTask], target: Target,
            margin: float = LAG_MARGIN) -> list[ms.ExtractedTask]:
    """The tasks whose best record is more than ``margin`` times slower than the best of a
    function of the same structure at least as large in every extent.

    A narrower function can always do what the wider one does, so such a record says its
    search has not yet found a schedule for its width, not what the width costs: after 8
    trials a compact ViT's 88-wide layer norm ran 10.5 us where the 104- and 128-wide ones ran
    1.1-1.3 us, and its 104-wide patch embedding 1.45 times the 128-wide one."""
    donors = Donors(database)
    out = []
    for task in tasks:
        own = best_seconds(database, task, target)
        wider = donors.wider_best(task.dispatched[0]) if own is not None else None
        if wider is not None and own > margin * wider:
            out.append(task)
    return out


def build_candidate(mod: tvm.IRModule, target: Target) -> tvm.runtime.Module:
    """meta-schedule's default build of a candidate, minus the import of every tensor intrinsic
    (~45 s per worker, past the builder's 30 s timeout). Candidates arrive already
    tensorised; intrinsics are only needed where schedules are generated, in the tuning
    process (:func:`register_intrinsics`)."""
    from tvm.driver import build as tir_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tir_build(mod, target=target)


def _build_and_export(mod: tvm.IRModule, target: Target) -> str:
    """One candidate, in a builder worker: compiled and saved where the runner will load it."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    return default_export(build_candidate(mod, target))


@derived_object
class PooledBuilder(PyBuilder):
    """meta-schedule's ``LocalBuilder`` with worker processes that live for ``recycle_after`` batches.

    ``LocalBuilder`` starts a fresh process pool for every batch of candidates (a workaround
    for a slow leak in long-lived workers), and every fresh worker imports TVM and this package
    before it builds anything: ~9 s per batch on 2 cores, more than the builds themselves at
    8-16 candidates per batch. Recycling the pool every ``recycle_after`` batches keeps the
    leak bounded and pays the start-up once per recycle instead of once per batch.
    """

    def __init__(self, max_workers: int | None = None, timeout_sec: float = 30.0, recycle_after: int = 32) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self.timeout_sec = timeout_sec
        self.recycle_after = recycle_after
        self._pool: PopenPoolExecutor | None = None
        self._batches = 0

    def _fresh_pool(self) -> PopenPoolExecutor:
        if self._pool is None or self._batches >= self.recycle_after:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._batches = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec), 0
        self._batches += 1
        return self._pool

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        jobs = [(b.mod, b.target) for b in build_inputs]
        results = []
        for done in self._fresh_pool().map_with_error_catching(lambda job: _build_and_export(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed:\n{done.value}"))
        return results

    def close(self) -> None:
        """Stop the worker processes (the tuning run is over)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


@derived_object
class CurveRecorder(PyMeasureCallback):
    """Measure callback that records every trial: task, time, and the estimated latency of the
    tasks this run tunes (sum of weight x best time so far, known once each has a measurement)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float]) -> None:
        self.names, self.weights = list(names), list(weights)
        self.best = [math.inf] * len(self.names)
        self.rows: list[dict[str, Any]] = []
        #: the current ``tune_tasks`` call's task ids -> indices into ``names`` (set per phase)
        self.phase: list[int] = list(range(len(self.names)))

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
              builder_results: Any, runner_results: Any) -> None:
        task_id = self.phase[task_id]
        for builder_result, runner_result in zip(builder_results, runner_results):
            secs = [float(s) for s in (runner_result.run_secs or [])]
            ok = runner_result.error_msg is None and secs and min(secs) < FAILED_RUN_SECS
            run = sum(secs) / len(secs) if ok else math.inf
            self.best[task_id] = min(self.best[task_id], run)
            total = sum(w * b for w, b in zip(self.weights, self.best))
            row = {"trial": len(self.rows) + 1, "task": self.names[task_id], "run_ms": _ms(run),
                   "task_best_ms": _ms(self.best[task_id]), "model_estimate_ms": _ms(total)}
            if not ok:
                error = builder_result.error_msg or runner_result.error_msg or "no run time measured"
                row["error"] = _last_line(str(error))
            self.rows.append(row)


def _last_line(error: str) -> str:
    """The line of a (often traceback-long) build or run error that says what went wrong."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else error


def _ms(seconds: float) -> float | None:
    return None if math.isinf(seconds) else seconds * 1e3


@dataclass
class TuningReport:
    """What a tuning run did; ``work_dir`` is what :func:`.compile.build` takes as ``tuning_db``."""

    work_dir: str
    target: str
    tasks_total: int
    tasks_tuned: list[str]
    tasks_reused: list[str]
    trials_per_task: int
    trials_budget: int        # the sum of every task's budget (light tasks get fewer, see task_budgets)
    trials_run: int
    trials_saved: int
    seconds: float
    temporary: bool
    curve: list[dict[str, Any]] = field(default_factory=list, repr=False)
    minutes: float | None = None  # the time budget, when the run had one
    tasks_seeded: list[str] = field(default_factory=list)  # given schedules carried over (.transfer)
    trials_transferred: int = 0  # carried-over schedules measured (not in trials_run; in each task's budget)
    transfer_seconds: float = 0.0

    @property
    def trials_failed(self) -> int:
        """Trials of this run whose candidate failed to build or run (stored with a 1e9 s time)."""
        return sum("error" in row for row in self.curve)

    @property
    def failures(self) -> list[str]:
        """The distinct errors of the failed trials, in the order they first happened."""
        return list(dict.fromkeys(row["error"] for row in self.curve if "error" in row))

    def as_dict(self) -> dict[str, Any]:
        """The fields and the failure counts, as ``tuning_report.json`` and the compile report hold them."""
        return {**asdict(self), "trials_failed": self.trials_failed, "failures": self.failures}

    def summary(self) -> str:
        where = f"{self.work_dir} (TEMPORARY: no device to measure on)" if self.temporary else self.work_dir
        failed = (f"\n  failed trials: {self.trials_failed} of {self.trials_run}; first error: {self.failures[0]}"
                  if self.trials_failed else "")
        return (f"tuning for {self.target} in {where}\n"
                f"  tasks: {self.tasks_total}, tuned now {len(self.tasks_tuned)}, "
                f"reused from the database {len(self.tasks_reused)}\n"
                f"  carried over: {len(self.tasks_seeded)} tasks seeded with {self.trials_transferred} schedules "
                f"of tuned functions of other extents ({self.transfer_seconds:.0f} s)\n"
                f"  trials: budget {self.trials_budget} ({self.trials_per_task} per task, at most "
                f"{LIGHT_TRIALS} per light task), run {self.trials_run}, saved by reuse {self.trials_saved}, "
                f"time: {self.seconds:.0f} s" + (f" of a {self.minutes:g} min budget" if self.minutes else "")
                + failed)


#: overrides the shared database's folder (one folder for every target: name one per target)
SHARED_DB_ENV = "GRAPHPRUNE_TUNING_DB"


def shared_database_dir(target: CodegenTarget) -> Path:
    """The tuning database every compile and tune on this machine shares for ``target``.

    A convolution or matmul of one shape gets the same records whichever model it comes from,
    so one database per (target, machine) lets the next model reuse what the last one tuned.
    It lives in the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``), under a key of the
    target (with its ``mcpu``, features and core count) and, for targets that run here, this
    CPU's feature flags, so records measured on another CPU are never mixed in.
    ``$GRAPHPRUNE_TUNING_DB`` overrides the folder.
    """
    if os.environ.get(SHARED_DB_ENV):
        return Path(os.environ[SHARED_DB_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = json.dumps(target.target.export(), sort_keys=True, default=str)
    if target.runs_here:
        key += _cpu_flags()
    return cache / "graphprune" / "tuning" / f"{target.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), or its platform name where /proc/cpuinfo is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return " ".join(sorted(flags.split(":", 1)[-1].split()))


def tuning_dir(target: CodegenTarget, work_dir: str | os.PathLike,
               rpc_tracker: str | None) -> tuple[Path, bool]:
    """Where a run may write: ``work_dir``, or a fresh temporary folder (and True) when nothing can
    measure the target. Without a device every candidate is stored as a 1e10 s failure, which
    would poison a real database, so such runs never touch it."""
    if target.runs_here or rpc_tracker is not None:
        return Path(work_dir), False
    temporary = Path(tempfile.mkdtemp(prefix=f"graphprune-tune-{target.name}-"))
    warnings.warn(f"no {target.name} device on this machine and no RPC tracker: tuning into the temporary "
                  f"folder {temporary}, not {work_dir}; its records are failures and are not reusable",
                  stacklevel=3)
    return temporary, True


def make_runner(rpc_tracker: str | None = None, rpc_key: str | None = None) -> ms.runner.Runner:
    """Measure here, or on the boards registered at ``rpc_tracker`` ("host:port") under ``rpc_key``.

    meta-schedule's ``RPCRunner`` holds one connection at a time unless told otherwise
    (``max_workers`` defaults to 1), so a farm of N boards would measure one candidate at a
    time. The runner gets one connection per board registered under the key when tuning
    starts; the tracker hands each to a free board. Asking the tracker here also makes a run
    with no board registered fail at once, instead of every candidate waiting out its
    session timeout and being stored as a failure.
    """
    if rpc_tracker is None:
        return ms.runner.LocalRunner()
    host, _, port = rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not rpc_key:
        raise TuningError(f"bad RPC tracker {rpc_tracker!r} / key {rpc_key!r}",
                          hint='pass rpc_tracker="host:port" and the rpc_key the device registered with')
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                 session_timeout_sec=120)
    try:
        boards = config.count_num_servers(allow_missing=False)
    except (ValueError, OSError, RuntimeError) as exc:
        raise TuningError(f"no device registered under key {rpc_key!r} at the RPC tracker {rpc_tracker}: "
                          f"{str(exc).splitlines()[0]}",
                          hint=f"start one with: python -m tvm.exec.rpc_server --tracker {rpc_tracker} "
                               f"--key {rpc_key}; check with: python -m tvm.exec.query_rpc_tracker "
                               f"--host {host} --port {port}") from exc
    return ms.runner.RPCRunner(rpc_config=config, max_workers=boards)


class Runners:
    """The runner for each of a tuning run's ``ms.tune_tasks`` calls: one local runner for the
    whole run, or a fresh RPC runner per call (made as the call starts, so its board count
    lands in the call's log).  A ``LocalRunner`` starts a worker process that imports TVM
    (about 5 s on 2 busy cores), which a time-budgeted run would otherwise pay for every
    chunk of :data:`CHUNK_TRIALS` trials."""

    def __init__(self, rpc_tracker: str | None = None, rpc_key: str | None = None) -> None:
        self.rpc_tracker, self.rpc_key = rpc_tracker, rpc_key
        self._local: ms.runner.LocalRunner | None = None

    def __call__(self) -> ms.runner.Runner:
        if self.rpc_tracker is not None:
            return make_runner(self.rpc_tracker, self.rpc_key)
        if self._local is None:
            self._local = make_runner()
        return self._local

    def close(self) -> None:
        """Stop the local runner's worker (the tuning run is over)."""
        if self._local is not None:
            self._local.pool.shutdown()
            self._local = None


#: Trials for a light task, one that reduces nothing (see :func:`task_budgets`).
LIGHT_TRIALS = 4
#: Which tasks :func:`task_budgets` counts as light, in words (benchmark headers record it).
LIGHT_RULE = "tasks that reduce nothing"


def task_budgets(tasks: Sequence[ms.ExtractedTask], trials_per_task: int) -> list[int]:
    """Trials per task: ``trials_per_task`` for every task that reduces over some axis (matmuls,
    convolutions, norms, softmax, pooling), at most :data:`LIGHT_TRIALS` for the light rest
    (reshapes, gathers, elementwise activations).

    A light task's design space is nearly one schedule (parallel outer loop, vector inner
    loop), yet meta-schedule's scheduler keeps picking it until it has used its trials, each
    pick paying a search, a build and a run: on a small ViT (47 tasks, 30 of them light)
    that was most of a run's time for no measurable gain. FLOPs do not tell which is which:
    GELU on ``fast_erf`` counts a polynomial per element, more than some matmuls, while a
    pruned ViT's layer norm has under 1% of the FLOPs but runs 12 times per inference, and
    with 4 trials its tuned kernel took 3.6 µs in one run and 13 µs in the next (8% of the model).
    """
    return [trials_per_task if _has_reduction(t.dispatched[0]) else min(LIGHT_TRIALS, trials_per_task)
            for t in tasks]


def _has_reduction(mod: tvm.IRModule) -> bool:
    """Whether the task's function reduces (sums over) some axis: where tiling pays."""
    infos = normalize_prim_func(Schedule(mod))
    return infos is None or any(info.is_reduction() for info in infos)  # unanalysable: assume it does


def _space_generator(target: Target) -> ms.space_generator.SpaceGenerator | str:
    """meta-schedule's default design space; on CPU, awkward matmul axes padded first
    (:mod:`.padding`). The CPU rules are the generic LLVM ones: the x86/ARM extras TVM adds
    for a target only tensorise int8 dot products, and graphprune compiles float32."""
    if target.kind.name != "llvm":
        return "post-order-apply"
    return ms.space_generator.PostOrderApply(sch_rules=cpu_schedule_rules(), postprocs="llvm",
                                             mutator_probs="llvm")


def warm_cost_model(database: ms.Database, target: Target) -> ms.cost_model.XGBModel:
    """meta-schedule's XGBoost cost model, first trained on the measured records already in
    ``database``.

    A fresh model guesses at random until it has seen ``num_warmup_samples`` (100) measurements,
    and at 32 trials per task every task is searched in a single round: the first tasks of each
    run were picked blind. When the database already holds records (the dense form's, which a
    pruned form's tuning starts from; an interrupted run's), the model starts from them. Its
    targets are relative within each function, so what it learns transfers across shapes.
    """
    model = ms.cost_model.XGBModel(num_tuning_cores=_cores(target), tree_method="auto")
    by_workload: dict[ms.database.Workload, list[ms.database.TuningRecord]] = {}
    for record in database.get_all_tuning_records():
        if measured_seconds(record) is not None and record.args_info is not None:
            by_workload.setdefault(record.workload, []).append(record)
    for workload, records in by_workload.items():
        context = ms.TuneContext(mod=workload.mod, target=target, num_threads=_cores(target))
        candidates, results = [], []
        for record in records:
            schedule = Schedule(workload.mod)
            try:
                record.trace.apply_to_schedule(schedule, remove_postproc=False)
            except RuntimeError:  # a record this TVM cannot replay teaches nothing
                continue
            candidates.append(ms.MeasureCandidate(schedule, record.args_info))
            results.append(ms.runner.RunnerResult(run_secs=record.run_secs, error_msg=None))
        model.update(context, candidates, results)
    return model


class TaskLoggers:
    """Where a tuning run's logs go: one file per task and ``task_scheduler.log`` in ``folder``.

    meta-schedule's own ``get_loggers_from_work_dir`` runs ``logging.config.dictConfig`` over
    the process: it closes every handler in it, replaces the handlers of the
    ``tvm.s_tir.meta_schedule`` logger, and crashes on any handler there without a name (test
    runners and applications attach such handlers). Here each task logs to a logger of
    graphprune's own, and meta-schedule's loggers (scheduler, runners, builders) get one file
    handler for the run; their warnings still go up to the caller's handlers, their per-round
    detail only to the file. :meth:`close` puts every logger back as it was.
    """

    #: the logger every meta-schedule module logs under
    META_SCHEDULE = "tvm.s_tir.meta_schedule"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        #: (logger, the handlers added to it, its level and propagate flag before) to undo on close
        self._changed: list[tuple[logging.Logger, list[logging.Handler], int, bool]] = []
        #: task name -> its logger: a task tuned in several budget phases keeps one logger and file
        self._tasks: dict[str, logging.Logger] = {}
        scheduler = logging.getLogger(self.META_SCHEDULE)
        self._redirect(scheduler, "task_scheduler", _Upward(scheduler.parent))

    def get(self, task_name: str) -> logging.Logger:
        """The task's logger, writing ``task_<k>_<name>.log`` (k: the k-th task this run logs)."""
        if task_name not in self._tasks:
            index = len(self._tasks)
            logger = logging.getLogger(f"graphprune.codegen.tuning.task_{index:03d}")
            self._redirect(logger, f"task_{index:03d}_{task_name[:100]}")
            self._tasks[task_name] = logger
        return self._tasks[task_name]

    def _redirect(self, logger: logging.Logger, file_stem: str, *extra: logging.Handler) -> None:
        handler = logging.FileHandler(self.folder / f"{file_stem}.log", mode="a", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._changed.append((logger, [handler, *extra], logger.level, logger.propagate))
        for h in (handler, *extra):
            logger.addHandler(h)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False

    def close(self) -> None:
        """Remove and close every handler added; restore each logger's level and propagation."""
        for logger, handlers, level, propagate in reversed(self._changed):
            for handler in handlers:
                logger.removeHandler(handler)
                handler.close()
            logger.setLevel(level)
            logger.propagate = propagate
        self._changed.clear()
        self._tasks.clear()


class _Upward(logging.Handler):
    """Hands WARNING and above to ``parent`` (and so to the caller's handlers) from a logger
    that no longer propagates."""

    def __init__(self, parent: logging.Logger | None) -> None:
        super().__init__(logging.WARNING)
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        if self.parent is not None:
            self.parent.handle(record)


def tune_contexts(tasks: Sequence[ms.ExtractedTask], loggers: TaskLoggers, *, space: Any, strategy: Any,
                  seed: int) -> tuple[list[ms.TuneContext], list[float]]:
    """meta-schedule tune contexts for ``tasks``, logging through ``loggers`` (see :class:`TaskLoggers`)."""
    contexts, weights = [], []
    for task, rand_state in zip(tasks, fork_seed(seed, n=len(tasks))):
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space,
                                       search_strategy=strategy, task_name=task.task_name,
                                       logger=loggers.get(task.task_name), rand_state=rand_state,
                                       num_threads="physical").clone())
        weights.append(task.weight)
    return contexts, weights


def _cores(target: Target) -> int:
    return int(target.attrs.get("num-cores", 0) or os.cpu_count() or 1)


def _search_strategy(trials_per_task: int) -> ms.search_strategy.EvolutionarySearch:
    """Evolutionary search sized to the budget: the default population (512, 50 unmeasured seeds)
    costs 25-50 s of search per task on 2 cores before the first candidate is built, which
    dominates runs of a few trials per task."""
    population = min(512, max(64, 16 * trials_per_task))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 4))


def _chunk_strategy() -> ms.search_strategy.EvolutionarySearch:
    """The search for one chunk of a time-budgeted run: a small population and one round of
    evolution. The default four rounds over 128 candidates took 24 s of a chunk's 34 s on 2
    cores, ranking candidates with a cost model that has seen a handful of measurements; spent
    on measuring instead, a 4-minute budget on a pruned ResNet-18 tuned 15 of 23 tasks (120
    trials) instead of 8 (64 trials), and the model ran in 66 ms instead of 111 ms."""
    return ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16, genetic_num_iters=1)


def tune(model_or_program: Any, example_inputs: Any = None, target: Any = "x86",
         work_dir: str | os.PathLike | None = None, trials_per_task: int | None = None,
         incremental: bool = True, rpc_tracker: str | None = None, rpc_key: str | None = None,
         seed: int = 0, minutes: float | None = None, transfer: bool = True,
         only: Collection[str] | None = None) -> TuningReport:
    """Tune a model's functions for ``target`` into the database in ``work_dir``.

    >>> report = tune(model, (x,), "x86", trials_per_task=16)   # into the machine's shared database
    >>> report = tune(model, (x,), "x86", minutes=10)           # or for a time budget
    >>> build(model, (x,), "x86")                               # which build reads by default

    ``work_dir`` defaults to :func:`shared_database_dir`, so tasks another model already tuned on
    this machine are reused (``tasks_reused``); name a folder to keep a run apart.

    Every task gets ``trials_per_task`` trials (default 16), light ones fewer (:func:`task_budgets`).
    With ``minutes`` the budget is time: chunks of :data:`CHUNK_TRIALS` trials go to the task with
    the largest share of the model's measured latency (:mod:`.time_budget`), the run stops within
    the time given, and ``trials_per_task`` (default :data:`TIMED_TRIALS_CAP`) only caps a task.
    With ``incremental`` the trials already in the database count towards each task's budget
    (:func:`trials_done`): a run killed mid-task, or an old folder given a larger budget, runs
    only what is missing, and tasks shared with an earlier pruning run nothing; the report says
    how many trials that saved. Targets this machine cannot run are measured through
    ``rpc_tracker``/``rpc_key``; without one the run goes to a temporary folder (its records
    are all failures, 1e10 s, and must never poison a real database).

    With ``transfer`` every task without a measured record first gets schedules carried over
    from the database's records of functions that differ only in extents (a pruned form's
    from its dense form's, :mod:`.transfer`), measured like trials and counted in its budget:
    the build has them, and the search starts from them.

    ``only`` (:func:`function_key` s) tunes those of the model's functions and no others.
    """
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if trials_per_task is None:
        trials_per_task = TIMED_TRIALS_CAP if minutes is not None else 16
    resolved = resolve_target(target)
    program = import_model(model_or_program, example_inputs)
    work_dir, temporary = tuning_dir(resolved, work_dir or shared_database_dir(resolved), rpc_tracker)
    register_intrinsics(resolved.target)
    database = open_database(work_dir)
    tasks = extract_tasks(fuse(program.bound(), resolved.target), resolved.target)
    if only is not None:
        tasks = [t for t in tasks if function_key(t.dispatched[0]) in only]
    budgets = task_budgets(tasks, trials_per_task)
    start = time.perf_counter()
    builder, runners = PooledBuilder(), Runners(rpc_tracker, rpc_key)
    prior = trials_done(database, tasks) if incremental else [0] * len(tasks)
    fresh = [t for t in tasks if best_seconds(database, t, resolved.target) is None]
    seeded = Seeded([], 0, 0.0)
    if transfer and fresh and not temporary:
        postprocs = ms.TuneContext(mod=fresh[0].dispatched[0], target=resolved.target,
                                   space_generator=_space_generator(resolved.target)).space_generator.postprocs
        try:
            seeded = seed_tasks(database, fresh, resolved.target, builder, runners(), postprocs)
        except BaseException:
            builder.close()
            runners.close()
            raise
    done = trials_done(database, tasks) if incremental and seeded.measured else prior
    left = [max(0, budget - have) for budget, have in zip(budgets, done)]
    todo = [i for i, n in enumerate(left) if n]
    recorder = CurveRecorder([tasks[i].task_name for i in todo], [tasks[i].weight for i in todo])
    cost_model = warm_cost_model(database, resolved.target) if todo else None
    loggers = TaskLoggers(work_dir / "logs")

    def run(phase: list[int], budget: int) -> None:
        """Tune ``todo[k]`` for each ``k`` in ``phase``, ``budget`` trials each."""
        recorder.phase = phase
        strategy = _search_strategy(budget) if minutes is None else _chunk_strategy()
        contexts, weights = tune_contexts([tasks[todo[k]] for k in phase], loggers,
                                          space=_space_generator(resolved.target), strategy=strategy, seed=seed)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                      max_trials_global=len(phase) * budget, max_trials_per_task=budget,
                      num_trials_per_iter=min(64, budget), builder=builder,
                      runner=runners(), database=database, cost_model=cost_model,
                      measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [recorder])

    try:
        if minutes is None:
            for budget in sorted({left[i] for i in todo}, reverse=True):  # most trials first
                run([k for k, i in enumerate(todo) if left[i] == budget], budget)
        else:
            states = [TaskState(tasks[i].weight, _flops(tasks[i]), best_seconds(database, tasks[i], resolved.target),
                                left[i]) for i in todo]

            def chunk(k: int) -> float | None:
                run([k], min(CHUNK_TRIALS, states[k].trials_left))
                return best_seconds(database, tasks[todo[k]], resolved.target)

            run_for(minutes * 60 - (time.perf_counter() - start), states, chunk, CHUNK_TRIALS)
    finally:
        builder.close()
        runners.close()
        loggers.close()
    run_now = {recorder.names.index(r["task"]) for r in recorder.rows}
    reused = [i for i, n in enumerate(left) if not n and tasks[i].task_name not in seeded.tasks]
    report = TuningReport(work_dir=str(work_dir), target=resolved.name, tasks_total=len(tasks),
                          tasks_tuned=[tasks[todo[k]].task_name for k in sorted(run_now)],
                          tasks_reused=[tasks[i].task_name for i in reused],
                          trials_per_task=trials_per_task, trials_budget=sum(budgets),
                          trials_run=len(recorder.rows),
                          trials_saved=sum(min(have, budget) for budget, have in zip(budgets, prior)),
                          seconds=time.perf_counter() - start, temporary=temporary, curve=recorder.rows,
                          minutes=minutes, tasks_seeded=seeded.tasks, trials_transferred=seeded.measured,
                          transfer_seconds=seeded.seconds)
    write_report(report)
    return report


def catch_up(model_or_program: Any, example_inputs: Any, target: Any, work_dir: str | os.PathLike | None,
             trials_per_task: int, rounds: int = 2) -> list[str]:
    """After a tune of ``trials_per_task``, the model's :func:`lagging` functions tuned on,
    their trials doubled each round for up to ``rounds`` rounds; the names of those tuned.

    A few trials leave a new width's speed to chance, and a function slower than a wider one
    of its structure makes a narrower model read slower than a wider one: a latency target's
    rounds then chase the schedules, not the widths.  The functions that pass the check (most
    of them) run nothing more."""
    resolved = resolve_target(target)
    program = import_model(model_or_program, example_inputs)
    folder = work_dir or shared_database_dir(resolved)
    tasks = extract_tasks(fuse(program.bound(), resolved.target), resolved.target)
    tuned: list[str] = []
    for k in range(1, rounds + 1):
        behind = lagging(open_database(folder), tasks, resolved.target)
        if not behind:
            break
        tuned += [t.task_name for t in behind if t.task_name not in tuned]
        tune(program, None, target, folder, trials_per_task=trials_per_task * 2 ** k,
             only={function_key(t.dispatched[0]) for t in behind})
    return tuned


def _flops(task: ms.ExtractedTask) -> float:
    """Estimated FLOPs of one call of ``task`` (TVM's count over its TIR)."""
    return float(estimate_tir_flops(task.dispatched[0]))


def write_report(report: TuningReport) -> None:
    """Write ``tuning_report.json`` and the curve as CSV, JSON and PNG, each atomically."""
    folder = Path(report.work_dir)
    atomic_write_text(folder / "tuning_report.json", json.dumps(report.as_dict(), indent=1))
    atomic_write_text(folder / "tuning_curve.json", json.dumps(report.curve, indent=1))
    text = io.StringIO()
    writer = csv.DictWriter(text, ["trial", "task", "run_ms", "task_best_ms", "model_estimate_ms", "error"])
    writer.writeheader()
    writer.writerows(report.curve)
    atomic_write_text(folder / "tuning_curve.csv", text.getvalue())
    if report.curve:
        _plot_curve(report, folder / "tuning_curve.png")


def _plot_curve(report: TuningReport, path: Path) -> None:
    title = f"{Path(report.work_dir).name}: {len(report.tasks_tuned)} tasks tuned, {len(report.tasks_reused)} reused"
    atomic_write_bytes(path, png_bytes(plot_tuning(report.curve, title), dpi=100))
