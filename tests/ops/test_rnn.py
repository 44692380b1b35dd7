"""Recurrent layers (:mod:`graphprune.ops.rnn`): a hidden unit is one group member across
its gates, both directions and the next layer's inputs, through PyTorch (ATen ``lstm``,
``gru``, ``rnn_tanh``, ``rnn_relu``) and through ONNX (``LSTM``, ``GRU``, ``RNN``)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from tests.helpers import check_zero_invariance, zero_random_half

CELLS = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {}),
         "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}


class Recurrent(nn.Module):
    """A recurrent stack followed by a linear head over every step."""

    def __init__(self, cell: str, layers: int, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        kind, extra = CELLS[cell]
        self.rnn = kind(6, 10, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
        self.head = nn.Linear(10 * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def _configs() -> list:
    """Every cell with two random stack shapes (layers, directions, batch_first), fixed seed."""
    rng = np.random.default_rng(18)
    out = []
    for cell in CELLS:
        for _ in range(2):
            layers, bi, bf = int(rng.integers(1, 3)), bool(rng.integers(2)), bool(rng.integers(2))
            out.append(pytest.param(cell, layers, bi, bf, id=f"{cell}-l{layers}-{'bi' if bi else 'uni'}-"
                                                             f"{'bf' if bf else 'tf'}"))
    return out


def _model(cell: str, layers: int, bi: bool, bf: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6) if bf else torch.randn(5, 2, 6)
    return Recurrent(cell, layers, bi, bf).eval(), x


@pytest.mark.parametrize("cell,layers,bi,bf", _configs())
def test_pytorch_compact_equals_zeroed(cell: str, layers: int, bi: bool, bf: bool) -> None:
    model, x = _model(cell, layers, bi, bf)
    g = check_zero_invariance(model, (x,))
    assert not g.barriers
    (grp,) = g.groups  # one hidden_size: unit j in every layer and direction
    assert grp.size == 10
    names = {s[0] for s in grp.param_slices(0)}
    assert {f"rnn.weight_hh_l{layers - 1}", "rnn.weight_ih_l0", "head.weight"} <= names
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    rows = [s for s in grp.param_slices(0) if s[0] == "rnn.weight_ih_l0" and s[1] == 0]
    assert len(rows[0][2]) == gates  # one row per gate


@pytest.mark.parametrize("cell,layers,bi,bf", _configs())
def test_onnx_compact_equals_zeroed(cell: str, layers: int, bi: bool, bf: bool, tmp_path) -> None:
    model, x = _model(cell, layers, bi, bf)
    path = tmp_path / "rnn.onnx"
    gp.export_onnx(model, (x,), path)
    g = gp.trace(str(path), verify=False)
    assert not g.barriers
    assert len(g.groups) == layers  # one node per layer, chained through the next one's inputs
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact)
    longer = torch.cat([x, torch.randn_like(x)], 0).numpy()  # dim 0 is dynamic: another batch or length
    ref, out = run_onnx(full, {"input_0": longer})[0], run_onnx(compact, {"input_0": longer})[0]
    assert ref.shape == out.shape
    assert np.abs(ref - out).max() <= 1e-4 * (np.abs(ref).max() + 1e-12)
    sizes = [a.i for n in compact.graph.node if n.op_type in ("LSTM", "GRU", "RNN")
             for a in n.attribute if a.name == "hidden_size"]
    assert sizes == [5] * layers


class GivenState(nn.Module):
    """The caller passes the initial state: a unit whose state starts non-zero is not
    zero-invariant, so the layer is a barrier that says why."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x, h0)[0])


def test_given_initial_state_is_a_barrier_with_its_reason() -> None:
    g = gp.trace(GivenState().eval(), (torch.randn(5, 2, 6), torch.randn(1, 2, 8)))
    assert not g.groups
    assert any("initial state" in b.reason and "zero" in b.reason for b in g.barriers)


def test_lstm_projection_is_a_barrier_with_its_reason() -> None:
    model = nn.Sequential(nn.LSTM(6, 10, proj_size=4))
    g = gp.trace(model.eval(), (torch.randn(5, 2, 6),))
    assert not g.groups
    assert [b.reason for b in g.barriers] == ["an LSTM with projections (proj_size): not analysed"]


class LearnedState(nn.Module):
    """A learned initial state [layers*dirs, 1, hidden]: its hidden columns join the units
    (zeroed with them), so the compact model keeps the surviving units' columns."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(6, 10, num_layers=2, bidirectional=True), nn.Linear(20, 3)
        self.h0 = nn.Parameter(torch.randn(4, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x, self.h0.expand(-1, x.shape[1], -1).contiguous())[0])


def test_learned_initial_state_joins_the_units() -> None:
    torch.manual_seed(0)
    g = check_zero_invariance(LearnedState().eval(), (torch.randn(5, 2, 6),))
    assert not g.barriers
    assert any(s[0] == "h0" and s[1] == 2 for s in g.groups[0].param_slices(0))


def test_pruned_rnn_follows_train_and_eval() -> None:
    """Dropout between layers acts in train mode only, in the compact model as in nn.LSTM."""
    torch.manual_seed(0)
    model, x = Recurrent("lstm", 2, False, True), torch.randn(2, 5, 6)
    model.rnn.dropout = 0.5
    g = gp.trace(model.eval(), (x,), verify=False)
    zero_random_half(g)
    compact = g.construct_subnet()
    with torch.no_grad():
        assert torch.equal(compact(x), compact(x))
        compact.train()
        assert not torch.equal(compact(x), compact(x))
        compact.eval()
        assert torch.allclose(compact(x), model(x), atol=1e-6)


def test_one_zero_state_fed_as_both_h0_and_c0_is_sliced_for_both(tmp_path) -> None:
    """TorchScript's exporter makes an LSTM's zero state at run time (ConstantOfShape of the
    batch size) and feeds that one value as both ``initial_h`` and ``initial_c``: both
    inputs read its surviving units (timm's sequencer2d through ONNX failed on ``initial_c``)."""
    model, x = _model("lstm", 1, True, True)
    path = tmp_path / "lstm.onnx"
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    lstm = next(n for n in onnx.load(path).graph.node if n.op_type == "LSTM")
    assert lstm.input[5] == lstm.input[6] != ""  # the form this test is about
    g = gp.trace(str(path), (x.numpy(),))
    assert len(g.groups) == 1
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    wider = torch.randn(3, 5, 6).numpy()
    ref, out = run_onnx(full, {"x": wider})[0], run_onnx(compact, {"x": wider})[0]
    assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
