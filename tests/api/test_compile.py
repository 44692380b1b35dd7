"""gp.compile on PyTorch models: one-shot and training methods, reports, saving, failures."""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphprune.compile import CompileResult, compile
from graphprune.errors import GraphPruneError, TuningError, UnsupportedModelError
from graphprune.target import Target

from ..cli.onnx_models import mlp_proto, require_onnx_frontend


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_obspa_compacts_and_leaves_the_user_model_alone(cnn, example):
    before = copy.deepcopy(cnn.state_dict())
    result = compile(cnn, example, method="obspa", target=Target(flops=0.5, multiple=1))
    assert isinstance(result, CompileResult)
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k
    r = result.report
    assert r.frontend == "torch" and r.method == "obspa" and r.source == "SmallCNN"
    assert r.params_after == n_params(result.model) < n_params(cnn) == r.params_before
    assert 0.4 < r.flops_removed < 0.7
    assert r.verify_error < 1e-4
    assert [w.before for w in r.widths] == [8, 16]
    # the report's widths are the compact model's (OBSPA may leave a layer whole)
    state = result.model.state_dict()
    assert [w.after for w in r.widths] == [state[f"gm.features.{i}.weight"].shape[0] for i in (0, 3)]
    assert any(w.after < w.before for w in r.widths)
    assert result.model(*example).shape == (2, 4)
    assert set(r.seconds) == {"trace", "obspa", "emit", "verify", "measure"}


def test_magnitude_is_the_l2_criterion(cnn, example):
    from graphprune.optim.oneshot import prune
    from graphprune.trace import trace

    result = compile(cnn, example, method="magnitude", target=Target(flops=0.3, multiple=1))
    g = trace(copy.deepcopy(cnn), example)
    prune(g, "l2", Target(flops=0.3))
    assert [w.after for w in result.report.widths] == [grp.size - int(m.sum())
                                                       for grp, m in zip(g.groups, g.zero_masks())]


def test_hesso_with_data_trains_and_prunes(cnn, example, batches):
    result = compile(cnn, example, method="hesso", target=Target(flops=0.5, multiple=1), data=batches,
                     eval_data=batches[:1], steps=20, lr=0.05)
    r = result.report
    assert r.flops_removed > 0.3 and r.verify_error < 1e-4
    assert r.history and r.history[-1]["flops_reduction"] > 0.3
    assert r.accuracy_on == "eval_data" and 0.0 <= r.accuracy_after <= 1.0
    assert [step for step, _ in r.accuracy_curve] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert "training.png" in r.plots() and "accuracy.png" in r.plots()


def test_training_method_runs_the_users_step(cnn, example, batches):
    calls = []

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        x, y = batches[len(calls) % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        calls.append(model.training)
        return loss

    result = compile(cnn, example, method="dhspg", target=0.4, train_fn=step, steps=12,
                     optimizer_options={"log_every": 3})
    assert len(calls) == 12 and all(calls)
    assert result.report.history[-1]["loss"] is not None
    assert result.report.accuracy_after is None  # no data, no accuracy


def test_save_writes_every_artefact(cnn, example, tmp_path, batches):
    result = compile(cnn, example, method="obspa", target=Target(flops=0.5, multiple=1), data=batches,
                     output=tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"model.onnx", "model.pt2", "report.md", "report.json", "widths.png"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy_on"] == "data" and report["params_after"] == result.report.params_after
    proto = onnx.load(tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), result.model(*example).detach(), rtol=1e-4, atol=1e-5)
    loaded = torch.export.load(tmp_path / "out" / "model.pt2").module()
    torch.testing.assert_close(loaded(*example), result.model(*example))
    assert "| parameters |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope"), "unknown method"),
    (dict(method="hesso"), "needs train_fn="),
    (dict(method="hesso", train_fn=lambda m, o: None), "steps= is needed"),
    (dict(method="hesso-cric", train_fn=lambda m, o: None, steps=5), "held-out batch"),
    (dict(tune_trials=5), "tuning needs a codegen target"),
    (dict(tune_minutes=2), "tuning needs a codegen target"),
])
def test_bad_arguments_say_what_to_do(cnn, example, kwargs, message):
    with pytest.raises(GraphPruneError, match=message) as info:
        compile(cnn, example, **kwargs)
    assert info.value.hint


def test_pytorch_model_needs_example_inputs(cnn):
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        compile(cnn)


def test_unreachable_target_is_reported(cnn, example):
    from graphprune.errors import UnprunableTargetError

    with pytest.raises(UnprunableTargetError):
        compile(cnn, example, target=Target(flops=0.9, min_units=8))


def test_missing_codegen_is_a_clear_error(cnn, example, monkeypatch):
    import graphprune

    monkeypatch.delattr(graphprune, "codegen", raising=False)
    monkeypatch.setitem(sys.modules, "graphprune.codegen", None)
    with pytest.raises(TuningError, match="code generation is not available") as info:
        compile(cnn, example, codegen="x86")
    assert "tvm" in info.value.hint


def test_codegen_x86_times_the_compact_model(cnn, example, tmp_path):
    pytest.importorskip("tvm")
    result = compile(cnn, example, method="obspa", target=Target(flops=0.5, multiple=1), codegen="x86", output=tmp_path)
    assert result.report.codegen == "x86" and result.report.latency["median_ms"] > 0
    out = result.runtime.run(*example)
    torch.testing.assert_close(torch.from_numpy(out), result.model(*example).detach(), rtol=1e-4, atol=1e-5)
    assert "x86" in repr(result) and "latency (x86" in result.summary()
    assert (tmp_path / "model.x86.so").stat().st_size > 0
    assert "## Code generation (x86)" in (tmp_path / "report.md").read_text()
    assert result.report.codegen_error < 1e-4  # the library was checked against the compact model
    assert result.report.codegen_from is None  # TVM imported the compact module itself
    assert "compiled (x86) == compact model" in result.summary()
    assert "the compiled library reproduces the compact model" in (tmp_path / "report.md").read_text()
    reference = result.report.reference  # onnxruntime on the same compact ONNX, same threads
    assert reference["runtime"] == "onnxruntime" and reference["median_ms"] > 0
    assert reference["threads"] == result.report.latency["threads"]
    ratio = result.report.latency["median_ms"] / reference["median_ms"]
    assert result.report.latency_ratio == pytest.approx(ratio)
    assert "onnxruntime on the same compact ONNX" in result.summary()
    assert "onnxruntime on the same compact ONNX" in (tmp_path / "report.md").read_text()
    n = result.report.schedules  # how each built function was scheduled, said in the summary and report
    assert sum(n.values()) == result.runtime.total_functions and n["tuned"] == result.runtime.tuned_functions
    assert f"schedules: {n['tuned']} tuned, {n['carried']} carried over" in result.summary()
    assert "schedules: " in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["latency_ratio"] == pytest.approx(ratio)


def test_codegen_builds_the_compact_onnx_where_tvm_cannot_import_the_module():
    """TVM's torch importer rejects the index op torch.export makes of ``nn.Unfold`` (timm's
    TNT); its ONNX importer takes the compact ONNX, which is built instead, and the report says so."""
    pytest.importorskip("tvm")
    import graphprune.codegen as codegen

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3, padding=1),
                                torch.nn.Unfold(2, stride=2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 16, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match="index_tensor"):
        codegen.build(model, (x,), target="x86")
    result = compile(model, x, method="l2", target=Target(flops=0.3, multiple=1), codegen="x86")
    assert result.report.flops_removed > 0.25 and result.report.codegen_error < 1e-4
    assert result.report.codegen_inputs == {i.name: [1, 3, 8, 8] for i in result.onnx.graph.input}
    assert "built from the compact ONNX (TVM's torch importer: " in result.summary()


def test_a_library_that_computes_something_else_is_an_error(cnn, example, tmp_path, monkeypatch):
    """A miscompiled library (here: every output nudged by 1% of its range) is refused, naming
    the target and the output, and nothing is saved."""
    pytest.importorskip("tvm")
    from graphprune.codegen.compiled import CompiledModel

    run = CompiledModel.run

    def nudged(self, *inputs):
        out = run(self, *inputs)
        return out + 0.01 * np.abs(out).max()

    monkeypatch.setattr(CompiledModel, "run", nudged)
    with pytest.raises(TuningError, match=r"built for x86 differs from the compact model .*output 0"):
        compile(cnn, example, method="l2", target=Target(flops=0.5, multiple=1), codegen="x86", output=tmp_path)
    assert not list(tmp_path.iterdir())


def test_report_says_plainly_when_the_build_is_slower_than_onnxruntime():
    from graphprune.report import Report

    report = Report(source="m", frontend="torch", method="obspa", target="0.5", params_before=10, params_after=5,
                    flops_before=10.0, flops_after=5.0, codegen="x86",
                    latency={"median_ms": 3.0, "repeat": 7, "threads": 2},
                    reference={"runtime": "onnxruntime", "median_ms": 2.0, "repeat": 7, "threads": 2})
    assert report.latency_ratio == pytest.approx(1.5)
    assert "1.50x SLOWER" in report.summary() and "1.50x SLOWER" in report.to_markdown()
    report.reference["median_ms"] = 6.0
    assert "2.00x faster" in report.summary() and "SLOWER" not in report.summary()
    report.reference = None
    assert report.latency_ratio is None and "onnxruntime" not in report.summary()


def test_onnx_input_gives_onnx_output():
    require_onnx_frontend()
    result = compile(mlp_proto(), method="obspa", target=Target(groups=0.25, multiple=1))
    assert isinstance(result.model, onnx.ModelProto) and result.onnx is result.model
    assert result.report.frontend == "onnx" and result.report.source == "mlp (ModelProto)"
    assert [(w.before, w.after) for w in result.report.widths] == [(16, 12)]
    with pytest.raises(GraphPruneError, match="cannot be trained"):
        compile(mlp_proto(), method="hesso", data=[(torch.ones(2, 8), torch.zeros(2, dtype=torch.long))], steps=2)
