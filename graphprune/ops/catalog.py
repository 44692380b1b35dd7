"""Every op entry, registered explicitly, and the lookups over them.

Importing this module imports each entry module, and each registers its rules into
:mod:`.registry` as it is defined; the registry itself imports none of its entries, so
entries and registry do not import each other.  A new entry module is added to the
import below.
"""
from __future__ import annotations

from typing import Any

import torch

from . import (along_axis, barriers, compute, elementwise, movement, normalization,  # noqa: F401  (they register)
               quantize, reduction, rnn, scatter)
from .registry import ATEN, ONNX, ONNX_OPS, RULES, SHAPE_ONLY, OnnxOp, Rule, ShapeOnly

_UNKNOWN = Rule()  # the base rule: a barrier that names the op


def canonical_aten(packet: str) -> str:
    """The canonical op an ATen packet maps to (``aten::<packet>`` if none)."""
    return ATEN.get(packet, f"aten::{packet}")


def canonical_onnx(op_type: str) -> str:
    """The canonical op an ONNX op_type maps to (``onnx::<op_type>`` if none)."""
    return ONNX.get(op_type, f"onnx::{op_type}")


def decomposes(func: Any) -> bool:
    """Whether a recorded ATen op is replaced by its decomposition before it reaches the
    registry: a composite op (its only kernel is ``CompositeImplicitAutograd``: PyTorch
    defines it by other ATen calls, ``reshape_as``, ``expand_as``, ``type_as``, ``flatten``,
    ``unflatten`` and hundreds more) that no entry names.  The entries name the composite
    ops they want whole (``conv2d``, ``linear``, ``scaled_dot_product_attention``,
    ``layer_norm``...: a layer's structure, not its arithmetic); every other one arrives as
    the core ops it is made of, so the registry needs rules for core ops only."""
    if not isinstance(func, torch._ops.OpOverload) or func.overloadpacket.__name__ in ATEN:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def onnx_op(op_type: str) -> OnnxOp | None:
    """How the ONNX op type is imported and run in torch (None: no entry maps it)."""
    return ONNX_OPS.get(op_type)


def shape_only() -> dict[str, ShapeOnly]:
    """ATen overload (``"add.Tensor"``) -> its output from its inputs' shapes (see ``register``)."""
    return dict(SHAPE_ONLY)


def rule_for(op: str) -> Rule:
    """The rule of a canonical op; an op without one gets the base rule, a reported barrier."""
    return RULES.get(op) or _UNKNOWN


def known_ops() -> dict[str, list[str]]:
    """Canonical op -> the ATen and ONNX names that map to it (for docs and tests)."""
    out: dict[str, list[str]] = {k: [] for k in RULES}
    for a, op in ATEN.items():
        out[op].append(f"aten.{a}")
    for o, op in ONNX.items():
        out[op].append(f"onnx::{o}")
    return out
