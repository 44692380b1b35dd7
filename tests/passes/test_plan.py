"""The compact plan on its own: IR in, plan out, no fx graph or ONNX proto edited.

Each rule's rewrite is checked as a pure function of the compact shapes (a stand-in
:class:`Shrink` with chosen shapes), the plan as a whole on traced models (rewrites,
kept indices, shapes, erasure and its typed failures)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.errors import ZeroInvarianceError
from graphprune.ir.graph import Node, Ref, Value
from graphprune.ops.compute import Conv
from graphprune.ops.movement import SHAPE_OF_FULL, SHAPE_SHRUNK, SPLIT_WITH_SIZES, Reshape, ShapeOf, Slice, Split
from graphprune.ops.normalization import PHANTOM_LAYER_NORM
from graphprune.ops.reduction import MEAN_OF_ORIGINAL, Reduce
from graphprune.ops.rewrite import Entries, Rewrite
from graphprune.passes.plan import plan_compact

torch.set_num_threads(1)


class _Shrink:
    """Old and compact shapes chosen by the test, kept masks derived from them."""

    def __init__(self, values: dict[str, Value], new: dict[str, tuple[int, ...]],
                 kept: dict[tuple[str, int], torch.Tensor] | None = None) -> None:
        self.graph = SimpleNamespace(values=values)
        self._new, self._kept = new, kept or {}

    def old_shape(self, name: str) -> tuple[int, ...]:
        return self.graph.values[name].shape

    def new_shape(self, name: str) -> tuple[int, ...]:
        return self._new.get(name, self.old_shape(name))

    def kept(self, name: str, axis: int) -> torch.Tensor | None:
        return self._kept.get((name, axis % len(self.old_shape(name))))


def _values(**shapes: tuple[int, ...]) -> dict[str, Value]:
    return {k: Value(k, s, torch.float32) for k, s in shapes.items()}


# ---- each rule's rewrite, pure -------------------------------------------------------
def test_view_rewrites_only_the_shrunk_entries() -> None:
    """A symbolic batch or a -1 must survive: only the shrunk axis' entry is given."""
    node = Node("v", "reshape", None, (Ref("x"), [2, 12, -1]), outputs=["y"],
                attrs={"input": Ref("x"), "size": [2, 12, -1]}, source_op="aten.view.default")
    sh = _Shrink(_values(x=(2, 12, 4, 4), y=(2, 12, 16)), {"x": (2, 9, 4, 4), "y": (2, 9, 16)})
    assert Reshape().rewrite(node, sh) == Rewrite(args={"size": Entries({1: 9})})
    assert Entries({1: 9}).apply(["s0", 12, -1]) == ["s0", 9, -1]
    assert Reshape().rewrite(node, _Shrink(sh.graph.values, {})) is None


def test_conv_groups_follow_removed_groups() -> None:
    node = Node("c", "conv", None, outputs=["y"], attrs={"groups": 4}, source_op="aten.conv2d.default")
    sh = _Shrink(_values(y=(1, 8, 4, 4)), {"y": (1, 6, 4, 4)})
    assert Conv().rewrite(node, sh).args == {"groups": 3}


def test_slice_bounds_move_to_kept_positions() -> None:
    kept = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    node = Node("s", "slice", None, (Ref("x"),), outputs=["y"], attrs={"dim": 1, "start": 2, "end": 6},
                source_op="aten.slice.Tensor")
    sh = _Shrink(_values(x=(1, 8), y=(1, 4)), {"x": (1, 6), "y": (1, 3)}, {("x", 1): kept})
    assert Slice().rewrite(node, sh).args == {"start": 1, "end": 4}  # entries 2, 3, 5 of the old 2..6


def test_split_becomes_sizes_on_torch_and_an_argument_on_onnx() -> None:
    sh = _Shrink(_values(x=(1, 8), a=(1, 4), b=(1, 4)), {"x": (1, 5), "a": (1, 2), "b": (1, 3)})
    aten = Node("p", "split", None, (Ref("x"),), outputs=["a", "b"], attrs={"dim": 1}, source_op="aten.split.Tensor")
    rw = Split().rewrite(aten, sh)
    assert rw.call.op is SPLIT_WITH_SIZES and rw.call.attrs == {"split_sizes": [2, 3], "dim": 1}
    onnx = Node("p", "split", None, (Ref("x"),), outputs=["a", "b"], attrs={"axis": 1}, source_op="onnx::Split")
    assert Split().rewrite(onnx, sh) == Rewrite(args={"split": [2, 3]})


def test_mean_over_a_shrunk_axis_keeps_the_original_count() -> None:
    node = Node("m", "reduce", None, (Ref("x"),), outputs=["y"], attrs={"dim": [-1], "keepdim": True},
                source_op="aten.mean.dim")
    sh = _Shrink(_values(x=(2, 3, 8), y=(2, 3, 1)), {"x": (2, 3, 5)})
    call = Reduce().rewrite(node, sh).call
    assert call.op is MEAN_OF_ORIGINAL and call.inputs == ("x",)
    assert call.attrs == {"dim": [2], "keepdim": True, "n": 8, "dtype": None}


def test_onnx_shape_of_a_pruned_value() -> None:
    """Static sizes become the full model's constant; batch-dependent ones a run-time call."""
    node = Node("sh", "shape", None, (Ref("x"),), outputs=["s"], source_op="onnx::Shape")
    values = _values(x=(2, 8, 4))
    sh = _Shrink(values, {"x": (2, 5, 4)})
    assert ShapeOf().rewrite(node, sh) == Rewrite(constant=[2, 8, 4])
    values["x"].alt_shape = (3, 8, 4)  # the batch axis varies
    call = ShapeOf().rewrite(node, sh).call
    assert call.op is SHAPE_OF_FULL and call.attrs["keep"] == (1, 0, 1) and call.attrs["fixed"] == [0, 8, 0]


def test_onnx_runtime_reshape_target_is_filtered_where_read() -> None:
    node = Node("r", "reshape", None, (Ref("x"), Ref("t")), outputs=["y"], attrs={"shape": [2, 8, 4]},
                source_op="onnx::Reshape")
    values = _values(x=(2, 32), y=(2, 8, 4))
    values["t"] = Value("t", (3,), torch.int64, "act")
    values["y"].alt_shape = (3, 8, 4)
    rw = Reshape().rewrite(node, _Shrink(values, {"x": (2, 20), "y": (2, 5, 4)}))
    assert rw.feeds["t"].op is SHAPE_SHRUNK and rw.feeds["t"].attrs["keep"] == (1, 0, 1)
    assert rw.feeds["t"].attrs["fixed"] == [0, 5, 0]


# ---- the plan of a traced model ------------------------------------------------------
class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _removed(g: gp.PrunableGraph, name: str, k: int) -> torch.Tensor:
    """Zero ``k`` units of the group ``name``; the components that go."""
    grp = next(grp for grp in g.groups if grp.name == name)
    mask = torch.zeros(grp.size, dtype=torch.bool)
    mask[:k] = True
    grp.scatter_(g.params, mask)
    return g.removed_units(g.params)


def test_plan_of_a_grouped_convolution() -> None:
    g = gp.trace(_Grouped(), torch.randn(2, 3, 6, 6))
    removed = _removed(g, "a", 1)  # one group: two channels of a, b's inputs and b's outputs
    before = copy.deepcopy([(n.name, n.attrs) for n in g.ir.nodes])
    plan = plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    assert [(n.name, n.attrs) for n in g.ir.nodes] == before  # the IR is not touched
    conv_b = next(n for n in g.ir.nodes if n.op == "conv" and n.module.endswith("b"))
    assert plan.rewrites[conv_b.name].args == {"groups": 3}
    a_w = next(v for v in g.ir.values.values() if v.source_name == "a.weight")
    assert plan.params[a_w.name][0].tolist() == [2, 3, 4, 5, 6, 7]
    assert plan.shape(conv_b.outputs[0]) == (2, 6, 6, 6)
    assert not plan.erased and not plan.folds
    again = plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    assert again.rewrites == plan.rewrites and again.shapes == plan.shapes


class _PreNorm(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed, self.ln, self.head = nn.Linear(5, d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.embed(x)))


def test_plan_of_a_layer_norm_over_pruned_columns() -> None:
    g = gp.trace(_PreNorm(), torch.randn(2, 4, 5))
    removed = _removed(g, "embed", 6)
    plan = plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    ln = next(n for n in g.ir.nodes if n.op == "layer_norm")
    call = plan.rewrites[ln.name].call
    assert call.op is PHANTOM_LAYER_NORM and call.attrs["n"] == 16 and call.inputs[0] == ln.inputs[0]
    assert plan.shape(ln.outputs[0])[-1] == 10


def test_a_rule_that_raises_is_a_bug(monkeypatch) -> None:
    g = gp.trace(_Grouped(), torch.randn(2, 3, 6, 6))
    removed = _removed(g, "a", 1)

    def broken(self, node, shrink):
        raise IndexError("list index out of range")
    monkeypatch.setattr(Conv, "rewrite", broken)
    with pytest.raises(ZeroInvarianceError, match="IndexError") as err:
        plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    assert err.value.node is not None and err.value.op.startswith("aten.conv")


class _Residual(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _residual_plan_inputs():
    g = gp.trace(_Residual(), torch.randn(2, 3, 4, 4))
    removed = _removed(g, "conv1", 4)
    return g, removed


def test_erasure_of_a_residual_branch_is_planned() -> None:
    g, removed = _residual_plan_inputs()
    plan = plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    erased_modules = {n.module for n in g.ir.nodes if plan.removes(n)}
    assert any(m.endswith("conv1") for m in erased_modules) and any(m.endswith("conv2") for m in erased_modules)
    (value, const), = plan.constants.items()
    assert const.shape == (1, 4, 1, 1)  # conv2's bias, broadcast over batch and space
    assert not plan.unerased


def test_an_operator_that_cannot_run_keeps_its_branch_and_says_why() -> None:
    """The one quiet case: no implementation to compute the constant with."""
    g, removed = _residual_plan_inputs()
    conv2 = next(n for n in g.ir.nodes if n.module.endswith("conv2"))
    conv2.target = None
    plan = plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    assert not plan.erased
    assert any("cannot be run on constants" in why for why in plan.unerased.values())


def test_an_operator_that_raises_while_erasing_is_a_bug() -> None:
    g, removed = _residual_plan_inputs()
    conv2 = next(n for n in g.ir.nodes if n.module.endswith("conv2"))

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")
    conv2.target = broken
    with pytest.raises(ZeroInvarianceError, match="shape mismatch") as err:
        plan_compact(g.ir, g.labels, g.comp, removed, dict(g.params), dynamic=lambda v: {0})
    assert err.value.node == conv2.name
