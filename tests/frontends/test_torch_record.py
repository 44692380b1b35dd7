"""The fast recorder (ATen ops on meta tensors) against torch.export: the same groups over
the same unit numbering, export deferred until a compact model is emitted, a fallback
when the recorder cannot run a model, and an error (not a silent mis-prune) when the two
disagree after a user already holds the groups.

Every ``gp.trace(..., verify=True)`` in the suite is a further agreement check: a
disagreement warns with RecorderMismatchWarning, which pytest.ini makes an error."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.errors import RecorderMismatchWarning, UnsupportedModelError
from graphprune.frontends import torch_record
from graphprune.frontends.torch_export import export_model, from_exported
from graphprune.analysis import analyse, same_groups
from graphprune.ops.catalog import shape_only
from tests.analysis.test_zero_invariance import BLOCKS
from tests.helpers import check_zero_invariance, zero_random_half


def _agree(model: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    model.eval()
    kwargs = kwargs or {}
    recorded = analyse(torch_record.record(model, args, kwargs))
    exported = analyse(from_exported(export_model(model, args, kwargs), model))
    assert recorded.groups, "no groups"
    assert same_groups(recorded.groups, exported.groups, recorded.comp, exported.comp)
    assert sorted(b.op for b in recorded.labels.barriers) == sorted(b.op for b in exported.labels.barriers)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_agree_with_export(name: str) -> None:
    cls, make = BLOCKS[name]
    inputs = make()
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs if isinstance(inputs, tuple) else (inputs,), {})
    _agree(cls(), args, kwargs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0",
                                  "convnext_tiny", "swin_t"])
def test_torchvision_agrees_with_export(name: str) -> None:
    _agree(getattr(torchvision.models, name)(num_classes=10), (torch.randn(2, 3, 64, 64),))


class Constants(nn.Module):
    """A plain tensor attribute (export lifts it as a constant) and factory calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)
        self.scale = torch.linspace(0.5, 1.5, 12)  # neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
        h = torch.relu(self.a(x + pos)) * self.scale * torch.ones(1)
        return self.b(h)


def test_constants_and_factories() -> None:
    _agree(Constants(), (torch.randn(2, 5, 6),))
    check_zero_invariance(Constants(), torch.randn(2, 5, 6))


class ListIndex(nn.Module):
    """Tokens reordered by a Python list (timm's csatv2 zigzag): indexing makes the index
    tensor outside the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)
        self.order = [4, 0, 3, 1, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))[:, self.order])


@pytest.mark.parametrize("cls", [Constants, ListIndex])
def test_lifted_constants_are_recorded_and_replayed(cls: type[nn.Module]) -> None:
    """A plain tensor attribute and a list index both become lifted constants, which the
    replayed program holds: nothing is exported."""
    x = torch.randn(2, 5, 6)
    g = gp.trace(cls().eval(), x)
    assert g.backend.replay is not None and not g.notes and g.backend._exported is None, g.notes
    assert g.groups and not g.withdrawn
    _agree(cls(), (x,))
    check_zero_invariance(cls(), x)


@pytest.fixture
def no_replay(monkeypatch) -> None:
    """Compact models come from torch.export, exported when first needed: the path of a
    recording that cannot be replayed (a trace at batch > 1 is replayed otherwise, see
    ``test_batch_general.py``), which these tests exercise on models that can."""
    from graphprune.frontends import torch_replay

    def refuse(*a, **k):
        raise torch_replay.ReplayFailed("replay off for this test")
    monkeypatch.setattr(torch_replay, "replay_program", refuse)


def test_export_is_deferred_until_a_compact_model_is_built(no_replay) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    g = gp.trace(model, x, verify=False)
    assert not g.backend.settled and g.backend._exported is None
    zero_random_half(g)
    with torch.no_grad():
        ref = model(x)
        out = g.construct_subnet()(x)
    assert g.backend.settled
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_falls_back_to_export_when_recording_fails(monkeypatch) -> None:
    def fail(*_: object) -> None:
        raise torch_record.RecordingFailed("test")
    monkeypatch.setattr(torch_record, "record_call", fail)
    g = gp.trace(BLOCKS["se"][0](), BLOCKS["se"][1](), verify=False)
    assert g.backend.settled and g.groups


def _export_differs(monkeypatch) -> None:
    """Export's graph of resnet18 is the recording's (then nothing is re-analysed, see
    below): these tests need one export names differently, as it does for some models."""
    from graphprune.frontends import torch_backend
    monkeypatch.setattr(torch_backend, "same_graph", lambda a, b: False)


def test_disagreement_after_groups_are_handed_out_is_an_error(monkeypatch, no_replay) -> None:
    _export_differs(monkeypatch)
    g = gp.trace(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), verify=False)
    g.groups = g.groups[1:]  # what an analysis that saw other ops would hold
    with pytest.raises(UnsupportedModelError, match="different groups"):
        g.construct_subnet()


def test_an_export_of_the_same_graph_is_not_analysed_again(monkeypatch, no_replay) -> None:
    """Export's graph of resnet18 is the recording node for node (names, ops, arguments,
    values): the recorded analysis is export's, kept as it is."""
    from graphprune.frontends import torch_backend
    analysed = []
    monkeypatch.setattr(torch_backend, "analyse", lambda ir: analysed.append(ir) or analyse(ir))
    g = gp.trace(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), verify=False)
    recorded = g.analysis
    assert g.backend.settle(g) is recorded and g.backend.settled and not analysed
    zero_random_half(g)
    check = g.construct_subnet()  # lowered from export's program with the recorded analysis
    assert g.analysis is recorded and g.backend._exported is not None and check is not None


def test_settle_returns_a_new_analysis_and_leaves_the_graph_alone(monkeypatch, no_replay) -> None:
    from graphprune.frontends import torch_backend
    monkeypatch.setattr(torch_backend, "same_graph", lambda a, b: False)  # as for a graph export names otherwise
    g = gp.trace(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), verify=False)
    recorded, held = g.analysis, list(g.groups)
    liveness = g.liveness
    exported = g.backend.settle(g)
    assert exported is not recorded and exported.ir is not recorded.ir
    assert g.analysis is recorded and g.ir is recorded.ir and g.labels is recorded.labels
    assert g.comp is recorded.comp and g.liveness is liveness and all(a is b for a, b in zip(g.groups, held))
    with pytest.raises(dataclasses.FrozenInstanceError):
        exported.ir = recorded.ir
    g.adopt(exported)
    assert g.ir is exported.ir and g.labels is exported.labels and g.comp is exported.comp
    assert g.liveness is exported.liveness and g.liveness is not liveness  # derived from the new analysis
    assert len(g.groups) == len(held) and all(a is b for a, b in zip(g.groups, held))  # same groups: held ones stay


def test_a_refused_settle_changes_nothing(monkeypatch, no_replay) -> None:
    _export_differs(monkeypatch)
    g = gp.trace(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), verify=False)
    g.groups = g.groups[1:]
    recorded, held = g.analysis, list(g.groups)
    with pytest.raises(UnsupportedModelError, match="different groups"):
        g.construct_subnet()
    assert g.analysis is recorded and g.groups == held and not g.backend.settled


def test_adopting_an_analysis_with_other_groups_replaces_the_held_ones(monkeypatch, no_replay) -> None:
    _export_differs(monkeypatch)
    g = gp.trace(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), verify=False)
    g.groups = g.groups[1:]
    with pytest.warns(RecorderMismatchWarning):
        exported = g.backend.settle(g, adopt_groups=True)
    g.adopt(exported)
    assert g.analysis is exported and g.groups == list(exported.groups)


@torch.library.custom_op("gptest::shuffle_rows", mutates_args=())
def _shuffle_rows(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).clone()


@_shuffle_rows.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(_shuffle_rows(torch.relu(self.a(x))))))


def test_unregistered_custom_op_keeps_its_channels_and_is_named() -> None:
    g = gp.trace(CustomOp(), torch.randn(2, 8))
    assert any("shuffle_rows" in b.op for b in g.barriers)
    assert "shuffle_rows" in g.summary()
    touched = {s.param for grp in g.groups for s in grp.slices}
    assert "a.weight" not in touched and "b.weight" in touched
    check_zero_invariance(CustomOp(), torch.randn(2, 8))


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


_X = _meta(2, 4, 6, 6)
_I = _meta(2, 3, dtype=torch.int64)
# one call per overload some registry entry computes from shapes alone
_SHAPE_CALLS = {
    **{f"{op}.default": (_X,) for op in ("relu", "gelu", "silu", "dropout", "hardswish", "sigmoid", "relu_",
                                         "silu_", "hardswish_", "sigmoid_")},
    "dropout.default": (_X, 0.1, False), "hardtanh_.default": (_X, 0.0, 6.0),
    "add.Tensor": (_X, _meta(6)), "sub.Tensor": (_meta(6, 1), _X), "mul.Tensor": (_X, 2.0),
    "div.Tensor": (_I, _meta(3, dtype=torch.int64)), "add.Scalar": (_I, 2), "sub.Scalar": (_X, 1),
    "mul.Scalar": (_I, 1.5), "div.Scalar": (_I, 2),
    "add_.Tensor": (_X, _meta(6)), "sub_.Tensor": (_X, _meta(2, 4, 6, 6)), "mul_.Tensor": (_X, 2.0),
    "div_.Tensor": (_X, _meta(4, 1, 1)), "add_.Scalar": (_X, 1.0), "mul_.Scalar": (_X, 3.0),
    "conv2d.default": (_X, _meta(8, 2, 3, 3), None, [2, 1], [1], [1, 2], 2),
    "linear.default": (_meta(2, 5, 6), _meta(3, 6), _meta(3)),
    "scaled_dot_product_attention.default": (_meta(2, 4, 5, 8), _meta(2, 4, 7, 8), _meta(2, 4, 7, 3)),
    "batch_norm.default": (_X, _meta(4), _meta(4), _meta(4), _meta(4), False, 0.1, 1e-5, False),
    "instance_norm.default": (_X, None, None, None, None, True, 0.1, 1e-5, False),
    "layer_norm.default": (_X, [6, 6]), "group_norm.default": (_X, 2),
    # recurrent layers (input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first):
    # a projected bidirectional 2-layer LSTM, batch first (states [4, 2, 3] and [4, 2, 5])
    "lstm.input": (_meta(2, 7, 6), [_meta(4, 2, 3), _meta(4, 2, 5)],
                   [_meta(*s) for layer in (6, 6) for _ in range(2)
                    for s in ((20, layer), (20, 3), (20,), (20,), (3, 5))], True, 2, 0.0, False, True, True),
    "gru.input": (_meta(7, 2, 6), _meta(1, 2, 5), [_meta(15, 6), _meta(15, 5), _meta(15), _meta(15)],
                  True, 1, 0.0, False, False, False),
    "rnn_tanh.input": (_meta(7, 2, 6), _meta(2, 2, 5), [_meta(5, 6), _meta(5, 5), _meta(5, 6), _meta(5, 5)],
                       False, 1, 0.0, False, True, False),
    # upsampling (input, output_size, [align_corners,] scale_factors): by size, by scale
    "upsample_nearest1d.vec": (_meta(2, 4, 5), None, [2.5]),
    "upsample_nearest2d.vec": (_X.to(memory_format=torch.channels_last), None, [1.5, 2.0]),
    "upsample_nearest3d.vec": (_meta(2, 4, 3, 5, 6), [4, 7, 9], None),
    "_upsample_nearest_exact2d.vec": (_X, [5, 9], None),
    "upsample_linear1d.vec": (_meta(2, 4, 5), [9], True, None),
    "upsample_bilinear2d.vec": (_X.to(memory_format=torch.channels_last), [12, 7], False, None),
    "_upsample_bilinear2d_aa.vec": (_X, None, False, [0.5, 1.7]),
    "upsample_bicubic2d.vec": (_X, None, True, [3.0, 3.0]),
    "upsample_trilinear3d.vec": (_meta(2, 4, 3, 5, 6), None, False, [2.0, 1.5, 1.0]),
    "rnn_relu.input": (_meta(2, 7, 6), _meta(2, 2, 5), [_meta(5, 6), _meta(5, 5), _meta(5), _meta(5),
                                                         _meta(5, 5), _meta(5, 5), _meta(5), _meta(5)],
                       True, 2, 0.0, False, False, True),
}


@pytest.mark.parametrize("name", sorted(shape_only()))
def test_shape_only_entries_match_the_meta_kernels(name: str) -> None:
    """What a registry entry says an ATen overload outputs (shape and dtype, computed from
    its inputs') is what the meta kernel computes; an entry without a call here fails."""
    assert name in _SHAPE_CALLS, f"no sample call for {name}"
    packet, overload = name.split(".")
    func = getattr(getattr(torch.ops.aten, packet), overload)
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in _SHAPE_CALLS[name])
    fast = shape_only()[name](args, {})
    if fast is None:
        pytest.fail(f"{name} declined the sample call")
    want = func(*args)
    pairs = list(zip(fast, want, strict=True)) if isinstance(want, tuple) else [(fast, want)]
    assert [(tuple(f.shape), f.dtype) for f, _ in pairs] == [(tuple(w.shape), w.dtype) for _, w in pairs]


def test_in_place_shortcut_defers_a_broadcasting_first_argument() -> None:
    assert shape_only()["add_.Tensor"]((_meta(6), _X), {}) is None


class Queries(nn.Module):
    """DETR's decoder start: ``torch.zeros_like`` of learned queries, and a position
    index made on the input's device (``device=x.device`` is meta while recording)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Embedding(5, 8)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.queries.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)
        start = torch.zeros_like(q)
        pos = torch.arange(q.shape[1], device=x.device, dtype=x.dtype)[None, :, None]
        return self.b(torch.relu(self.a(start + q + pos + x.mean(1, keepdim=True))))


def test_like_factories_and_devices_the_model_asks_its_inputs_are_recorded_and_replayed() -> None:
    model, x = Queries().eval(), torch.randn(1, 4, 8)
    g = gp.trace(model, x)
    assert g.backend.replay is not None and not g.notes and g.backend._exported is None, g.notes
    assert not g.withdrawn and g.groups
    check_zero_invariance(Queries(), x)
    _agree(Queries(), (x,))


def test_a_replay_that_does_not_reproduce_the_model_falls_back_to_export(monkeypatch) -> None:
    """Where the replayed recording itself (nothing removed) differs from the model, the
    recording missed something: the groups are not blamed; the model is exported and
    verified again from there, and the summary says so."""
    from graphprune.frontends.torch_backend import TorchBackend
    compare = TorchBackend.compare

    def replay_is_off(self, *a, **k):
        return 1.0 if self.replay is not None else compare(self, *a, **k)
    monkeypatch.setattr(TorchBackend, "compare", replay_is_off)
    g = gp.trace(Queries().eval(), torch.randn(1, 4, 8))
    assert g.backend.replay is None and g.backend._exported is not None
    assert g.groups and not g.withdrawn
    assert any("replayed recording did not reproduce" in n for n in g.notes) and "replayed" in g.summary()


class CachedTable(nn.Module):
    """Builds an index table on its first call and caches it (timm's ConViT does): the
    recorder, on its meta copy, records the table's ops; export, after the warm-up call,
    holds the cached table as a constant.  Same groups, other unit numbering."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.table = nn.Linear(6, 12), nn.Linear(12, 3), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.table is None or self.table.shape[0] != n:
            idx = torch.arange(n, device=self.a.weight.device)
            self.table = ((idx[None, :] - idx[:, None]) ** 2).float().to(self.a.weight.device)
        return self.b(torch.relu(self.a(x)) * self.table.softmax(-1).sum(0).view(1, -1, 1))


def test_groups_export_finds_over_other_unit_numbers_are_adopted(no_replay) -> None:
    model, x = CachedTable().eval(), torch.randn(2, 5, 6)
    g = gp.trace(model, (x,), verify=False)  # no replay: export is deferred to the first compact model
    recorded = len(g.ir.nodes)
    zero_random_half(g)
    removed = g.removed_units()  # numbered by the recorder's analysis
    assert g.backend.compare(g, g.params, removed) < 1e-6  # settles on export's analysis, units translated
    assert len(g.ir.nodes) < recorded and [grp.size for grp in g.groups] == [12]
    with torch.no_grad():
        assert torch.allclose(g.construct_subnet()(x), model(x), atol=1e-6)
