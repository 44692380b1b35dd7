"""aarch64 build run under qemu matches torch (skips without the cross toolchain)."""
import pytest
import torch

import graphprune.codegen as codegen
from graphprune.codegen.qemu import run_under_qemu, toolchain_missing

from .models import SmallCNN, rel_err, seeded


@pytest.mark.skipif(toolchain_missing() is not None, reason=str(toolchain_missing()))
def test_aarch64_library_runs_under_qemu(tmp_path):
    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    library = codegen.build(model, (x,), target="arm").export(tmp_path / "cnn_arm.so")
    (out,) = run_under_qemu(library, [x.numpy()])
    assert rel_err(out, model(x)) < 1e-4
