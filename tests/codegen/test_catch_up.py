"""Functions slower than a wider function of their structure are named and tuned on
(:func:`graphprune.codegen.tuning.lagging`, :func:`~graphprune.codegen.tuning.catch_up`)."""
import shutil

import pytest
import torch
from tvm.s_tir import meta_schedule as ms

import graphprune.codegen as codegen
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.transfer import Donors, signature
from graphprune.codegen.tuning import (best_seconds, catch_up, extract_tasks, lagging, open_database,
                                       trials_done)

from .models import mlp

X = torch.randn(1, 16)


def _tasks(model):
    target = resolve_target("x86").target
    return target, extract_tasks(fuse(codegen.import_model(model, (X,)).bound(), target), target)


def _record_for(work_dir, task, target, seconds: float) -> None:
    """A measured record of ``seconds`` for ``task``, with the schedule of a record of the same
    structure (its time is all that :func:`lagging` reads)."""
    database = open_database(work_dir)
    donor = Donors(database).nearest(task.dispatched[0])[0]
    database.commit_tuning_record(ms.database.TuningRecord(
        donor.trace, database.commit_workload(task.dispatched[0]), [seconds], target, donor.args_info))


@pytest.fixture(scope="module")
def tuned_wide(tmp_path_factory):
    """The wide MLP tuned (once for the module: each test works on a copy)."""
    work_dir = tmp_path_factory.mktemp("catch_up") / "db"
    codegen.tune(mlp(32), (X,), "x86", work_dir, trials_per_task=1)
    return work_dir


@pytest.fixture()
def wide_db(tuned_wide, tmp_path):
    """A copy of the wide MLP's database, and a way to add records for the narrow one's
    changed functions: each ``factor`` times its wider counterpart's best."""
    work_dir = tmp_path / "db"
    shutil.copytree(tuned_wide, work_dir)

    def narrow(factor: float):
        target, tasks = _tasks(mlp(20))
        database = open_database(work_dir)
        changed = [t for t in tasks if best_seconds(database, t, target) is None]
        for task in changed:
            wider = Donors(database).wider_best(task.dispatched[0])
            assert wider is not None, task.task_name  # the wide MLP is wider in every extent
            _record_for(work_dir, task, target, factor * wider)
        return target, tasks, changed
    return work_dir, narrow


def test_a_function_slower_than_a_wider_one_lags_and_a_faster_one_does_not(wide_db):
    work_dir, narrow = wide_db
    target, tasks, changed = narrow(3.0)
    assert len(changed) >= 2
    names = {t.task_name for t in changed}
    # (an unchanged function may lag too: the first layer's one trial against the wider second's)
    assert names <= {t.task_name for t in lagging(open_database(work_dir), tasks, target)}
    # a faster record of each settles it
    for task in changed:
        _record_for(work_dir, task, target, 0.5 * Donors(open_database(work_dir)).wider_best(task.dispatched[0]))
    assert not names & {t.task_name for t in lagging(open_database(work_dir), tasks, target)}


def test_the_wider_function_is_wider_in_every_extent(wide_db):
    """A function larger in one extent and smaller in another is no bound on it."""
    work_dir, _ = wide_db
    _, tasks = _tasks(mlp(48))  # wider than the tuned MLP: nothing in the database is at least its size
    database = open_database(work_dir)
    larger = [t for t in tasks if best_seconds(database, t, resolve_target("x86").target) is None]
    assert larger and all(Donors(database).wider_best(t.dispatched[0]) is None for t in larger)
    assert all(signature(t.dispatched[0]) is not None for t in larger)


def test_catch_up_tunes_the_lagging_functions_only(wide_db):
    """The narrow MLP's changed functions lag 3x: they get trials (one round: twice the
    trials asked for), and only the functions it names do."""
    work_dir, narrow = wide_db
    target, tasks, changed = narrow(3.0)
    before = dict(zip((t.task_name for t in tasks), trials_done(open_database(work_dir), tasks)))
    tuned = catch_up(mlp(20), (X,), "x86", work_dir, trials_per_task=1, rounds=1)
    assert {t.task_name for t in changed} <= set(tuned)
    after = dict(zip((t.task_name for t in tasks), trials_done(open_database(work_dir), tasks)))
    for task in tasks:
        grew = after[task.task_name] > before[task.task_name]
        assert grew == (task.task_name in tuned), task.task_name
