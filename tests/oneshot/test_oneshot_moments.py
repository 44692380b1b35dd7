"""OBSPA's data-free input model: activation moments against Monte Carlo, routes read from
the graph (relu, relu6, gelu, attention values, identity), and the property that the
routed compensation never does worse than plain zeroing under the modelled inputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from benchmarks.digits import Attention  # the digits ViT's attention: q/k/v/out linears around SDPA
import graphprune as gp
from graphprune.optim.obspa import GraphRoutes, InputMoments, consumer_slices, mean_sink, compensate, \
    consumer_moments, consumer_rows, smooth_activation

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------- moments vs Monte Carlo
def _gaussian(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    cov = a @ a.T + 0.05 * torch.eye(n, dtype=torch.float64)
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    samples = torch.distributions.MultivariateNormal(mean, cov).sample((200_000,))
    return InputMoments(cov, mean), samples


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), act=st.sampled_from(["gelu", "silu", "relu6"]))
def test_smooth_moments_match_monte_carlo(seed: int, n: int, act: str) -> None:
    """Mean and variance are exact up to quadrature; covariances are first-order (Price),
    close for the moderate correlations of real units; the result is a valid covariance."""
    torch.manual_seed(seed)
    mom, x = _gaussian(seed, n)
    f = {"gelu": F.gelu, "silu": F.silu, "relu6": lambda t: t.clamp(0, 6)}[act]
    y = f(x)
    got = smooth_activation(mom, act)
    scale = y.std(0)
    torch.testing.assert_close(got.mean, y.mean(0), atol=0.02 * float(scale.max()) + 1e-3, rtol=0)
    # a unit that is (almost) never active has a Monte Carlo spread of a few active samples
    # (relu6 at seed 334: 0.0110 against 0.0094 by quadrature, beside units of 0.73), so the
    # floor follows the largest spread
    torch.testing.assert_close(got.cov.diagonal().sqrt(), scale, rtol=0.03, atol=1e-3 + 0.01 * float(scale.max()))
    mc = torch.cov(y.T)
    off = ~torch.eye(n, dtype=torch.bool)
    # Correlation error; a unit that is (almost) never active has no meaningful correlation,
    # so the normaliser is floored at a small fraction of the largest variance.
    norm = torch.outer(scale, scale)[off].clamp_min(1e-3 * float(scale.max()) ** 2)
    assert float(((got.cov[off] - mc[off]).abs() / norm).max()) < 0.15
    assert float(torch.linalg.eigvalsh(got.cov).min()) > -1e-9


def test_gelu_moments_of_a_known_case() -> None:
    """N(0, 1) through GELU: E = 1/(2√π)·... checked against a 2M-sample estimate."""
    mom = InputMoments(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = smooth_activation(mom, "gelu")
    assert float(got.mean) == pytest.approx(float(F.gelu(z).mean()), abs=2e-3)
    assert float(got.cov) == pytest.approx(float(F.gelu(z).var()), rel=5e-3)


# ---------------------------------------------------------------------------- routes from the graph
class Tiny(nn.Module):
    """A pre-norm transformer block (GELU MLP, 2 heads) after a conv stem with BN-ReLU, BN-ReLU6
    and a linear bottleneck, so every route kind appears."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.c4 = nn.Conv2d(6, 16, 1)
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(16), Attention(16, 2), nn.LayerNorm(16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)))
        x = self.c4(self.b3(self.c3(x)))                       # linear bottleneck: identity
        h = x.flatten(2).transpose(1, 2)                      # [b, 64 tokens, 16]
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0)
    g = gp.trace(model, (torch.rand(2, 1, 8, 8),))
    return model, g, GraphRoutes(g.ir, g.params)


def _routes_by_consumer(g, routes):
    out = {}
    for grp in g.groups:
        for s, mom in zip(consumer_slices(grp), consumer_moments(grp, g.params, graph=routes)):
            out[s.param] = (routes.route(grp, s), mom)
    return out


def test_routes_pick_the_activation_per_consumer(tiny) -> None:
    _, g, routes = tiny
    got = _routes_by_consumer(g, routes)
    assert got["c2.weight"][0].activation == "relu" and [s.param for s in got["c2.weight"][0].norms] == ["b1.weight"]
    assert got["c3.weight"][0].activation == "relu6"
    assert got["c4.weight"][0].activation == "identity"
    heads, mom = got["attn.out.weight"]
    assert heads.attention and [s.param for s in heads.producers] == ["attn.v.weight"]
    assert mom.block == 8 and mom.cov.shape == (16, 16)  # 2 heads x 8 value dims, one feature each
    mlp, mom = got["fc2.weight"]
    assert mlp.activation == "gelu" and [s.param for s in mlp.producers] == ["fc1.weight"]
    assert mom.block == 1 and mom.cov.shape == (32, 32)


def test_pre_norm_statistics_reach_the_producer(tiny) -> None:
    """fc1 reads ln2's output: its units' pre-GELU moments are W diag(γ²) Wᵀ and W β + b."""
    model, g, routes = tiny
    with torch.no_grad():
        model.ln2.weight.uniform_(0.5, 2.0), model.ln2.bias.normal_(0, 0.5)
    grp = next(x for x in g.groups if any(s.param == "fc2.weight" and s.dim == 1 for s in x.slices))
    mom = consumer_moments(grp, g.params, activation="identity", graph=routes)[0]
    w, b = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    gamma, beta = model.ln2.weight.detach().double(), model.ln2.bias.detach().double()
    torch.testing.assert_close(mom.cov, (w * gamma.pow(2)) @ w.T)
    torch.testing.assert_close(mom.mean, w @ beta + b)


def test_activation_override(tiny) -> None:
    model, g, routes = tiny
    grp = next(x for x in g.groups if any(s.param == "fc2.weight" and s.dim == 1 for s in x.slices))
    auto = consumer_moments(grp, g.params, graph=routes)[0]
    forced = consumer_moments(grp, g.params, activation="gelu", graph=routes)[0]
    relu = consumer_moments(grp, g.params, activation="relu", graph=routes)[0]
    torch.testing.assert_close(auto.cov, forced.cov)
    assert not torch.allclose(auto.mean, relu.mean)


# ---------------------------------------------------------------------------- compensation property
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_routed_compensation_never_beats_zeroing_in_reverse(tiny, seed: int) -> None:
    """For random weights, every group and every consumer: the modelled output error
    ``tr(ΔW C ΔWᵀ) + ||ΔW μ − absorbed||²`` after compensation is at most plain zeroing's."""
    model, g, routes = tiny
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 and p.numel() in (6, 8) else 0))
    for grp in g.groups:
        consumers = consumer_slices(grp)
        moms = consumer_moments(grp, g.params, graph=routes)
        remove = torch.rand(grp.size, generator=gen) < 0.5
        remove[0], remove[-1] = True, False
        before = {n: p.detach().clone() for n, p in g.params.items()}
        compensate(grp, remove, g.params, moms, graph=routes, rescale=1.0)
        for s, mom in zip(consumers, moms):
            w0 = consumer_rows(before[s.param], s, mom.block)
            w1 = consumer_rows(g.params[s.param], s, mom.block)
            wz = w0.clone()
            wz[:, remove.repeat_interleave(mom.block)] = 0
            out = before[s.param].shape[0]
            sink = mean_sink(s, g.params, routes)
            absorbed = torch.zeros(out, dtype=torch.float64)
            if sink is not None:
                name, scale = sink.param, sink.scale
                absorbed = (g.params[name].detach().double() - before[name].double()) / scale

            def error(w: torch.Tensor, shift: torch.Tensor) -> float:
                d = w0 - w
                mean_err = (d @ mom.mean).reshape(out, -1).sum(1) - shift
                return float(((d @ mom.cov) * d).sum() + mean_err.pow(2).sum())

            assert error(w1, absorbed) <= error(wz, torch.zeros(out, dtype=torch.float64)) * (1 + 1e-9) + 1e-9
        with torch.no_grad():
            for n, p in g.params.items():
                p.copy_(before[n])


def test_rescale_restores_the_modelled_spread(tiny) -> None:
    """With a BatchNorm after a bias-free consumer, gamma grows by at most ``rescale`` and never shrinks."""
    model, g, routes = tiny
    grp = next(x for x in g.groups if any(s.param == "c2.weight" and s.dim == 1 for s in x.slices))
    before = model.b2.weight.detach().clone()
    remove = torch.zeros(grp.size, dtype=torch.bool)
    remove[:3] = True
    state = {n: p.detach().clone() for n, p in g.params.items()}
    compensate(grp, remove, g.params, graph=routes, rescale=1.5)
    ratio = model.b2.weight.detach() / before
    assert torch.all(ratio >= 1 - 1e-6) and torch.all(ratio <= 1.5 + 1e-6) and torch.any(ratio > 1 + 1e-6)
    with torch.no_grad():
        for n, p in g.params.items():
            p.copy_(state[n])
