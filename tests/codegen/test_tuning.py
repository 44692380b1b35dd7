"""Tuning database: resumable, incremental re-tuning, curve files, no real DB without a device."""
import json
import shutil

import pytest
import torch
from torch import nn

import graphprune.codegen as codegen
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.tuning import (LIGHT_TRIALS, REJECTED_RECORDS, CurveRecorder, PooledBuilder, TuningReport,
                                       extract_tasks, open_database, task_budgets, trials_done, tuning_dir,
                                       warm_cost_model, write_report)

from .models import TinyTransformerBlock, mlp, rel_err, seeded

X = torch.randn(1, 16)
TRIALS = 2


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run of the 3-layer MLP (3 tasks x 2 trials)."""
    work_dir = tmp_path_factory.mktemp("tune") / "mlp-x86"
    return work_dir, codegen.tune(mlp(32), (X,), "x86", work_dir, trials_per_task=TRIALS)


def test_first_run_tunes_every_task_and_writes_curve(tuned):
    work_dir, report = tuned
    assert report.tasks_total >= 2 and len(report.tasks_tuned) == report.tasks_total
    assert report.trials_run > 0 and report.trials_saved == 0 and not report.temporary
    for name in ("database_workload.json", "database_tuning_record.json", "tuning_curve.csv",
                 "tuning_curve.json", "tuning_curve.png", "tuning_report.json"):
        assert (work_dir / name).stat().st_size > 0, name
    assert len(json.loads((work_dir / "tuning_curve.json").read_text())) == report.trials_run


def test_build_applies_every_record(tuned):
    work_dir, report = tuned
    compiled = codegen.build(mlp(32), (X,), "x86", tuning_db=work_dir)
    assert (compiled.tuned_functions, compiled.total_functions) == (report.tasks_total, report.tasks_total)
    assert rel_err(compiled.run(X), mlp(32)(X)) < 1e-4


def test_tuned_weights_are_prepacked_at_compile_time(tuned):
    """Tuned schedules read weights in the tiles they were packed into (RewriteLayout); the packing
    was folded into the constants, so no packing function is left to run per inference."""
    work_dir, _ = tuned
    text = codegen.build(mlp(32), (X,), "x86", tuning_db=work_dir).executable.as_text()
    assert "_prepacked" in text
    assert "layout_rewrite_preproc" not in text and "te_layout_transform" not in text
    # nor a tuple of the packed weights (constants) built and taken apart around each call
    assert "make_tuple in: c[" not in text and "tuple_getitem" not in text


def _tasks(model: nn.Module, x: torch.Tensor = X) -> list:
    """The tuning tasks of ``model`` on x86, as :func:`codegen.tune` extracts them."""
    target = resolve_target("x86").target
    return extract_tasks(fuse(codegen.import_model(model, (x,)).bound(), target), target)


def _budgets(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Task name -> trials that task_budgets gives it at 16 trials per task, on x86."""
    tasks = _tasks(model, x)
    return dict(zip((t.task_name for t in tasks), task_budgets(tasks, 16)))


def test_light_tasks_get_few_trials():
    """Every matmul gets the full budget; functions that reduce nothing (reshapes, transposes)
    get at most LIGHT_TRIALS."""
    budgets = _budgets(seeded(TinyTransformerBlock()), torch.randn(2, 8, 32))
    assert set(budgets.values()) == {16, LIGHT_TRIALS}
    assert all(budgets[name] == 16 for name in budgets if "matmul" in name)
    light = [name for name, budget in budgets.items() if budget == LIGHT_TRIALS]
    assert any("reshape" in name or "transpose" in name for name in light)


def test_norms_get_the_full_budget_however_few_their_flops():
    """A layer norm and a softmax between wide matmuls have well under 1% of the FLOPs, yet run
    once per layer; an earlier FLOPs-share rule left them 4 trials and a noisy kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512), nn.Linear(512, 512), nn.Softmax(-1)).eval()
    budgets = _budgets(model, torch.randn(4, 512))
    norms = [name for name in budgets if "layer_norm" in name or "softmax" in name]
    assert len(norms) == 2 and all(budgets[name] == 16 for name in norms), budgets


def test_pooled_builder_keeps_its_workers_between_batches():
    """One pool serves ``recycle_after`` batches (LocalBuilder starts one per batch); a failed
    build comes back as an error message, not an exception."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in range(64):
            b[i] = a[i] + T.float32(1)

    job = ms.builder.BuilderInput(tvm.IRModule({"main": add_one}), resolve_target("x86").target)
    builder = PooledBuilder(max_workers=1, recycle_after=2)
    pools = []
    try:
        for _ in range(3):
            (result,) = builder.build([job])
            assert result.error_msg is None and result.artifact_path
            pools.append(builder._pool)
        assert pools[0] is pools[1] and pools[2] is not pools[1]
        no_such_cpu = tvm.target.Target({"kind": "llvm", "mtriple": "nonesuch-unknown-none"})
        bad = ms.builder.BuilderInput(tvm.IRModule({"main": add_one}), no_such_cpu)
        (failed,) = builder.build([bad])
        assert failed.artifact_path is None and "build failed" in failed.error_msg
    finally:
        builder.close()


def test_second_run_resumes_from_existing_records(tuned):
    work_dir, first = tuned
    records = len(open_database(work_dir).get_all_tuning_records())
    again = codegen.tune(mlp(32), (X,), "x86", work_dir, trials_per_task=TRIALS)
    assert again.tasks_tuned == [] and len(again.tasks_reused) == first.tasks_total
    assert again.trials_run == 0 and again.trials_saved == first.trials_budget
    assert len(open_database(work_dir).get_all_tuning_records()) == records


def test_a_larger_budget_runs_only_the_missing_trials(tuned, tmp_path):
    """A folder tuned at TRIALS, rerun at TRIALS + 2 (a larger budget, or a run killed after
    TRIALS), runs two more trials per task: the ones in the database count."""
    work_dir, first = tuned
    resumed = tmp_path / "mlp-x86"
    shutil.copytree(work_dir, resumed)
    records = len(open_database(resumed).get_all_tuning_records())
    assert trials_done(open_database(resumed), _tasks(mlp(32))) == \
        [TRIALS] * first.tasks_total
    more = codegen.tune(mlp(32), (X,), "x86", resumed, trials_per_task=TRIALS + 2)
    assert more.trials_saved == TRIALS * first.tasks_total
    assert 0 < more.trials_run <= 2 * first.tasks_total
    assert len(open_database(resumed).get_all_tuning_records()) == records + more.trials_run


def test_a_task_whose_trials_all_failed_counts_none(tuned, tmp_path):
    """Failed trials (1e10 s) bought no schedule: such a task is tuned afresh, not topped up."""
    work_dir, first = tuned
    failed = tmp_path / "mlp-x86"
    shutil.copytree(work_dir, failed)
    records = failed / "database_tuning_record.json"
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    for _, (_, run_secs, _, _) in lines:
        run_secs[:] = [1e10] * len(run_secs)
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert trials_done(open_database(failed), _tasks(mlp(32))) == \
        [0] * first.tasks_total


def test_records_that_no_longer_replay_are_set_aside_not_fatal(tuned, tmp_path):
    """TVM's loader fails a whole database on one record whose trace raises on replay; the
    database opens with that record moved to REJECTED_RECORDS and every other one kept."""
    work_dir, _ = tuned
    damaged = tmp_path / "mlp-x86"
    shutil.copytree(work_dir, damaged)
    table = damaged / "database_tuning_record.json"
    lines = table.read_text().splitlines()
    index, (trace, *rest) = json.loads(lines[0])
    first_block = next(inst for inst in trace[0] if inst[0] == "GetSBlock")
    first_block[2][0] = "no_such_block"
    lines[0] = json.dumps([index, [trace, *rest]])
    table.write_text("".join(line + "\n" for line in lines))
    with pytest.warns(UserWarning, match="1 record"):
        database = open_database(damaged)
    assert len(database.get_all_tuning_records()) == len(lines) - 1
    assert (damaged / REJECTED_RECORDS).read_text() == lines[0] + "\n"


def test_cost_model_starts_from_the_records_in_the_database(tuned):
    """A run on a folder that has records (resumed, or seeded with the dense form's) trains its
    cost model on every measured one before searching, instead of guessing blind."""
    work_dir, _ = tuned
    database = open_database(work_dir)
    measured = [r for r in database.get_all_tuning_records()
                if r.run_secs and max(float(s) for s in r.run_secs) < 1e9]
    model = warm_cost_model(database, resolve_target("x86").target)
    assert measured and model.data_size == len(measured)
    assert warm_cost_model(open_database(work_dir / "empty"), resolve_target("x86").target).data_size == 0


def test_incremental_retune_only_tunes_changed_layers(tuned):
    """Pruning the hidden layer changes two of the three matmuls; the first one is reused."""
    work_dir, first = tuned
    records = len(open_database(work_dir).get_all_tuning_records())
    pruned = codegen.tune(mlp(24), (X,), "x86", work_dir, trials_per_task=TRIALS, transfer=False)
    assert pruned.tasks_reused and pruned.tasks_tuned and not pruned.tasks_seeded
    assert len(pruned.tasks_reused) + len(pruned.tasks_tuned) == pruned.tasks_total
    assert pruned.trials_saved == len(pruned.tasks_reused) * TRIALS  # TRIALS < LIGHT_TRIALS: one budget for all
    assert len(open_database(work_dir).get_all_tuning_records()) > records  # appended, not rewritten
    compiled = codegen.build(mlp(24), (X,), "x86", tuning_db=work_dir)
    assert compiled.tuned_functions == compiled.total_functions


def test_a_pruned_form_starts_from_the_dense_forms_schedules(tuned, tmp_path):
    """The two matmuls pruning changed have no record; each gets schedules carried over from
    the dense form's records (tile sizes refactored to its extents), measured and committed,
    so the build tunes every function and the search has nothing left to run at this budget."""
    work_dir, first = tuned
    db = tmp_path / "db"
    shutil.copytree(work_dir, db)
    pruned = codegen.tune(mlp(20), (X,), "x86", db, trials_per_task=TRIALS)
    changed = pruned.tasks_total - len(pruned.tasks_reused)
    assert changed >= 2 and len(pruned.tasks_seeded) == changed, pruned.summary()
    assert pruned.trials_transferred >= changed and "2 tasks seeded" in pruned.summary()
    assert pruned.trials_run < changed * TRIALS  # the carried-over schedules count in each budget
    compiled = codegen.build(mlp(20), (X,), "x86", tuning_db=db)
    assert compiled.tuned_functions == compiled.total_functions
    assert rel_err(compiled.run(X), mlp(20)(X)) < 1e-4


def test_no_device_means_temporary_database(tmp_path):
    real = tmp_path / "real"
    with pytest.warns(UserWarning, match="temporary"):
        where, temporary = tuning_dir(resolve_target("cuda"), real, rpc_tracker=None)
    assert temporary and where != real and not real.exists()
    assert tuning_dir(resolve_target("cuda"), real, rpc_tracker="board:9190") == (real, False)
    assert tuning_dir(resolve_target("x86"), real, None) == (real, False)


def test_rpc_tracker_must_be_host_port_with_key():
    from graphprune.codegen.tuning import make_runner
    from graphprune.errors import TuningError

    with pytest.raises(TuningError, match="RPC tracker"):
        make_runner("no-port", "rpi4")
    with pytest.raises(TuningError, match="RPC tracker"):
        make_runner("board:9190", None)


def test_tuning_leaves_foreign_log_handlers_alone(tmp_path):
    """Handlers without a name (test runners and applications add them) on meta-schedule's logger
    and its parents: two tuning runs in a row both work, and every logger is left as it was."""
    import logging

    names = ["tvm.s_tir.meta_schedule", "tvm.s_tir", "tvm", ""]
    loggers = [logging.getLogger(n) for n in names]
    foreign = [logging.StreamHandler() for _ in loggers]
    for logger, handler in zip(loggers, foreign):
        logger.addHandler(handler)
    before = [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]
    try:
        for run in ("first", "second"):
            report = codegen.tune(mlp(32), (X,), "x86", tmp_path / run, trials_per_task=1)
            assert report.trials_run > 0, run
            assert any((tmp_path / run / "logs").glob("task_*.log")), run
        assert [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers] == before
        assert all(handler.stream is not None for handler in foreign)  # not closed by the tuning runs
    finally:
        for logger, handler in zip(loggers, foreign):
            logger.removeHandler(handler)


def test_shared_database_is_reused_by_the_next_model_and_read_by_build(tmp_path, monkeypatch):
    """With no folder named, tune writes the machine's shared database for the target, a second
    model sharing a layer shape reuses that layer's task, and build applies the records."""
    from graphprune.codegen.tuning import shared_database_dir

    monkeypatch.setenv("GRAPHPRUNE_TUNING_DB", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shared = shared_database_dir(resolve_target("x86"))
    assert shared.is_relative_to(tmp_path / "graphprune" / "tuning") and shared.name.startswith("x86-")
    first = codegen.tune(mlp(32), (X,), "x86", trials_per_task=1)
    assert first.work_dir == str(shared) and not first.tasks_reused
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    second = codegen.tune(other, (X,), "x86", trials_per_task=1)
    assert second.work_dir == str(shared) and second.tasks_reused  # the 16->32 linear + relu was tuned
    assert len(second.tasks_tuned) < second.tasks_total
    compiled = codegen.build(other, (X,), "x86")
    assert compiled.tuned_functions == compiled.total_functions
    assert rel_err(compiled.run(X), other(X)) < 1e-4


def test_a_task_tuned_in_two_budget_phases_keeps_one_log(tmp_path):
    """tune() asks for a task's logger once per budget phase; the task keeps one logger and one
    file, and a task of a later phase never writes into an earlier task's file."""
    from graphprune.codegen.tuning import TaskLoggers

    loggers = TaskLoggers(tmp_path)
    first = loggers.get("fused_matmul_add")
    assert loggers.get("fused_matmul_add") is first and len(first.handlers) == 1
    second = loggers.get("fused_tanh")
    assert second is not first
    second.info("tanh trial")
    loggers.close()
    assert not first.handlers and not second.handlers
    files = {p.name: p.read_text() for p in tmp_path.glob("task_*.log")}  # a file appears with its first line
    assert list(files) == ["task_001_fused_tanh.log"] and "tanh trial" in files["task_001_fused_tanh.log"]


def test_failed_trials_are_counted_and_named_in_the_report(tmp_path):
    """A candidate that fails to build or to run is a trial like any other in the curve, with
    the line of its error that says why; the report counts them and the summary names the first."""
    from tvm.s_tir import meta_schedule as ms

    recorder = CurveRecorder(["dense", "relu"], [1.0, 1.0])
    built, broken = ms.builder.BuilderResult("/tmp/x.tar", None), ms.builder.BuilderResult(
        None, "build failed:\nTraceback (most recent call last):\n  File \"x.py\"\nValueError: bad split")
    ran = ms.runner.RunnerResult(run_secs=[2e-3], error_msg=None)
    dropped = ms.runner.RunnerResult(run_secs=None, error_msg="RPCSessionTimeoutError: session closed\n")
    recorder.apply(ms.TaskScheduler.create("round-robin"), 0, [], [built, broken, built], [ran, dropped, dropped])
    report = TuningReport(work_dir=str(tmp_path), target="x86", tasks_total=2, tasks_tuned=["dense"], tasks_reused=[],
                          trials_per_task=3, trials_budget=6, trials_run=3, trials_saved=0, seconds=1.0,
                          temporary=False, curve=recorder.rows)
    assert [row.get("error") for row in report.curve] == [None, "ValueError: bad split",
                                                          "RPCSessionTimeoutError: session closed"]
    assert report.trials_failed == 2 and report.curve[2]["task_best_ms"] == 2.0
    assert "failed trials: 2 of 3; first error: ValueError: bad split" in report.summary()
    write_report(report)
    assert json.loads((tmp_path / "tuning_report.json").read_text())["failures"] == report.failures
    assert (tmp_path / "tuning_curve.csv").read_text().splitlines()[2].endswith(",ValueError: bad split")
