"""Small helpers the op rules share: reading arguments and output values of a node."""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Ref


def ref_name(a: Any) -> str | None:
    return a.name if isinstance(a, Ref) else None


def as_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return [int(x)]


def numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())
