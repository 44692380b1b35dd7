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


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type (a Cast's ``to``)."""
    import numpy as np
    from onnx import helper

    return torch.from_numpy(np.empty(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def tensor_attr(value: Any) -> torch.Tensor:
    """An ONNX tensor attribute (a ``TensorProto``, as the importer keeps it) as a tensor."""
    import numpy as np
    from onnx import numpy_helper

    return torch.from_numpy(np.array(numpy_helper.to_array(value)))


def same_pads(size: list[int], kernel: list[int], strides: list[int], dilations: list[int],
              auto_pad: str, pads: list[int] | None) -> tuple[list[int], list[int]]:
    """(begin, end) padding of each spatial axis of an ONNX conv or pool: its ``pads``, or
    what ``auto_pad`` SAME_UPPER/SAME_LOWER asks for (output = ceil(input / stride))."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for s, k, st, d in zip(size, kernel, strides, dilations):
            total = max((-(-s // st) - 1) * st + (k - 1) * d + 1 - s, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


# ---- outputs from shapes alone, for the recorder (see ``register(shape_only=...)``)

def same_shape(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input's shape and dtype (activations, dropout, normalisations)."""
    return torch.empty_like(args[0])


def in_place(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first argument itself, unless the op would broadcast it (then the kernel runs)."""
    other = args[1] if len(args) > 1 else None
    if isinstance(other, torch.Tensor) and torch.broadcast_shapes(args[0].shape, other.shape) != args[0].shape:
        return None
    return args[0]


def broadcast(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A broadcasting binary op: broadcast shape, promoted dtype (true division of integers
    gives the default float type)."""
    if kwargs:
        return None
    a, b = args[0], args[1]
    shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape
    return torch.empty(shape, dtype=torch.result_type(a, b), device="meta")


def true_division(args: tuple, kwargs: dict) -> torch.Tensor | None:
    out = broadcast(args, kwargs)
    if out is not None and not out.dtype.is_floating_point and not out.dtype.is_complex:
        return torch.empty(out.shape, dtype=torch.get_default_dtype(), device="meta")
    return out
