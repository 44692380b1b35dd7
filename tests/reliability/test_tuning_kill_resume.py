"""A tuning run SIGKILLed mid-way resumes on the same folder and loses nothing it had written.

The run is a real process (``graphprune.codegen.tune`` for x86 on a 2-layer MLP, 2 trials
per task; the slow variant: the codegen tests' 3-layer MLP, 4 trials per task), killed as
soon as the database holds a tuning record, i.e. while it is still tuning. The restart must finish, keep every earlier line as a prefix of
the table (meta-schedule only appends), measure no (workload, trace) twice, and leave every
task covered. The kill is made to land mid-write too: if it did not tear the last line, the
test tears it by appending half a record, which is what a kill inside ``write()`` leaves.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from graphprune.codegen.tuning import repair_table

ROOT = Path(__file__).resolve().parents[2]
RECORDS = "database_tuning_record.json"
#: Tunes argv[1]'s model (a 2-layer MLP, 2 tasks, or the codegen tests' 3-layer one) into
#: argv[2] with argv[3] trials per task and prints the report as one JSON line.
DRIVER = """
import json, sys, torch
from tests.codegen.models import mlp
from graphprune.codegen import tune
torch.manual_seed(0)
model = mlp(32) if sys.argv[1] == "mlp3" else torch.nn.Sequential(
    torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
report = tune(model, (torch.randn(1, 16),), "x86", sys.argv[2], trials_per_task=int(sys.argv[3]))
print("REPORT " + json.dumps({"tuned": report.tasks_tuned, "reused": report.tasks_reused,
                              "total": report.tasks_total, "trials": report.trials_run}))
"""


def _start(model: str, trials: int, work_dir: Path, log: Path) -> subprocess.Popen:
    """The tuning driver in its own process group, so that a kill reaches its builder and
    runner workers (meta-schedule's popen pools) too. Output goes to ``log``, not a pipe
    nobody reads while polling (a full pipe would stall the run)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", DRIVER, model, str(work_dir), str(trials)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Every tuning process a test starts; killed (with its workers) whatever the outcome."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        _kill_group(proc)


def _lines(path: Path) -> list[bytes]:
    """The complete lines of a table (a torn tail without a newline is not one)."""
    data = path.read_bytes() if path.exists() else b""
    return data[:data.rfind(b"\n") + 1].splitlines(keepends=True)


@pytest.mark.parametrize("model, trials", [
    ("mlp2", 2),
    pytest.param("mlp3", 4, marks=pytest.mark.slow),  # ~90 s: 4 records per task, the kill can split a batch
])
def test_killed_run_resumes_without_losing_or_repeating_records(tmp_path, processes, model, trials):
    work_dir = tmp_path / "mlp-x86"
    table = work_dir / RECORDS
    first = _start(model, trials, work_dir, tmp_path / "first.log")
    processes.append(first)
    deadline = time.monotonic() + 240
    while not _lines(table):
        assert first.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-4000:]}"
        assert time.monotonic() < deadline, "no tuning record was written"
        time.sleep(0.05)
    _kill_group(first)
    assert first.returncode == -signal.SIGKILL
    before = _lines(table)
    torn_by_kill = not table.read_bytes().endswith(b"\n")
    if not torn_by_kill:
        with open(table, "ab") as f:
            f.write(before[-1][: len(before[-1]) // 2])

    second = _start(model, trials, work_dir, tmp_path / "second.log")
    processes.append(second)
    second.wait(timeout=240)
    out = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, out[-4000:]
    report = json.loads(out.rsplit("REPORT ", 1)[1])
    after = _lines(table)
    print(f"\nrecords before the kill: {len(before)} (last line torn by the kill: {torn_by_kill}); "
          f"after the restart: {len(after)}; tasks tuned again: {report['tuned']}, reused: {report['reused']}")

    assert "interrupted tuning run" in out  # open_database repaired the torn line, and said so
    assert table.read_bytes().endswith(b"\n")
    assert after[:len(before)] == before
    records = [json.loads(line) for line in after]
    keys = [(workload, json.dumps(record[0], sort_keys=True)) for workload, record in records]
    assert len(set(keys)) == len(keys), "a (workload, trace) was measured twice"
    assert report["reused"] and report["tuned"] and len(report["reused"]) + len(report["tuned"]) == report["total"]
    assert len(after) > len(before)
    assert len({workload for workload, _ in keys}) == report["total"]  # every task has records now


@pytest.mark.parametrize("tail, expected", [
    (b'[0,[["GetSBlock"', b""),  # the kill landed inside the line: the prefix is cut off
    (b'[0,[1.5]]', b'[0,[1.5]]\n'),  # ... between the line and its newline: the newline is added
])
def test_repair_makes_the_last_line_whole(tmp_path, tail, expected):
    table = tmp_path / RECORDS
    table.write_bytes(b'[0,[0.5]]\n' + tail)
    assert repair_table(table) is not None
    assert table.read_bytes() == b'[0,[0.5]]\n' + expected
    assert repair_table(table) is None  # a whole table is left alone
