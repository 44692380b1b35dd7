"""Small helpers the op rules share: reading arguments and output values of a node."""
from __future__ import annotations

from typing import Any

import torch

from ..analysis.labels import Labels
from ..ir.graph import Node, Ref


def ref_name(a: Any) -> str | None:
    return a.name if isinstance(a, Ref) else None


def tensor_inputs(node: Node) -> list[str]:
    return node.inputs


def first_input(node: Node) -> str:
    return node.inputs[0]


def is_param(lab: Labels, name: str | None) -> bool:
    return name is not None and lab.graph.values[name].kind in ("param", "buffer", "const")


def as_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return [int(x)]


def numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())
