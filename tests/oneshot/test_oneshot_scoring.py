"""Criteria read every coupled slice of a unit; roles, moments and normalisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from tests.oneshot.conftest import ConvNet, MLP, conv_groups, mlp_groups, randomize_norms, standin, conv_flops, mlp_flops
import graphprune as gp
from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError
from graphprune.optim.obspa import input_moments
from graphprune.optim.scoring import normalize, score


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return standin(randomize_norms(ConvNet()), conv_groups, conv_flops)


def _batch():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def test_magnitudes_span_all_slices(conv) -> None:
    g0 = conv.groups[0]
    p = conv.params
    manual = (p["conv1.weight"].abs().flatten(1).sum(1) + p["conv1.bias"].abs() + p["bn1.weight"].abs()
              + p["bn1.bias"].abs() + p["conv2.weight"].abs().sum((0, 2, 3)))
    torch.testing.assert_close(score(conv.groups, p, "l1")[0], manual.detach())
    assert score(conv.groups, p, "l2")[1].shape == (conv.groups[1].size,)


def test_bn_scale_reads_gamma_and_falls_back_to_l2(conv) -> None:
    torch.testing.assert_close(score(conv.groups, conv.params, "bn_scale", model=conv.model)[0],
                               conv.params["bn1.weight"].detach().abs())
    mlp = standin(MLP(), mlp_groups, mlp_flops)
    torch.testing.assert_close(score(mlp.groups, mlp.params, "bn_scale", model=mlp.model),
                               score(mlp.groups, mlp.params, "l2"))


def test_taylor_and_hessian_match_hand_computation(conv) -> None:
    x, y = _batch()
    grads = dict(zip(conv.params, torch.autograd.grad(cross_entropy(conv.model(x), y), list(conv.params.values()))))
    g1 = conv.groups[1]
    w, gr = g1.gather(conv.params).detach(), g1.gather(grads)
    kw = dict(model=conv.model, data=[(x, y)], loss_fn=cross_entropy)
    torch.testing.assert_close(score(conv.groups, conv.params, "taylor", **kw)[1], (w * gr).sum(1).abs())
    torch.testing.assert_close(score(conv.groups, conv.params, "hessian", **kw)[1], (w * gr).pow(2).sum(1) / 2)
    assert all(p.grad is None for p in conv.params.values()), "the user's .grad is left alone"


def test_batches_limit_the_passes(conv) -> None:
    x, y = _batch()
    kw = dict(model=conv.model, loss_fn=cross_entropy)
    one = score(conv.groups, conv.params, "taylor", data=[(x, y)], **kw)
    capped = score(conv.groups, conv.params, "taylor", data=[(x, y), (x * 0, y)], batches=1, **kw)
    torch.testing.assert_close(one, capped)
    with pytest.raises(GraphPruneError, match="pair"):
        score(conv.groups, conv.params, "taylor", data=[x], **kw)


def _roles(g) -> dict[tuple[str, int], str]:
    return {(s.param, s.dim): s.role for grp in g.groups for s in grp.slices}


def _onnx_trace(model: nn.Module, x: torch.Tensor, tmp_path):
    """``model`` exported with every layer kept as its own node (no folding), and traced."""
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return gp.trace(str(path))


def test_roles_from_the_op_rules(tmp_path) -> None:
    """The conv, batch-norm and linear rules label which weight dim their layer writes
    (producer), reads (consumer) or scales (norm), on PyTorch and on ONNX alike."""
    torch.manual_seed(0)
    model, x = randomize_norms(ConvNet()), torch.rand(2, 1, 8, 8)
    by_rule = _roles(gp.trace(model, (x,)))
    assert by_rule[("conv1.weight", 0)] == "producer"
    assert by_rule[("conv2.weight", 1)] == "consumer"
    assert by_rule[("bn1.weight", 0)] == "norm"
    assert by_rule[("bn1.bias", 0)] == "other"
    onnx_roles = _roles(_onnx_trace(model, x, tmp_path))
    assert onnx_roles[("bn2.weight", 0)] == "norm"
    assert onnx_roles[("fc.weight", 1)] == "consumer"
    assert onnx_roles[("conv2.weight", 0)] == "producer"
    biases = {(s.param, s.dim): s.bias for grp in gp.trace(model, (x,)).groups for s in grp.slices}
    assert biases[("conv2.weight", 1)] == "conv2.bias" and biases[("bn1.weight", 0)] == "bn1.bias"


class _EmbedDepthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 4)
        self.dw, self.out = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))                       # [b, 16, 4]
        return self.out(self.dw(h.transpose(1, 2).reshape(-1, 4, 4, 4)))


def test_embeddings_and_depthwise_are_never_consumers(tmp_path) -> None:
    model, ids = _EmbedDepthwise().eval(), torch.randint(0, 10, (2, 16))
    roles = _roles(gp.trace(model, (ids,)))
    assert roles[("emb.weight", 1)] == "other"
    assert roles[("dw.weight", 0)] == "other"
    assert _roles(_onnx_trace(model, ids, tmp_path))[("dw.weight", 0)] == "other"


def test_moments_from_norms_and_producers(conv) -> None:
    g0 = conv.groups[0]
    mom = input_moments(g0, conv.params, activation="identity")
    torch.testing.assert_close(mom.cov.diagonal().float(), conv.params["bn1.weight"].detach().pow(2))
    torch.testing.assert_close(mom.mean.float(), conv.params["bn1.bias"].detach())
    mlp = standin(MLP(), mlp_groups, mlp_flops)
    w, b = mlp.params["fc1.weight"].detach().double(), mlp.params["fc1.bias"].detach().double()
    mom = input_moments(mlp.groups[0], mlp.params, activation="identity")
    torch.testing.assert_close(mom.cov, w @ w.T)
    torch.testing.assert_close(mom.mean, b)
    relu = input_moments(mlp.groups[0], mlp.params)
    assert torch.all(relu.mean > 0) and torch.all(relu.cov.diagonal() < mom.cov.diagonal())
    with pytest.raises(GraphPruneError, match="activation"):
        input_moments(g0, conv.params, activation="tanh")


def test_obspa_without_consumers_is_l2() -> None:
    params = {"w": torch.randn(5, 3)}
    g = Group(0, "heads", "head", 5, [Slice("w", 0, torch.arange(5).reshape(-1, 1))])
    torch.testing.assert_close(score([g], params, "obspa")[0], g.norms(params))


@pytest.mark.parametrize("how,check", [
    ("mean", lambda s: s.mean()), ("max", lambda s: s.max()), ("sum", lambda s: s.sum()),
])
def test_normalize_statistics(how: str, check) -> None:
    scores = [torch.rand(7) * 100, torch.rand(3)]
    for s in normalize(scores, how):
        assert float(check(s)) == pytest.approx(1.0)


def test_normalize_rank_and_none() -> None:
    s = torch.tensor([3.0, -1.0, 10.0, 0.5])
    torch.testing.assert_close(normalize([s], "rank")[0], torch.tensor([0.75, 0.25, 1.0, 0.5]))
    torch.testing.assert_close(normalize([s], "none")[0], s)
    with pytest.raises(GraphPruneError, match="normalisation"):
        normalize([s], "zscore")


def test_unknown_criterion() -> None:
    with pytest.raises(GraphPruneError, match="criterion"):
        score([], {}, "snip")
