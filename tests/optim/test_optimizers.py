"""The OTO-family optimizers on the conv-bn-relu-conv-bn-linear net and digits."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from graphprune.errors import NumericalError, UnprunableTargetError
from graphprune.optim import DHSPG, H2SPG, HESSO, HESSO_CRIC, HESSOCRIC, output_depends_on_input
from graphprune.optim.plots import plot_history
from graphprune.target import Target
from tests.optim.optim_standin import Net, batches, graph, live_flops, traced_or_standin, zero_units

WINDOW = dict(warmup_steps=10, pruning_steps=60)


def make(cls, model, target, **kw):
    g = traced_or_standin(model)
    if cls is HESSO_CRIC:
        kw.setdefault("loss_fn", _held_loss(model))
    if cls in (HESSO, HESSO_CRIC):
        kw.setdefault("pruning_periods", 3)
    return g, cls(g, lr=0.05, target=target, **WINDOW, **kw)


def _held_loss(model):
    from tests.optim.optim_standin import digits
    x, y = digits(640)
    return lambda: F.cross_entropy(model(x[512:]), y[512:])


def train(model, opt, data, steps, start=0):
    x, y = data
    for t, (xb, yb) in enumerate(batches(x, y, start + steps, 32)):
        if t < start:
            continue
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.record_loss(loss)
        opt.step()


ALL = [HESSO, DHSPG, H2SPG, HESSO_CRIC]


@pytest.mark.parametrize("cls", ALL)
def test_reaches_flops_target_with_exact_zeros(cls, data):
    torch.manual_seed(0)
    model = Net()
    g, opt = make(cls, model, Target(flops=0.5))
    train(model, opt, data, 75)
    zeros = zero_units(g)
    real = 1 - live_flops(model, zeros) / g.total_flops
    assert 0.5 <= real <= 0.52
    for chosen, zero in zip(opt.masks, zeros):
        assert torch.equal(chosen, zero)  # chosen units are exactly zero, nothing else is
    assert opt.history and opt.history[-1]["flops_reduction"] == pytest.approx(real)
    assert all(int((~z).sum()) >= 1 for z in zeros)
    assert output_depends_on_input(model, data[0][:4])


def test_compact_model_has_the_target_flops(data):
    gp = pytest.importorskip("graphprune")
    if not hasattr(gp, "trace"):
        pytest.skip("graphprune.trace not available")
    torch.manual_seed(0)
    model = Net()
    g, opt = make(HESSO, model, 0.5, variant="adamw")
    train(model, opt, data, 75)
    compact = g.construct_subnet()
    example = torch.zeros(1, 1, 8, 8)
    assert 0.5 <= 1 - gp.trace(compact, example).total_flops / g.total_flops <= 0.52
    model.eval()
    for sample in data[0][:4]:  # one at a time: the compact model keeps the example's batch size for now
        torch.testing.assert_close(compact(sample[None]), model(sample[None]), rtol=1e-4, atol=1e-5)


def test_params_target_min_units_and_multiple(data):
    torch.manual_seed(0)
    model = Net()
    g, opt = make(HESSO, model, Target(params=0.6, min_units=8, multiple=8))
    train(model, opt, data, 75)
    kept = [int((~z).sum()) for z in zero_units(g)]
    assert all(k >= 8 and k % 8 == 0 for k in kept)
    assert opt.reduction()["params"] >= 0.6


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_resume_is_bit_identical(cls, data):
    torch.manual_seed(0)
    first = Net()
    reference_model = Net()
    reference_model.load_state_dict(first.state_dict())
    _, reference = make(cls, reference_model, 0.5)
    train(reference_model, reference, data, 50)

    _, opt = make(cls, first, 0.5)
    train(first, opt, data, 33)  # mid-period, mid-window
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob)
    resumed_model = Net()
    resumed_model.load_state_dict(saved["model"])
    _, resumed = make(cls, resumed_model, 0.5)
    resumed.load_state_dict(saved["opt"])
    train(resumed_model, resumed, data, 17, start=33)

    for (name, a), b in zip(reference_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(reference.masks, resumed.masks))
    assert reference.history == resumed.history


def test_nan_gradient_names_the_parameter(data):
    model = Net()
    _, opt = make(HESSO, model, 0.5)
    F.cross_entropy(model(data[0][:8]), data[1][:8]).backward()
    model.conv2.weight.grad[0, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [m.clone() for m in opt.masks]
    with pytest.raises(NumericalError, match="conv2.weight"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # last good weights kept
    assert all(torch.equal(m, n) for m, n in zip(opt.masks, masks))  # no NaN decision


def test_overflowing_step_is_undone(data):
    model = Net()
    _, opt = make(HESSO, model, 0.5)
    F.cross_entropy(model(data[0][:8]), data[1][:8]).backward()
    model.conv2.weight.grad[0, 0, 0, 0] = 3e38  # finite, but the update overflows to inf
    opt.param_groups[0]["lr"] = 1e10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NumericalError, match="weight of parameter"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_output_depends_on_input_detects_a_dead_net(data):
    model = Net()
    assert output_depends_on_input(model, data[0][:4])
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.bias.zero_()
        model.bn1.bias.zero_()
    assert not output_depends_on_input(model, data[0][:4])
    assert model.training  # flags restored


def test_bad_arguments():
    model = Net()
    g = graph(model)
    with pytest.raises(ValueError):
        HESSO(g, lr=0.1, variant="lion")
    with pytest.raises(ValueError):
        HESSO(g, lr=0.0)
    with pytest.raises(ValueError):
        HESSO(g, lr=0.1, pruning_steps=3, pruning_periods=5)
    with pytest.raises(TypeError):
        HESSO_CRIC(g, lr=0.1, loss_fn=None)
    with pytest.raises(UnprunableTargetError):
        DHSPG(g, lr=0.1, target=1.5)
    assert HESSOCRIC is HESSO_CRIC


def test_h2spg_candidates_and_connectivity(data):
    torch.manual_seed(0)
    model = Net()
    g = traced_or_standin(model)
    blocks = [frozenset((gi, u) for u in range(b * 8, b * 8 + 8)) for gi in (0, 1) for b in range(8)]
    only_second = lambda masks: not masks[0].any() and int((~masks[1]).sum()) >= 8  # noqa: E731
    opt = H2SPG(g, lr=0.05, target=Target(params=0.3), candidates=blocks, connected=only_second, **WINDOW)
    train(model, opt, data, 75)
    zeros = zero_units(g)
    assert not zeros[0].any()
    assert int(zeros[1].sum()) % 8 == 0 and opt.reduction()["params"] >= 0.3
    with pytest.raises(UnprunableTargetError):  # whole groups are never allowed by the default check
        opt = H2SPG(traced_or_standin(Net()), lr=0.05, target=0.5, candidates=[0, 1], **WINDOW)
        train(opt.graph.model, opt, data, 11)


def test_cric_protects_a_group_whose_removal_collapses_the_loss(data):
    def first_period(cls, kw):
        torch.manual_seed(0)
        model = Net()
        opt = cls(traced_or_standin(model), lr=0.05, target=0.3, pruning_periods=3, **WINDOW, **kw(model))
        train(model, opt, data, 11)
        return opt

    plain = first_period(HESSO, lambda model: {})
    victim = next(i for i, m in enumerate(plain.masks) if m.any())  # a group saliency alone would cut
    bn = f"bn{victim + 1}.weight"

    def collapsing(model):
        return {"loss_fn": lambda: 100.0 if bool((dict(model.named_parameters())[bn] == 0).any()) else 1.0}

    opt = first_period(HESSO_CRIC, collapsing)
    assert not opt.masks[victim].any() and opt.protected[victim].any()
    assert any(m.any() for m in opt.masks)  # the budget moved to the other group
    assert any(row["event"] == "cric_cycle" for row in opt.history)


def test_history_plot_and_summary(tmp_path, data):
    torch.manual_seed(0)
    model = Net()
    _, opt = make(DHSPG, model, 0.5)
    train(model, opt, data, 75)
    fig = plot_history(opt.history, tmp_path / "h.png", title="DHSPG")
    assert (tmp_path / "h.png").stat().st_size > 0
    fig.clf()
    assert "removed:" in opt.summary() and "DHSPG(Target(flops=0.5)" in repr(opt)


def test_cric_never_protects_the_target_out_of_reach(data):
    """Every probe collapses: protecting every group would leave nothing to remove, so
    protection stops where the target would become impossible, and the target is met."""
    torch.manual_seed(0)
    model = Net()
    params = dict(model.named_parameters())

    def collapsing():
        return 100.0 if any(bool((params[n] == 0).any()) for n in ("bn1.weight", "bn2.weight")) else 1.0

    g, opt = make(HESSO_CRIC, model, Target(flops=0.5), loss_fn=collapsing)
    train(model, opt, data, 75)
    real = 1 - live_flops(model, zero_units(g)) / g.total_flops
    assert 0.5 <= real <= 0.52
