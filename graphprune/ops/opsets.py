"""The op sets graphprune must know, and how much of each its registry covers.

Two closed lists define "every op": the *core* ATen operators (``torch.Tag.core``: what
``torch.export`` decomposes a program into) and the ``ai.onnx`` operators up to an opset.
Each op is covered by a rule (channels flow through it) or by a declared barrier (kept
on purpose, with a reason: :func:`graphprune.ops.registry.declare_barrier`); anything
else would be an unknown op, a barrier that only says "no channel rule".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .catalog import ATEN, ONNX
from .registry import BARRIERS

ONNX_OPSET = 23


def core_aten_ops() -> list[str]:
    """ATen packets (``add``, ``convolution``) with at least one overload tagged core, out of
    every op the dispatcher has registered (``torch.ops.aten`` only lists the packets some
    code has touched, so what it shows depends on what ran before)."""
    import torch

    names = sorted({op[len("aten::"):].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
                    if op.startswith("aten::")})
    core = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        if any(torch.Tag.core in getattr(packet, o).tags for o in packet.overloads()):
            core.append(name)
    return core


def onnx_ops(opset: int = ONNX_OPSET) -> list[str]:
    """Op types of the default ``ai.onnx`` domain defined at or before ``opset`` (deprecated
    ones too: old files still hold them)."""
    import onnx.defs

    return sorted({s.name for s in onnx.defs.get_all_schemas_with_history()
                   if s.domain in ("", "ai.onnx") and s.since_version <= opset})


@dataclass(frozen=True)
class Coverage:
    """One op set split into ops with a rule, declared barriers and unknown ops."""

    name: str
    rules: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.rules) + len(self.barriers) + len(self.unknown)
        return (f"{self.name}: {total} ops, {len(self.rules)} with a rule, {len(self.barriers)} declared barriers, "
                f"{len(self.unknown)} unknown" + (f" ({', '.join(self.unknown)})" if self.unknown else ""))


def _split(name: str, ops: list[str], table: dict[str, str]) -> Coverage:
    cov = Coverage(name)
    for op in ops:
        canonical = table.get(op)
        (cov.unknown if canonical is None else cov.barriers if canonical in BARRIERS else cov.rules).append(op)
    return cov


def coverage(opset: int = ONNX_OPSET) -> tuple[Coverage, Coverage]:
    """(core ATen, ai.onnx up to ``opset``) as the registry covers them now."""
    return _split("core ATen", core_aten_ops(), ATEN), _split(f"ai.onnx (opset <= {opset})", onnx_ops(opset), ONNX)
