"""Run the CLI as a user does (``python -m graphprune ...`` in a subprocess), or in-process where
only the command's logic is under test (each subprocess pays ~4 s importing torch), and the
ONNX files it reads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from .onnx_models import export, mlp_proto, require_onnx_frontend, resnet18_onnx, small_cnn

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m graphprune *args``; stdout/stderr captured as text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``graphprune *args`` in this process: (exit code, stdout, stderr)."""
    from graphprune import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention folder of input models; tests write their outputs elsewhere."""
    folder = tmp_path_factory.mktemp("onnx")
    export(small_cnn(), torch.randn(1, 3, 16, 16), folder / "cnn.onnx")
    onnx.save(mlp_proto(), folder / "mlp.onnx")
    return folder


@pytest.fixture(scope="session")
def resnet18_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resnet18_onnx(tmp_path_factory.mktemp("resnet") / "resnet18.onnx")


@pytest.fixture
def onnx_ready() -> None:
    require_onnx_frontend()
