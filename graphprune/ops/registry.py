"""The op registry: the single place where an op's channel semantics live.

Each canonical op has one :class:`Rule` registered under the ATen and ONNX names that
map to it.  A rule says how channels flow (``propagate``: read input fields, write
output fields, couple/pin atoms, label parameter axes, report FLOPs) and how the op
is rewritten once units go (``rewrite``: new constant arguments or a phantom op, in
the frontend-neutral terms of :mod:`.rewrite`, which the lowerings apply to an fx or
an ONNX node).  An op kept whole on purpose is a *declared* barrier
(:func:`declare_barrier`): its entry is the reason the report gives.  ``keeps_zero`` says whether the entries
of its outputs that removed units take are exactly zero in the zeroed model, which is
what lets a layer norm or a sum reduce over a prunable axis.  An op with no rule is a
barrier.

An entry also carries what the frontends need to know of the op: for each ONNX op type it
maps, an :class:`OnnxOp` (input names, attribute normalisation and one torch
implementation, so every ONNX node the registry knows runs in torch), and for ATen
overloads whose output shape follows from their inputs' (``relu``, a broadcasting
``add``, an in-place op), how the recorder computes it without running the meta kernel.

This module only defines what an entry is and holds the tables the entries register
into; it imports none of them.  Look ops up through :mod:`.catalog`, which imports every
entry module, so a lookup always sees the whole registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from ..analysis.labels import Labels
    from ..ir.graph import Graph, Node
    from ..passes.shrink import Shrink
    from .rewrite import OnnxArg, Rewrite

RULES: dict[str, "Rule"] = {}             # canonical op -> its rule
ATEN: dict[str, str] = {}                 # ATen packet name -> canonical op
ONNX: dict[str, str] = {}                 # ONNX op_type -> canonical op
ONNX_OPS: dict[str, "OnnxOp"] = {}        # ONNX op_type -> how it is imported and run in torch
SHAPE_ONLY: dict[str, "ShapeOnly"] = {}   # ATen overload -> its output from its inputs' shapes
BARRIERS: dict[str, str] = {}             # canonical op declared a barrier -> why it is one

# (args, kwargs) of an ATen call on meta tensors -> its meta output, or None where the
# meta kernel must run after all (an in-place op that would broadcast its first argument)
ShapeOnly = Callable[[tuple, dict], Any]


@dataclass(frozen=True)
class OnnxOp:
    """One ONNX op type as the importer reads it and torch runs it.

    ``torch`` takes the node's inputs positionally (None for an omitted optional input)
    and its normalised attributes as keywords, and returns the outputs in ONNX order (a
    tensor, or a tuple when the op has several).  ``inputs`` names the inputs in ONNX
    order: rules read them from ``node.attrs`` under these names.  Those also in ``lists``
    are integer constants (shapes, axes, pads) that the importer resolves into Python
    lists, so one rule and one implementation serve every opset.  ``normalise(attrs,
    out_shapes)`` fills defaults and renames attributes in place so rules see one
    vocabulary (``group`` -> ``groups``)."""

    torch: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    normalise: Callable[[dict[str, Any], list[tuple[int, ...]]], None] | None = None


@dataclass(frozen=True)
class Layer:
    """A layer with a weight, as a standalone computation a latency table can rebuild at
    other widths: its weight (an IR value), the weight dims that hold its input and output
    channels, and its geometry.  ``kind``: "conv2d" (``rows`` is the batch, ``size`` the input's
    height and width) or "dense" (``rows`` the activation rows: batch x tokens).
    ``epilogue``: the elementwise ops after it in the graph that the compiler fuses into
    its kernel, and ``lead`` a dense layer's input dims before its channels where there are
    more than one, e.g. (batch, tokens) (see :func:`graphprune.latency.graph_layers`): a layer
    is timed as the kernel the model runs."""

    weight: str
    kind: str
    in_dim: int
    out_dim: int
    channels: tuple[int, int]
    rows: int = 1
    size: tuple[int, int] = (1, 1)
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    epilogue: tuple[str, ...] = ()
    lead: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        """One input channel per group: input and output channels shrink together."""
        return self.kind == "conv2d" and self.groups > 1 and self.groups == self.channels[0]


@dataclass(frozen=True)
class BiasSite:
    """Where a bias can be added to a layer's output: ``weight`` (an IR value) holds the
    output channels along ``out_dim``, the output holds them along ``axis``; ``arg`` is the
    op's own bias argument (set where the layer has none, ``scale`` times the bias: Gemm's
    ``beta``), or None where the op takes no bias and an add follows it (a matmul).
    Calibrated compensation moves removed units' mean into such a bias where the layer has
    none (see :func:`graphprune.optim.obspa.compensate`)."""

    weight: str
    out_dim: int
    axis: int
    arg: str | None
    scale: float = 1.0


class Rule:
    """Base rule; subclasses override what applies to them."""

    op: str = ""
    onnx_args: dict[tuple[str, str], "OnnxArg"] = {}
    """(ONNX op type, IR argument name) -> where ONNX keeps an argument :meth:`rewrite`
    sets, where that is not an attribute of the same name."""
    mode_args: dict[str, str] = {}
    """ATen op -> its argument that follows ``.train()``/``.eval()`` (batch norm's
    ``training``): a compact module sets it when its mode changes."""
    mixes_channels: bool = False
    """Whether the op combines its input channels through parameters of its own (a conv, a
    linear layer, a norm's affine): past it, a unit of another group no longer passes
    through unmixed.  The optimizers' route finding stops there."""
    normalises: bool = False
    """Whether the op standardises channels and applies a per-channel affine (batch, layer
    and group norm): the statistics of what follows it are its gamma and beta."""
    probabilities: bool = False
    """Whether the op's output is a probability distribution over its last axis (softmax):
    a matmul that reads it first mixes attention values."""

    def mode_arg(self, packet: str, arg: Callable[[str], Any]) -> str | None:
        """The argument of this call of ATen op ``packet`` that follows the module's mode
        (``arg`` reads the call's arguments by schema name); None if the call's behaviour
        does not depend on the mode."""
        return self.mode_args.get(packet)

    def propagate(self, node: "Node", lab: "Labels") -> None:
        lab.barrier(node, f"no channel rule for {node.source_op or node.op}")

    def keeps_zero(self, node: "Node", lab: "Labels") -> bool:
        """Whether every entry of the node's outputs whose atom is removed is exactly zero
        once the removed units' parameters are (a zeroed filter's channel is; a sigmoid of
        it is not).  Read through :meth:`Labels.is_zero`; default: not known, which is
        always sound."""
        return False

    def activation(self, node: "Node") -> str | None:
        """The nonlinearity the node applies elementwise, as the optimizers model a unit's
        statistics through it (``relu``, ``relu6``, ``gelu``, ``silu``); None for none."""
        return None

    def attention_values(self, node: "Node", data: list[str],
                         producer: Callable[[str], "Rule | None"]) -> int | None:
        """Position in ``data`` (the node's activation inputs) of the attention *values*
        when the node weighs them by attention probabilities (an SDPA; a matmul of a
        softmax by values), ``producer`` giving the rule of a value's producer.  None for
        any other node."""
        return None

    def block_sparse_weight(self, node: "Node", graph: "Graph") -> str | None:
        """The parameter a block-sparse (BSR) matmul computes ``node`` with exactly, seen as
        an ``[out, in]`` matrix (a linear layer's weight, an ungrouped 1x1 convolution's),
        for in-layer block sparsity; None when there is none."""
        return None

    def layer(self, node: "Node", graph: "Graph") -> Layer | None:
        """The node as a :class:`Layer` (a convolution or dense layer over a weight
        parameter), for latency tables; None for anything else."""
        return None

    def bias_site(self, node: "Node", graph: "Graph") -> BiasSite | None:
        """Where a bias could be added to the node's output when its weight layer has none
        (:class:`BiasSite`); None for an op that is no layer over a weight parameter, or
        that already adds a bias."""
        return None

    def rewrite(self, node: "Node", shrink: "Shrink") -> "Rewrite | None":
        """The node's new constant arguments for the compact shapes, or the phantom op it
        becomes (default: nothing changes).  A pure function of the IR and ``shrink``."""
        return None


class DeclaredBarrier(Rule):
    """An op known to the registry whose channels are kept on purpose: its entry says why
    (a data-dependent output shape, control flow, a quantised kernel...), and the report
    names that reason instead of "no channel rule"."""

    reason: str = ""

    def propagate(self, node: "Node", lab: "Labels") -> None:
        lab.barrier(node, self.reason)


def op_kind(node: "Node") -> str:
    """The op's name as the entries compare it: the ATen packet (``add_`` for
    ``aten.add_.Tensor``) or the ONNX op type (``Add`` for ``onnx::Add``); ONNX types are
    capitalised, so the two vocabularies never collide."""
    op = node.source_op
    return op.split(".")[1] if op.startswith("aten.") else op.removeprefix("onnx::")


def declare_barrier(op: str, reason: str, *, aten: tuple[str, ...] = (), onnx: tuple[str, ...] = ()) -> None:
    """Register canonical ``op`` as a barrier with ``reason`` under ATen names and ONNX op
    types.  Its ONNX types have no torch implementation: nothing is pruned through them,
    and a gradient criterion on a graph holding one says so (data-free criteria work)."""
    if not reason:
        raise ValueError(f"barrier {op!r} needs a reason")
    _unclaimed(op, aten, onnx)
    rule = type(f"Barrier_{op}", (DeclaredBarrier,), {"reason": reason, "__doc__": reason})()
    rule.op = op
    RULES[op] = rule
    BARRIERS[op] = reason
    for a in aten:
        ATEN[a] = op
    for o in onnx:
        ONNX[o] = op


def register(op: str, *, aten: tuple[str, ...] = (), onnx: Mapping[str, OnnxOp] | None = None,
             shape_only: Mapping[str, ShapeOnly] | None = None) -> Callable[[type], type]:
    """Class decorator: register a rule for canonical ``op`` under ATen names and ONNX op
    types (each with how it is imported and run in torch); ``shape_only`` maps ATen
    overloads (``"relu.default"``) to how their output is computed from shapes alone."""
    def deco(cls: type) -> type:
        _unclaimed(op, aten, onnx or {})
        rule = cls()
        rule.op = op
        RULES[op] = rule
        SHAPE_ONLY.update(shape_only or {})
        for a in aten:
            ATEN[a] = op
        for o, spec in (onnx or {}).items():
            ONNX[o] = op
            ONNX_OPS[o] = spec
        return cls
    return deco


def _unclaimed(op: str, aten: tuple[str, ...], onnx: Mapping[str, Any] | tuple[str, ...]) -> None:
    """Refuse a second entry for an op or a name (before anything is registered): each op's
    semantics live in exactly one entry."""
    taken = [op] if op in RULES else []
    taken += [f"aten.{a}" for a in aten if a in ATEN] + [f"onnx::{o}" for o in onnx if o in ONNX]
    if taken:
        raise ValueError(f"{', '.join(taken)} already registered; each op has one entry")
