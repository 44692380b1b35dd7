"""prune(): every criterion meets its target, zeroes exactly the chosen units, and the
compact model computes what the zeroed model computes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.functional import cross_entropy

from tests.oneshot.conftest import EXAMPLE_BATCH, MLP, ConvNet, accuracy, batches, conv_flops, conv_groups, mlp_flops, mlp_groups, standin, \
    randomize_norms, zero_units
from graphprune.errors import GraphPruneError, UnprunableTargetError
from graphprune.optim.oneshot import PruneReport, finetune, prune
from graphprune.optim.scoring import CRITERIA
from graphprune.target import Target

X = torch.rand(EXAMPLE_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(n)]


def _largest_step(g, kind: str) -> float:
    total = g.total_flops if kind == "flops" else g.total_params
    return max((grp.flops_per_unit if kind == "flops" else grp.params_per_unit) for grp in g.groups) / total


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_meets_target_zeroes_units_and_compacts(graph, criterion: str, scope: str) -> None:
    target = Target(flops=0.3)
    report = prune(graph, criterion, target, data=_data(), loss_fn=cross_entropy, scope=scope)

    got = report.achieved["flops"]
    assert target.flops <= got <= target.flops + max(0.02, _largest_step(graph, "flops"))
    if isinstance(graph.model, MLP):  # fine-grained units: the ±2% the brief asks for
        assert got == pytest.approx(target.flops, abs=0.02)
    for m, z in zip(report.masks, zero_units(graph.groups, graph.params)):
        assert torch.equal(m, z), "exactly the chosen units are all-zero"
    compact = graph.construct_subnet()
    with torch.no_grad():
        torch.testing.assert_close(compact(X), graph.model(X), rtol=1e-5, atol=1e-5)


def test_params_target_and_multiple(graph) -> None:
    report = prune(graph, "l2", Target(params=0.25, multiple=4), scope="layer")
    assert report.achieved["params"] >= 0.25
    for grp, m in zip(graph.groups, report.masks):
        assert (grp.size - int(m.sum())) % 4 == 0


def test_layer_scope_is_uniform(graph) -> None:
    report = prune(graph, "l1", Target(groups=0.5), scope="layer")
    fractions = [int(m.sum()) / grp.size for grp, m in zip(graph.groups, report.masks)]
    assert max(fractions) - min(fractions) <= 1 / min(grp.size for grp in graph.groups)


def test_zero_target_changes_nothing(graph) -> None:
    before = {n: p.detach().clone() for n, p in graph.params.items()}
    report = prune(graph, "obspa", 0.0)
    assert all(int(m.sum()) == 0 for m in report.masks)
    assert all(torch.equal(before[n], p) for n, p in graph.params.items())


def test_report_is_readable(graph) -> None:
    report = prune(graph, "obspa", 0.3)
    assert isinstance(report, PruneReport) and "obspa" in repr(report)
    assert report.removed == {f"{g.name}#{g.id}": (int(m.sum()), g.size) for g, m in zip(graph.groups, report.masks)}
    assert all(g.name in report.summary() for g in graph.groups)


def test_gradient_criteria_need_data(graph) -> None:
    with pytest.raises(GraphPruneError, match="data"):
        prune(graph, "taylor", 0.3)


def test_gradient_criteria_need_a_model(graph) -> None:
    graph.model = None  # an ONNX graph has no differentiable model
    with pytest.raises(GraphPruneError, match="differentiable"):
        prune(graph, "hessian", 0.3, data=_data(), loss_fn=cross_entropy)


def test_unknown_options_fail_clearly(graph) -> None:
    with pytest.raises(GraphPruneError, match="criterion"):
        prune(graph, "random", 0.3)
    with pytest.raises(GraphPruneError, match="scope"):
        prune(graph, "l1", 0.3, scope="block")
    with pytest.raises(UnprunableTargetError):
        prune(graph, "l1", Target(groups=0.999))


def _logit_error(model, compact, x) -> float:
    with torch.no_grad():
        return float((model(x) - compact(x)).pow(2).mean())


@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_obspa_compensation_helps_a_trained_model(trained, digits, name: str) -> None:
    """Without fine-tuning, the OBS update keeps the compact model closer to the original."""
    x, y = digits[0][1200:], digits[1][1200:]
    groups, flops = (conv_groups, conv_flops) if name == "conv" else (mlp_groups, mlp_flops)
    errors, accs = {}, {}
    for comp in (False, True):
        g = standin(copy.deepcopy(trained[name]), groups, flops)
        prune(g, "obspa", 0.5, compensate_consumers=comp)
        compact = g.construct_subnet()
        errors[comp], accs[comp] = _logit_error(trained[name], compact, x), accuracy(compact, x, y)
    assert errors[True] < errors[False]
    assert accs[True] >= accs[False] - 0.01


def test_prune_then_finetune_recovers(trained, digits) -> None:
    x, y = digits
    g = standin(copy.deepcopy(trained["mlp"]), mlp_groups, mlp_flops)
    prune(g, "l2", 0.6)
    compact = g.construct_subnet()
    before = accuracy(compact, x[1200:], y[1200:])
    finetune(compact, batches(x[:1200], y[:1200]), cross_entropy, epochs=2, lr=0.05)
    assert accuracy(compact, x[1200:], y[1200:]) > max(before, 0.8)


def test_prune_at_init_then_train(digits) -> None:
    """Pruning an untrained model gives a smaller model that still trains."""
    x, y = digits
    torch.manual_seed(0)
    g = standin(ConvNet().eval(), conv_groups, conv_flops)
    report = prune(g, "obspa", 0.5)
    compact = g.construct_subnet()
    assert sum(p.numel() for p in compact.parameters()) < g.total_params
    assert report.achieved["flops"] >= 0.5
    finetune(compact, batches(x[:1200], y[:1200]), cross_entropy, epochs=3, lr=0.05)
    assert accuracy(compact, x[1200:], y[1200:]) > 0.8


def test_finetune_options(trained, digits) -> None:
    x, y = digits
    model = copy.deepcopy(trained["mlp"])
    finetune(model, iter(batches(x[:256], y[:256])), cross_entropy, optimizer="adam", lr=1e-3)
    assert not model.training
    with pytest.raises(GraphPruneError, match="optimizer"):
        finetune(model, batches(x[:64], y[:64]), cross_entropy, optimizer="lion")


def _run_onnx(proto, params: dict[str, torch.Tensor], x: torch.Tensor):
    """Run ``proto`` with its initializers replaced by ``params`` (the zeroed full model)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for init in model.graph.initializer:
        if init.name in params:
            init.CopyFrom(numpy_helper.from_array(params[init.name].detach().cpu().numpy(), init.name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _onnx_convnet(tmp_path, train: bool = False):
    """A ConvNet exported in training mode (BatchNormalization stays a node) and traced from ONNX."""
    import graphprune as gp

    torch.manual_seed(0)
    model = randomize_norms(ConvNet())
    path = tmp_path / "convnet.onnx"
    torch.onnx.export(model, (X,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return model, path, gp.trace(str(path))


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_onnx_compact_matches_zeroed(tmp_path, criterion: str) -> None:
    """ONNX in, ONNX out, for every criterion (taylor/hessian differentiate the graph's own
    torch program): the compact model (onnxruntime) equals the zeroed full model."""
    import onnx

    _, path, g = _onnx_convnet(tmp_path)
    assert g.model is None and g.groups
    report = prune(g, criterion, 0.3, data=_data(), loss_fn=cross_entropy)
    assert all(not p.requires_grad for p in g.params.values()), "initializers are left as they were"
    assert report.achieved["flops"] >= 0.3
    compact = g.construct_subnet()
    onnx.checker.check_model(compact)
    for m, z in zip(report.masks, zero_units(g.groups, g.params)):
        assert torch.equal(m, z)
    want = _run_onnx(onnx.load(str(path)), g.params, X)
    got = _run_onnx(compact, {}, X)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_onnx_graph_program_matches_onnxruntime(tmp_path) -> None:
    """The torch program that gradient criteria differentiate computes what onnxruntime computes."""
    from graphprune.frontends.onnx_program import GraphProgram

    model, path, g = _onnx_convnet(tmp_path)
    import onnx

    want = _run_onnx(onnx.load(str(path)), {}, X)
    with torch.no_grad():
        got = GraphProgram(g.ir, g.params)(X)
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, model(X), rtol=1e-4, atol=1e-4)
    assert any(n.source_op == "onnx::BatchNormalization" for n in g.ir.nodes)


def test_onnx_gradient_scores_match_pytorch(tmp_path) -> None:
    """taylor on the ONNX graph equals taylor on the PyTorch model it was exported from."""
    import graphprune as gp
    from graphprune.optim.scoring import score
    from graphprune.optim.oneshot import _differentiable

    model, _, g = _onnx_convnet(tmp_path)
    pt = gp.trace(model, (X,))
    kw = dict(data=_data(), loss_fn=cross_entropy)
    with _differentiable(g, None, "taylor") as program:
        onnx_scores = score(g.groups, g.params, "taylor", model=program, **kw)
    torch_scores = score(pt.groups, pt.params, "taylor", model=model, **kw)
    assert sorted(map(len, onnx_scores)) == sorted(map(len, torch_scores))
    for a in onnx_scores:
        assert any(len(a) == len(b) and torch.allclose(a, b, rtol=1e-3, atol=1e-6) for b in torch_scores)
