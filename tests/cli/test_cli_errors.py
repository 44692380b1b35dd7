"""Every way a shell user can get it wrong: a clear message, the documented exit code, no output file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from graphprune import cli
from graphprune.errors import ZeroInvarianceError
from graphprune.prunable import PrunableGraph

from .conftest import run_cli, run_main


def files_in(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(os.listdir(folder))


def test_help_shows_examples_and_exit_codes(capsys):
    top = run_cli("--help")
    assert top.returncode == 0
    assert "examples:" in top.stdout and "exit codes:" in top.stdout
    for command in ("inspect", "prune", "compile", "tune"):
        code, out, _ = run_main(capsys, command, "--help")
        assert code == 0
        assert "usage: graphprune " + command in out and "examples:" in out


def test_usage_errors_exit_2(capsys):
    assert run_main(capsys)[0] == cli.EXIT_USAGE
    code, _, err = run_main(capsys, "prune", "m.onnx", "--flops", "1.5")
    assert code == cli.EXIT_USAGE
    assert "not a fraction" in err and "--help" in err
    assert run_main(capsys, "prune", "m.onnx", "--flops", "0.3", "--params", "0.3")[0] == cli.EXIT_USAGE
    assert run_main(capsys, "prune", "m.onnx", "--criterion", "taylor")[0] == cli.EXIT_USAGE


def test_missing_file(tmp_path):
    out = tmp_path / "out.onnx"
    r = run_cli("prune", tmp_path / "nope.onnx", "-o", out)
    assert r.returncode == cli.EXIT_BAD_INPUT
    assert "no such file" in r.stderr and "nope.onnx" in r.stderr and "hint:" in r.stderr
    assert files_in(tmp_path) == []


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model at all")
    r = run_cli("prune", bad, "-o", tmp_path / "out.onnx", "--json")
    assert r.returncode == cli.EXIT_BAD_INPUT, r.stderr
    assert "bad.onnx" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["exit_code"] == cli.EXIT_BAD_INPUT
    assert files_in(tmp_path) == ["bad.onnx"]


@pytest.mark.parametrize("cut", [0, 2], ids=["empty", "truncated"])
def test_empty_or_truncated_file(tmp_path, onnx_dir, capsys, cut):
    data = (onnx_dir / "cnn.onnx").read_bytes()
    model = tmp_path / "cut.onnx"
    model.write_bytes(data[: len(data) // cut] if cut else b"")
    code, _, err = run_main(capsys, "prune", model, "-o", tmp_path / "out.onnx")
    assert code == cli.EXIT_BAD_INPUT
    assert "cut.onnx" in err
    assert files_in(tmp_path) == ["cut.onnx"]


def test_unwritable_output_folder(tmp_path, onnx_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("folders cannot live inside a file")
    r = run_cli("prune", onnx_dir / "cnn.onnx", "-o", blocker / "out.onnx")
    assert r.returncode == cli.EXIT_OUTPUT
    assert "cannot write" in r.stderr and "Traceback" not in r.stderr
    assert files_in(tmp_path) == ["a-file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, onnx_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_main(capsys, "prune", onnx_dir / "cnn.onnx", "-o", locked / "out.onnx")
    finally:
        locked.chmod(0o755)
    assert code == cli.EXIT_OUTPUT and "cannot write" in err
    assert files_in(locked) == []


def test_output_must_not_overwrite_input(tmp_path, onnx_dir, capsys):
    model = tmp_path / "cnn.onnx"
    model.write_bytes((onnx_dir / "cnn.onnx").read_bytes())
    code, _, err = run_main(capsys, "prune", model, "-o", model)
    assert code == cli.EXIT_BAD_INPUT and "overwrite the input" in err
    assert model.read_bytes() == (onnx_dir / "cnn.onnx").read_bytes()


def test_unreachable_target_exits_4_and_writes_nothing(tmp_path, onnx_dir, onnx_ready, capsys):
    code, _, err = run_main(capsys, "prune", onnx_dir / "cnn.onnx", "-o", tmp_path / "out.onnx",
                            "--flops", "0.95", "--min-units", "8")
    assert code == cli.EXIT_UNPRUNABLE
    assert "cannot be met" in err and "hint:" in err
    assert files_in(tmp_path) == []


def test_tune_trials_without_codegen_is_refused(tmp_path, onnx_dir, capsys):
    code, _, err = run_main(capsys, "compile", onnx_dir / "cnn.onnx", "--tune-trials", "5", "-o", tmp_path / "out")
    assert code == cli.EXIT_USAGE
    assert "--codegen" in err
    assert files_in(tmp_path) == []


def test_mismatching_compact_model_is_not_written(tmp_path, onnx_dir, onnx_ready, monkeypatch, capsys):
    """The onnxruntime check against the zeroed input model stops a wrong model from being written."""
    emit = PrunableGraph.construct_subnet

    def broken(self: PrunableGraph) -> onnx.ModelProto:
        proto = emit(self)
        init = proto.graph.initializer[0]
        array = onnx.numpy_helper.to_array(init) + 1.0
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
        return proto

    monkeypatch.setattr(PrunableGraph, "construct_subnet", broken)
    out = tmp_path / "out.onnx"
    code, _, err = run_main(capsys, "prune", onnx_dir / "cnn.onnx", "-o", out, "--multiple", "1")
    assert code == cli.EXIT_MISMATCH
    assert "differs from the zeroed model" in err
    assert files_in(tmp_path) == []
    assert cli.exit_code(ZeroInvarianceError("x")) == cli.EXIT_MISMATCH


def test_exit_code_table_matches_help():
    assert f"{cli.EXIT_CODEGEN} code generation" in cli.EPILOG
    assert f"{cli.EXIT_OUTPUT} cannot write output" in cli.EPILOG


@pytest.mark.parametrize("argv, message", [
    (["compile", "m.onnx", "--tune-minutes", "5"], "tuning needs --codegen"),
    (["compile", "m.onnx", "--codegen", "x86", "--tune-minutes", "0"], "must be > 0"),
    (["tune", "m.onnx", "--minutes", "-1"], "must be > 0"),
])
def test_time_budget_flags_are_checked_before_anything_runs(argv, message, capsys):
    from graphprune.cli import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
