"""Criteria read every coupled slice of a unit; roles, moments and normalisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from tests.oneshot.conftest import ConvNet, MLP, conv_groups, mlp_groups, randomize_norms, standin, conv_flops, mlp_flops
from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError
from graphprune.optim.obspa import input_moments
from graphprune.optim.roles import slice_role
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


def test_roles_from_modules_and_from_shapes(conv) -> None:
    by_module = {(s.param, s.dim): slice_role(s, conv.params, conv.model) for g in conv.groups for s in g.slices}
    assert by_module[("conv1.weight", 0)] == "producer"
    assert by_module[("conv2.weight", 1)] == "consumer"
    assert by_module[("bn1.weight", 0)] == "norm"
    assert by_module[("bn1.bias", 0)] == "other"
    # ONNX-like: no modules, norms recognised by their running_var initializer
    onnx_params = {**conv.params, **{k: v for k, v in conv.model.state_dict().items() if "running" in k}}
    assert slice_role(Slice("bn2.weight", 0, torch.zeros(1, 1)), onnx_params) == "norm"
    assert slice_role(Slice("fc.weight", 1, torch.zeros(1, 1)), onnx_params) == "consumer"
    assert slice_role(Slice("conv2.weight", 0, torch.zeros(1, 1)), onnx_params) == "producer"


def test_embeddings_and_depthwise_are_never_consumers() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "dw": nn.Conv2d(4, 4, 3, groups=4)})
    params = dict(model.named_parameters())
    assert slice_role(Slice("emb.weight", 1, torch.zeros(1, 1)), params, model) == "other"
    assert slice_role(Slice("dw.weight", 0, torch.zeros(1, 1)), params, model) == "other"
    assert slice_role(Slice("dw.weight", 0, torch.zeros(1, 1)), params) == "other"


def test_moments_from_norms_and_producers(conv) -> None:
    g0 = conv.groups[0]
    mom = input_moments(g0, conv.params, conv.model, activation="identity")
    torch.testing.assert_close(mom.cov.diagonal().float(), conv.params["bn1.weight"].detach().pow(2))
    torch.testing.assert_close(mom.mean.float(), conv.params["bn1.bias"].detach())
    mlp = standin(MLP(), mlp_groups, mlp_flops)
    w, b = mlp.params["fc1.weight"].detach().double(), mlp.params["fc1.bias"].detach().double()
    mom = input_moments(mlp.groups[0], mlp.params, mlp.model, activation="identity")
    torch.testing.assert_close(mom.cov, w @ w.T)
    torch.testing.assert_close(mom.mean, b)
    relu = input_moments(mlp.groups[0], mlp.params, mlp.model)
    assert torch.all(relu.mean > 0) and torch.all(relu.cov.diagonal() < mom.cov.diagonal())
    with pytest.raises(GraphPruneError, match="activation"):
        input_moments(g0, conv.params, conv.model, activation="tanh")


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
