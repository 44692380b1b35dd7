"""Never a silent "0 groups": inspect says why nothing can be pruned, prune exits 4 and writes
nothing, ``summary()`` lists withdrawn groups with their reasons, and gp.compile's report
says when pruning left the model unchanged."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.errors import UnprunableTargetError
from graphprune.frontends.onnx_backend import OnnxBackend

from .conftest import run_main
from .onnx_models import mlp_proto

pytestmark = pytest.mark.usefixtures("onnx_ready")


def _model(nodes: list, inits: list, width: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def no_parameters() -> onnx.ModelProto:
    """Elementwise ops only: nothing to slice."""
    return _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("Add", ["r", "x"], ["y"], name="add")], [])


def all_behind_a_barrier() -> onnx.ModelProto:
    """Gemm -> CumSum over the features -> Gemm: the running sum mixes every hidden unit into
    every later one, so neither layer's hidden units can go."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (16, 8)), ("W2", (8, 16)))]
    inits.append(numpy_helper.from_array(np.array(1, np.int64), "axis"))
    return _model([helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
                   helper.make_node("CumSum", ["h", "axis"], ["c"], name="running_sum"),
                   helper.make_node("Gemm", ["c", "W2"], ["y"], name="fc2", transB=1)], inits)


@pytest.mark.parametrize("build, words", [
    (no_parameters, "no parameters found"),
    (all_behind_a_barrier, "all held by barriers (1): running_sum [onnx::CumSum]"),
])
def test_inspect_says_why_and_prune_exits_4_writing_nothing(tmp_path, capsys, build, words):
    src, out = tmp_path / "m.onnx", tmp_path / "m.small.onnx"
    onnx.save(build(), src)
    code, text, err = run_main(capsys, "inspect", src)
    assert code == 0, err
    assert "0 groups" in text and "nothing to prune: " in text and words in text
    code, text, err = run_main(capsys, "inspect", src, "--json")
    assert words in json.loads(text)["why_no_groups"]
    code, _, err = run_main(capsys, "prune", src, "-o", out)
    assert code == 4 and "nothing to prune: " in err and words in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_every_group_withdrawn_is_explained(tmp_path, capsys, monkeypatch):
    """A compact model that never matches (a stand-in for a model whose every group fails the
    check) withdraws every group; the summary and the CLI give the first reasons."""
    src, out = tmp_path / "mlp.onnx", tmp_path / "mlp.small.onnx"
    onnx.save(mlp_proto(), src)
    monkeypatch.setattr(OnnxBackend, "compare", lambda self, pg, tensors, removed=None, example=None: 0.5)
    g = gp.trace(str(src))
    assert not g.groups and len(g.withdrawn) == 1
    summary = g.summary()
    assert "withdrawn groups:" in summary and "compact output differs (rel. error 5.00e-01)" in summary
    assert "every group (1) failed the zero-invariance check" in g.why_no_groups
    code, _, err = run_main(capsys, "prune", src, "-o", out)
    assert code == 4 and "failed the zero-invariance check" in err and "rel. error 5.00e-01" in err
    assert not out.exists()
    with pytest.raises(UnprunableTargetError, match="nothing to prune"):
        gp.compile(str(src))


def test_compile_report_says_when_the_model_is_unchanged():
    r = gp.compile(mlp_proto(), method="l1", target=gp.Target(params=0.0))
    assert r.report.unchanged is not None and "left the model unchanged" in r.report.unchanged
    assert r.report.unchanged in r.report.summary() and r.report.unchanged in r.report.to_markdown()
    assert r.report.to_dict()["unchanged"] == r.report.unchanged
    pruned = gp.compile(mlp_proto(), method="l1", target=gp.Target(params=0.3))
    assert pruned.report.unchanged is None
