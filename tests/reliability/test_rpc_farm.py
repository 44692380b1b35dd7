"""Tuning through a TVM RPC farm: a tracker and two servers on loopback, as real processes.

This is the README's "Scaling out" recipe shrunk to one machine: both servers register the
same key, graphprune tunes a 2-layer MLP for x86 through the tracker, every candidate is
measured on a server of the farm, and the build then applies the records. Everything binds
to 127.0.0.1 on free ports, and the fixture stops every process it started (and the
sessions the servers fork) whatever the outcome.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")

import graphprune.codegen as codegen  # noqa: E402
from graphprune.codegen.tuning import make_runner  # noqa: E402
from graphprune.errors import TuningError  # noqa: E402

from ..codegen.models import rel_err  # noqa: E402

KEY = "graphprune-test"
X = torch.randn(1, 16)


def _model() -> torch.nn.Module:
    """Two tuning tasks (matmul+add+relu, matmul+add)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Farm:
    tracker: str
    server_logs: list[Path]


def _servers_registered(port: int) -> int:
    from tvm import rpc

    summary = rpc.connect_tracker("127.0.0.1", port).summary()
    addresses = [info["addr"][0] for info in summary["server_info"] if info["key"] == f"server:{KEY}"]
    assert set(addresses) <= {"127.0.0.1"}, summary
    return len(addresses)


@pytest.fixture(scope="module")
def farm(tmp_path_factory) -> Iterator[Farm]:
    """A tracker and two servers (key ``graphprune-test``), each in its own process group so
    that stopping it also stops the session processes the server forks."""
    logs = tmp_path_factory.mktemp("farm")
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> Path:
        log = logs / f"{name}.log"
        with open(log, "w") as out:
            started.append(subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        return log

    try:
        port = _free_port()
        start("tracker", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
              "--port-end", str(port + 1))
        server_logs = []
        for i in range(2):
            own = _free_port()
            server_logs.append(start(f"server{i}", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                     "--key", KEY, "--host", "127.0.0.1", "--port", str(own),
                                     "--port-end", str(own + 1)))
        deadline = time.monotonic() + 60
        while True:
            for proc in started:
                assert proc.poll() is None, "\n".join(p.read_text()[-2000:] for p in logs.glob("*.log"))
            try:
                if _servers_registered(port) == 2:
                    break
            except (RuntimeError, OSError, ValueError):
                pass  # the tracker is not listening yet
            assert time.monotonic() < deadline, "the RPC servers did not register with the tracker"
            time.sleep(0.5)
        yield Farm(f"127.0.0.1:{port}", server_logs)
    finally:
        for proc in started:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


def test_tuning_measures_on_the_farm_and_the_build_uses_the_records(farm, tmp_path):
    """Every candidate goes to the farm. One that fails there (a loaded 2-core CI host has
    dropped one) is counted and named in the report, like any failed trial; each task must
    still get a measured schedule, or the build below finds no record to apply."""
    work_dir = tmp_path / "mlp-x86-rpc"
    report = codegen.tune(_model(), (X,), "x86", work_dir, trials_per_task=3, rpc_tracker=farm.tracker, rpc_key=KEY)
    print("\n" + report.summary())
    assert not report.temporary and report.tasks_total == 2 and len(report.tasks_tuned) == 2
    records = [json.loads(line) for line in (work_dir / "database_tuning_record.json").read_text().splitlines()]
    assert len(records) == report.trials_run > 0
    measured = sum(max(record[1][1]) < 1e9 for record in records)
    assert report.trials_failed == len(records) - measured, report.failures
    served = [log.read_text().count("load_module") for log in farm.server_logs]
    print(f"candidates measured: {measured} of {len(records)}, by server: {served}")
    assert measured <= sum(served) <= len(records)  # every measurement went through the farm, none ran locally
    scheduler_log = next((work_dir / "logs").glob("*task_scheduler.log")).read_text()
    assert "RPCRunner: max_workers = 2" in scheduler_log  # one connection per registered board

    compiled = codegen.build(_model(), (X,), "x86", tuning_db=work_dir)
    assert compiled.tuned_functions == compiled.total_functions == 2
    assert rel_err(compiled.run(X), _model()(X)) < 1e-4


def test_key_without_boards_fails_before_tuning(farm):
    with pytest.raises(TuningError, match="no device registered"):
        make_runner(farm.tracker, "no-such-board")
