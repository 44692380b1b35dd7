"""The op registry: the single place where an op's channel semantics live.

Each canonical op has one :class:`Rule` registered under the ATen and ONNX names that
map to it.  A rule says how channels flow (``propagate``: read input fields, write
output fields, couple/pin atoms, label parameter axes, report FLOPs) and how the op
is rewritten once units go (``rewrite``: new constant arguments or a phantom op, in
the frontend-neutral terms of :mod:`.rewrite`, which the lowerings apply to an fx or
an ONNX node).  ``keeps_zero`` says whether the entries
of its outputs that removed units take are exactly zero in the zeroed model, which is
what lets a layer norm or a sum reduce over a prunable axis.  An op with no rule is a
barrier.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..analysis.labels import Labels
    from ..ir.graph import Node
    from ..passes.shrink import Shrink
    from .rewrite import OnnxArg, Rewrite

_RULES: dict[str, "Rule"] = {}
_ATEN: dict[str, str] = {}
_ONNX: dict[str, str] = {}


class Rule:
    """Base rule; subclasses override what applies to them."""

    op: str = ""
    onnx_args: dict[tuple[str, str], "OnnxArg"] = {}
    """(ONNX op type, IR argument name) -> where ONNX keeps an argument :meth:`rewrite`
    sets, where that is not an attribute of the same name."""
    mode_args: dict[str, str] = {}
    """ATen op -> its argument that follows ``.train()``/``.eval()`` (batch norm's
    ``training``): a compact module sets it when its mode changes."""

    def propagate(self, node: "Node", lab: "Labels") -> None:
        lab.barrier(node, f"no channel rule for {node.source_op or node.op}")

    def keeps_zero(self, node: "Node", lab: "Labels") -> bool:
        """Whether every entry of the node's outputs whose atom is removed is exactly zero
        once the removed units' parameters are (a zeroed filter's channel is; a sigmoid of
        it is not).  Read through :meth:`Labels.is_zero`; default: not known, which is
        always sound."""
        return False

    def rewrite(self, node: "Node", shrink: "Shrink") -> "Rewrite | None":
        """The node's new constant arguments for the compact shapes, or the phantom op it
        becomes (default: nothing changes).  A pure function of the IR and ``shrink``."""
        return None


def register(op: str, *, aten: tuple[str, ...] = (), onnx: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a rule for canonical ``op`` under ATen/ONNX names."""
    def deco(cls: type) -> type:
        rule = cls()
        rule.op = op
        _RULES[op] = rule
        for a in aten:
            _ATEN[a] = op
        for o in onnx:
            _ONNX[o] = op
        return cls
    return deco


def canonical_aten(packet: str) -> str:
    _load()
    return _ATEN.get(packet, f"aten::{packet}")


def canonical_onnx(op_type: str) -> str:
    _load()
    return _ONNX.get(op_type, f"onnx::{op_type}")


def rule_for(op: str) -> Rule:
    _load()
    return _RULES.get(op) or _UNKNOWN


def known_ops() -> dict[str, list[str]]:
    """Canonical op -> the ATen and ONNX names that map to it (for docs and tests)."""
    _load()
    out: dict[str, list[str]] = {k: [] for k in _RULES}
    for a, op in _ATEN.items():
        out[op].append(f"aten.{a}")
    for o, op in _ONNX.items():
        out[op].append(f"onnx::{o}")
    return out


_UNKNOWN = Rule()
_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import compute, elementwise, movement, normalization, reduction  # noqa: F401
