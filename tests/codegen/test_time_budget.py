"""Tuning for a time budget: the policy (pure, on a fake clock) and one real timed run."""
import json

import pytest

import graphprune.codegen as codegen
from graphprune.codegen import tuning
from graphprune.codegen.time_budget import TaskState, next_task, run_for
from graphprune.codegen.tuning import extract_tasks, open_database, trials_done
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.frontend import import_model
from graphprune.codegen.targets import resolve_target

from .models import mlp
from .test_tuning import X


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_unmeasured_tasks_come_first_most_flops_first():
    states = [TaskState(1, 10, 5e-3, 64), TaskState(2, 100, None, 64), TaskState(1, 1000, None, 64)]
    assert next_task(states) == 2  # unmeasured, 1000 FLOPs x 1 call > 100 x 2
    states[2].best_seconds = 1e-4
    assert next_task(states) == 1


def test_measured_tasks_are_picked_by_latency_share_with_diminishing_returns():
    slow, fast = TaskState(3, 1, 2e-3, 64), TaskState(1, 1e9, 1e-3, 64)  # shares 6 ms and 1 ms
    assert next_task([slow, fast]) == 0  # the FLOPs no longer matter once both are measured
    slow.chunks_run = 6  # 6 ms / 7 < 1 ms / 1: the other task's first chunks are worth more now
    assert next_task([slow, fast]) == 1


def test_run_stops_before_a_chunk_that_would_pass_the_budget_and_spends_it_on_the_largest_share():
    clock = FakeClock()
    states = [TaskState(1, 1, 4e-3, 1000), TaskState(1, 1, 1e-3, 1000)]

    def chunk(i):
        clock.now += 10.0  # every chunk takes 10 s
        return states[i].best_seconds * 0.9

    order = run_for(95.0, states, chunk, chunk=8, clock=clock)
    assert clock.now <= 95.0 and len(order) == 9  # a 10th chunk would end at 100 s
    assert order.count(0) > order.count(1) > 0  # 4x the share, more chunks; the other not starved


def test_run_ends_when_every_task_has_used_its_trials_and_gives_up_on_a_task_that_never_measures():
    clock = FakeClock()
    states = [TaskState(1, 5, None, 8), TaskState(1, 1, None, 20)]
    order = run_for(1e6, states, lambda i: (None if i == 0 else 1e-3), chunk=8, clock=clock)
    assert order == [0, 1, 1, 1] and [s.trials_left for s in states] == [0, 0]


@pytest.mark.slow  # 30 s of real tuning; CI runs it with the codegen slow set
def test_a_timed_tune_records_its_budget_and_resumes(tmp_path, monkeypatch):
    """A real run on the 3-layer MLP: two short timed runs in one folder (stopping on time is
    the policy's, tested above on a fake clock); the second counts the first's trials as done, and
    every record it adds is either a search trial or a schedule carried over to a task the first
    run's budget did not reach.  Each run measures with one local runner, however many chunks."""
    work_dir = tmp_path / "db"
    minutes = 0.2
    made = []
    real = tuning.make_runner
    monkeypatch.setattr(tuning, "make_runner", lambda *a: made.append(a) or real(*a))
    first = codegen.tune(mlp(32), (X,), "x86", work_dir, minutes=minutes)
    assert first.minutes == minutes and first.trials_run > 0 and len(made) == 1
    target = resolve_target("x86")
    tasks = extract_tasks(fuse(import_model(mlp(32), (X,)).bound(), target.target), target.target)
    before = sum(trials_done(open_database(work_dir), tasks))
    second = codegen.tune(mlp(32), (X,), "x86", work_dir, minutes=minutes)
    after = sum(trials_done(open_database(work_dir), tasks))
    assert before > 0 and second.trials_saved == before
    assert after == before + second.trials_run + second.trials_transferred
    assert json.loads((work_dir / "tuning_report.json").read_text())["minutes"] == minutes
    assert "of a 0.2 min budget" in second.summary()


class _StubRunner:
    def __init__(self) -> None:
        self.pool = self
        self.stopped = False

    def shutdown(self) -> None:
        self.stopped = True


def test_one_local_runner_serves_every_chunk_and_rpc_runners_are_made_per_call(monkeypatch):
    """A LocalRunner's worker imports TVM (seconds): a run keeps one; an RPC runner is made as
    each call starts, so its board count is logged there."""
    made = []
    monkeypatch.setattr(tuning, "make_runner", lambda *a: made.append(a) or _StubRunner())
    local = tuning.Runners()
    runner = local()
    assert local() is runner and made == [()]
    local.close()
    assert runner.stopped and local() is not runner and len(made) == 2
    remote = tuning.Runners("host:9190", "board")
    assert remote() is not remote() and made[2:] == [("host:9190", "board")] * 2


def test_a_time_budget_must_be_positive():
    with pytest.raises(ValueError, match="minutes must be positive"):
        codegen.tune(mlp(32), (X,), "x86", minutes=0)
