"""OBSPA's Optimal Brain Surgeon step: the compensation never does worse than zeroing,
and the saliency is exactly the error the compensation leaves."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graphprune.analysis.groups import Group, Slice
from graphprune.optim.obspa import InputMoments, compensate, consumer_rows, obs_compensate, obs_hessian, \
    obs_saliency

SETTINGS = settings(max_examples=30, deadline=None)


def _case(seed: int, size: int, fan_in: int, out: int):
    """A producer ``x = relu(P z + b)`` (z white), its samples, and a consumer weight."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(size, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(size, generator=gen, dtype=torch.float64)
    x = torch.relu(torch.randn(4096, fan_in, generator=gen, dtype=torch.float64) @ p.T + b)
    w = torch.randn(out, size, generator=gen, dtype=torch.float64)
    remove = torch.rand(size, generator=gen) < 0.4
    remove[0], remove[-1] = True, False  # at least one removed and one kept
    return x, w, remove


def _output_error(x: torch.Tensor, w: torch.Tensor, new: torch.Tensor) -> float:
    return float(((x @ (w - new).T) ** 2).mean())


@SETTINGS
@given(seed=st.integers(0, 10_000), size=st.integers(2, 24), fan_in=st.integers(1, 32), out=st.integers(1, 8),
       damping=st.sampled_from([1e-3, 0.1, 1.0]))
def test_linear_compensation_beats_zeroing(seed: int, size: int, fan_in: int, out: int, damping: float) -> None:
    """With H the inputs' second moment, the ridge OBS update lowers the layer-output error."""
    x, w, remove = _case(seed, size, fan_in, out)
    h = obs_hessian(x.T @ x / len(x), damping)
    zeroed = w.clone()
    zeroed[:, remove] = 0
    compensated = obs_compensate(w, h, remove)
    assert torch.all(compensated[:, remove] == 0)
    assert _output_error(x, w, compensated) <= _output_error(x, w, zeroed) * (1 + 1e-9) + 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), size=st.integers(2, 16), out=st.integers(1, 6))
def test_saliency_is_the_error_left_after_compensation(seed: int, size: int, out: int) -> None:
    """OBS identity: removing unit q alone and compensating leaves error ``Σ W[:, q]² / [H⁻¹]_qq``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=gen, dtype=torch.float64)
    h = a @ a.T + 0.1 * torch.eye(size, dtype=torch.float64)
    w = torch.randn(out, size, generator=gen, dtype=torch.float64)
    saliency = obs_saliency(w, h)
    for q in range(size):
        remove = torch.zeros(size, dtype=torch.bool)
        remove[q] = True
        delta = obs_compensate(w, h, remove) - w
        assert torch.isclose(torch.trace(delta @ h @ delta.T), saliency[q], rtol=1e-6, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), c_in=st.integers(2, 10), c_out=st.integers(1, 6), k=st.sampled_from([1, 3]))
def test_conv_compensation_beats_zeroing(seed: int, c_in: int, c_out: int, k: int) -> None:
    """A conv consumer, inputs with channel second moment H, taps independent (the H ⊗ I model):
    the expected output error ``Σ_taps tr(ΔW_t H ΔW_tᵀ)`` drops below plain zeroing."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(c_in, max(1, c_in // 2), generator=gen, dtype=torch.float64)
    h = a @ a.T  # rank-deficient on purpose: compensate() must damp it
    conv = nn.Conv2d(c_in, c_out, k, bias=False).double()
    remove = torch.rand(c_in, generator=gen) < 0.5
    remove[0], remove[-1] = True, False
    group = Group(0, "x", "channel", c_in, [Slice("w", 1, torch.arange(c_in).reshape(-1, 1), role="consumer")])
    w0 = conv.weight.detach().clone()
    params = {"w": conv.weight.detach().clone()}
    compensate(group, remove, params, mom=InputMoments(h, torch.zeros(c_in, dtype=h.dtype)), damping=0.1)

    def expected_error(w_new: torch.Tensor) -> float:
        d = w_new - w0
        return sum(float(torch.trace(d[:, :, i, j] @ h @ d[:, :, i, j].T)) for i in range(k) for j in range(k))

    zeroed = w0.clone()
    zeroed[:, remove] = 0
    assert torch.all(params["w"][:, remove] == 0)
    assert expected_error(params["w"]) <= expected_error(zeroed) * (1 + 1e-9) + 1e-12


def test_bias_absorbs_the_mean() -> None:
    """Linear consumer with bias, inputs with a mean: the compensated layer's error on samples
    from that distribution is far below plain zeroing."""
    gen = torch.Generator().manual_seed(0)
    size, out = 12, 5
    a = torch.randn(size, 4, generator=gen)
    mean = torch.rand(size, generator=gen) + 0.5
    x = torch.randn(20_000, 4, generator=gen) @ a.T + mean
    lin = nn.Linear(size, out)
    ref = lin(x).detach()
    remove = torch.zeros(size, dtype=torch.bool)
    remove[:5] = True
    params = {"l.weight": lin.weight.detach().clone(), "l.bias": lin.bias.detach().clone()}
    consumer = Slice("l.weight", 1, torch.arange(size).reshape(-1, 1), role="consumer", bias="l.bias")
    group = Group(0, "x", "feature", size, [consumer])
    compensate(group, remove, params, mom=InputMoments((a @ a.T).double(), mean.double()), damping=1e-3)
    compensated = x @ params["l.weight"].T + params["l.bias"]
    zeroed = x @ lin.weight.detach().masked_fill(remove, 0).T + lin.bias.detach()
    err_comp, err_zero = (compensated - ref).pow(2).mean(), (zeroed - ref).pow(2).mean()
    assert err_comp < 0.05 * err_zero


def test_consumer_rows_cover_flattened_columns() -> None:
    """A unit owning several columns (a channel flattened into a linear layer) gives one row per
    (output, position), and every weight element appears exactly once."""
    p = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    s = Slice("fc.weight", 1, torch.arange(8).reshape(2, 4))  # 2 channels x 4 positions
    rows = consumer_rows(p, s)
    assert rows.shape == (12, 2)
    assert sorted(rows.flatten().tolist()) == sorted(p.flatten().double().tolist())
    assert torch.equal(rows[0], torch.tensor([0.0, 4.0], dtype=torch.float64))
