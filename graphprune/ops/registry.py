"""The op registry: the single place where an op's channel semantics live.

Each canonical op has one :class:`Rule` registered under the ATen and ONNX names that
map to it.  A rule says how channels flow (``propagate``: read input fields, write
output fields, couple/pin atoms, label parameter axes, report FLOPs) and how the op
is rewritten once units go (``rewrite_fx`` for the compact PyTorch graph,
``rewrite_onnx`` for the compact ONNX graph).  ``keeps_zero`` says whether the entries
of its outputs that removed units take are exactly zero in the zeroed model, which is
what lets a layer norm or a sum reduce over a prunable axis.  An op with no rule is a
barrier.

This module only defines what an entry is and holds the tables the entries register
into; it imports none of them.  Look ops up through :mod:`.catalog`, which imports every
entry module, so a lookup always sees the whole registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..analysis.labels import Labels
    from ..ir.graph import Node
    from ..passes.shrink import Shrink

RULES: dict[str, "Rule"] = {}   # canonical op -> its rule
ATEN: dict[str, str] = {}       # ATen packet name -> canonical op
ONNX: dict[str, str] = {}       # ONNX op_type -> canonical op


class Rule:
    """Base rule; subclasses override what applies to them."""

    op: str = ""

    def propagate(self, node: "Node", lab: "Labels") -> None:
        lab.barrier(node, f"no channel rule for {node.source_op or node.op}")

    def keeps_zero(self, node: "Node", lab: "Labels") -> bool:
        """Whether every entry of the node's outputs whose atom is removed is exactly zero
        once the removed units' parameters are (a zeroed filter's channel is; a sigmoid of
        it is not).  Read through :meth:`Labels.is_zero`; default: not known, which is
        always sound."""
        return False

    def rewrite_fx(self, node: "Node", fx_node: Any, shrink: "Shrink") -> None:
        """Update the fx node's constant arguments for the compact shapes (default: none)."""

    def rewrite_onnx(self, node: "Node", proto: Any, shrink: "Shrink") -> None:
        """Update the ONNX node's attributes/constant inputs for the compact shapes."""


def register(op: str, *, aten: tuple[str, ...] = (), onnx: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a rule for canonical ``op`` under ATen/ONNX names."""
    def deco(cls: type) -> type:
        rule = cls()
        rule.op = op
        RULES[op] = rule
        for a in aten:
            ATEN[a] = op
        for o in onnx:
            ONNX[o] = op
        return cls
    return deco
