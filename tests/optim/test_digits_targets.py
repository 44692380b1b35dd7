"""Issue #3's "Done when": every optimizer trains both digits models to their FLOPs
targets (within 2 points, measured on the compact model) and the compact model computes
what the group-sparse model computes.

The models are the benchmark's own (``benchmarks/digits.py``): the ResNet 32-64-128 and
the ViT that reads rows as tokens, whose attention heads are coarse units (one head is
6.4% of its FLOPs) next to fine MLP channels (0.19% each), the case that overshot.
Training is a few steps only: the property is about where the selection lands, not
about accuracy (``benchmarks/optimizers.py`` measures that).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.optim import DHSPG, H2SPG, HESSO, HESSO_CRIC
from graphprune.target import Target
from tests.helpers import load_benchmark

digits = load_benchmark("digits")

TOLERANCE = 0.02  # the issue's ±2%


@pytest.fixture(scope="module")
def split():
    return digits.digits_split()


@pytest.mark.parametrize("fraction", [0.5, 0.7])
@pytest.mark.parametrize("cls", [HESSO, DHSPG, H2SPG, HESSO_CRIC], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_compact_model_lands_on_the_flops_target(name, cls, fraction, split):
    x, y, x_test, _ = split
    torch.manual_seed(0)
    model = digits.MODELS[name][0]()
    example = digits.example(name)
    g = gp.trace(model, example, verify=False)
    kw = dict(warmup_steps=2, pruning_steps=12)
    if cls in (HESSO, HESSO_CRIC):
        kw["pruning_periods"] = 3
    if cls is HESSO_CRIC:
        kw["loss_fn"] = lambda: F.cross_entropy(model(x[:128]), y[:128])
    opt = cls(g, lr=0.05, target=Target(flops=fraction), **kw)
    for xb, yb in digits.batches(x, y, 16, 32, 0):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.record_loss(loss)
        opt.step()

    compact = g.construct_subnet()
    real = 1 - gp.trace(compact, example, verify=False).total_flops / g.total_flops
    assert fraction <= real + 1e-9 and real - fraction <= TOLERANCE, f"{cls.__name__} removed {real:.2%}"
    assert real == pytest.approx(opt.reduction()["flops"], abs=1e-9)  # the optimizer's count is the real one
    assert opt.history[-1]["flops_reduction"] == pytest.approx(real, abs=1e-9)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x_test[:64]), model(x_test[:64]), rtol=1e-4, atol=1e-5)
