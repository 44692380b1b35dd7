"""Input shapes from the user for models with dynamic height and width: ``--input-shape`` and
``--inputs``, the errors for what is missing or wrong, the compact file's dynamic axes (kept,
and exact at sizes it was not traced at), and code generation of such a file."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from graphprune.errors import ShapeMismatchError

from .conftest import run_main
from .dynamic_models import export_fpn

pytestmark = pytest.mark.usefixtures("onnx_ready")


@pytest.fixture(scope="module")
def fpn(tmp_path_factory: pytest.TempPathFactory):
    return export_fpn(tmp_path_factory.mktemp("fpn") / "fpn.onnx")


def dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_dynamic_height_without_a_shape_names_the_input_and_dim(fpn, capsys):
    code, _, err = run_main(capsys, "inspect", fpn)
    assert code == 3
    assert "input 'images' has a dynamic height 'height'" in err and "--input-shape images=1x3x" in err
    with pytest.raises(ShapeMismatchError, match="dynamic height 'height'"):
        gp.trace(str(fpn))  # the same from Python, never a 1 that crashes in onnxruntime


@pytest.mark.parametrize("args, code, words", [
    (["--input-shape", "1x3xx40"], 2, "is not a shape"),
    (["--input-shape", "img=1x3x40x56"], 3, "no input 'img'"),
    (["--input-shape", "images=1x3x40"], 3, "has rank 4"),
    (["--input-shape", "1x4x40x56"], 3, "static channels (3)"),
    (["--input-shape", "1x3x40x56", "--input-shape", "images=1x3x40x56"], 3, "twice"),
])
def test_bad_input_shapes(fpn, capsys, args, code, words):
    got, _, err = run_main(capsys, "inspect", fpn, *args)
    assert got == code and words in err, err


def test_inputs_npz(fpn, tmp_path, capsys):
    good, bad = tmp_path / "x.npz", tmp_path / "other.npz"
    np.savez(good, images=np.random.default_rng(0).standard_normal((1, 3, 40, 56)).astype(np.float32))
    np.savez(bad, pixels=np.zeros((1, 3, 40, 56), np.float32))
    code, out, err = run_main(capsys, "inspect", fpn, "--inputs", good, "--json")
    assert code == 0, err
    assert json.loads(out)["groups"]
    code, _, err = run_main(capsys, "inspect", fpn, "--inputs", bad)
    assert code == 3 and "no input 'pixels'" in err


def test_compact_keeps_dynamic_axes_and_is_exact_at_other_sizes(fpn):
    """Property: for the traced detector and half of every group zeroed, the compact file keeps
    the symbolic batch/height/width and equals the zeroed full model at sizes it never saw."""
    g = gp.trace(str(fpn), (np.random.default_rng(0).standard_normal((1, 3, 40, 56)).astype(np.float32),))
    assert len(g.groups) >= 4 and not g.withdrawn
    assert g.backend.second is not None and g.backend.second["images"].shape == (2, 3, 48, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for grp in g.groups:
            mask = torch.zeros(grp.size, dtype=torch.bool)
            mask[torch.randperm(grp.size, generator=gen)[: grp.size // 2]] = True
            grp.scatter_(g.params, mask)
    compact, full = g.construct_subnet(), g.backend.full(g, g.params)
    assert sum(int(np.prod(i.dims)) for i in compact.graph.initializer) < \
        sum(int(np.prod(i.dims)) for i in full.graph.initializer)
    assert dims(compact.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(compact.graph.output[0]) == ["batch", 6, "out_h", "out_w"]
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 40, 56), (3, 3, 37, 90), (2, 3, 64, 24)]:
        x = rng.standard_normal(shape).astype(np.float32)
        ref, out = ort_run(full, x), ort_run(compact, x)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prune_then_compile_x86_of_the_compact_file(fpn, tmp_path, capsys):
    """The compact file of a dynamic detector (pads and Resize sizes from Shape) builds with
    TVM from the shell, and the library computes what onnxruntime computes."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    small = tmp_path / "fpn.small.onnx"
    code, _, err = run_main(capsys, "prune", fpn, "--input-shape", "images=2x3x40x56", "-o", small, "--flops", "0.4")
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "compile", small, "--input-shape", "1x3x44x60", "--flops", "0.2", "--codegen",
                            "x86", "--multiple", "1", "-o", out)  # already pruned: no width left on x86's 16 lanes
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["codegen_inputs"] == {"images": [1, 3, 44, 60]}
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.x86.so")), tvm.cpu())
    x = np.random.default_rng(2).standard_normal((1, 3, 44, 60)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_run(str(out / "model.onnx"), x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_tune_binds_the_given_shape(fpn, tmp_path, capsys):
    """``graphprune tune`` imports the dynamic file at the given shape (no trials: the import
    and task extraction are what is under test; tuning itself is tested elsewhere)."""
    pytest.importorskip("tvm")
    code, out, err = run_main(capsys, "tune", fpn, "--input-shape", "1x3x40x56", "--trials", "0", "--db",
                              tmp_path / "db", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert any(t.startswith("resize") for t in report["tasks_tuned"] + report["tasks_reused"]), report
    code, _, err = run_main(capsys, "tune", fpn, "--trials", "0", "--db", tmp_path / "db")
    assert code == 3 and "dynamic height" in err


@pytest.mark.slow
def test_tune_the_compact_file_for_real(fpn, tmp_path, capsys):
    """A few real trials on the compact file of the dynamic detector (the issue's failure)."""
    pytest.importorskip("tvm")
    small = tmp_path / "fpn.small.onnx"
    code, _, err = run_main(capsys, "prune", fpn, "--input-shape", "images=1x3x40x56", "-o", small)
    assert code == 0, err
    code, out, err = run_main(capsys, "tune", small, "--input-shape", "1x3x40x56", "--trials", "2", "--db",
                              tmp_path / "db", "--json")
    assert code == 0, err
    assert json.loads(out)["trials_run"] > 0


def test_api_takes_inputs_by_name(fpn):
    """``gp.compile`` of the dynamic file with its input given by name: checked at a second
    size of each dynamic axis too, and the compact model keeps them."""
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 48)).astype(np.float32)
    r = gp.compile(str(fpn), {"images": x}, method="l1", target=0.3)
    assert r.graph.backend.second["images"].shape == (2, 3, 64, 64)
    assert r.report.verify_error < 1e-4 and r.report.flops_removed > 0.2
    assert dims(r.model.graph.input[0]) == ["batch", 3, "height", "width"]
