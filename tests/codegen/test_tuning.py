"""Tuning database: resumable, incremental re-tuning, curve files, no real DB without a device."""
import json

import pytest
import torch

import graphprune.codegen as codegen
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.tuning import open_database, tuning_dir

from .models import mlp, rel_err

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


def test_second_run_resumes_from_existing_records(tuned):
    work_dir, first = tuned
    records = len(open_database(work_dir).get_all_tuning_records())
    again = codegen.tune(mlp(32), (X,), "x86", work_dir, trials_per_task=TRIALS)
    assert again.tasks_tuned == [] and len(again.tasks_reused) == first.tasks_total
    assert again.trials_run == 0 and again.trials_saved == first.tasks_total * TRIALS
    assert len(open_database(work_dir).get_all_tuning_records()) == records


def test_incremental_retune_only_tunes_changed_layers(tuned):
    """Pruning the hidden layer changes two of the three matmuls; the first one is reused."""
    work_dir, first = tuned
    records = len(open_database(work_dir).get_all_tuning_records())
    pruned = codegen.tune(mlp(24), (X,), "x86", work_dir, trials_per_task=TRIALS)
    assert pruned.tasks_reused and pruned.tasks_tuned
    assert len(pruned.tasks_reused) + len(pruned.tasks_tuned) == pruned.tasks_total
    assert pruned.trials_saved == len(pruned.tasks_reused) * TRIALS
    assert len(open_database(work_dir).get_all_tuning_records()) > records  # appended, not rewritten
    compiled = codegen.build(mlp(24), (X,), "x86", tuning_db=work_dir)
    assert compiled.tuned_functions == compiled.total_functions


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
