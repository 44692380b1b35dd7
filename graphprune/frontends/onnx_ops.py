"""Torch implementations of ONNX data-movement ops, so the analysis can run them on
channel labels (see :meth:`graphprune.analysis.labels.Labels.run_on_labels`).

Each takes the node's input tensors positionally and its *normalised* attributes
(constant inputs such as Reshape's shape already resolved into Python lists by the
importer), so one implementation serves every opset.
"""
from __future__ import annotations

from typing import Callable

import torch

Impl = Callable[..., object]


def _reshape(x: torch.Tensor, *_: object, shape: list[int], allowzero: int = 0, **__: object) -> torch.Tensor:
    dims = [x.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
    return x.reshape(dims)


def _flatten(x: torch.Tensor, *_: object, axis: int = 1, **__: object) -> torch.Tensor:
    axis %= max(1, x.dim())
    return x.reshape(int(torch.Size(x.shape[:axis]).numel()), -1)


def _squeeze(x: torch.Tensor, *_: object, axes: list[int] | None = None, **__: object) -> torch.Tensor:
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(x: torch.Tensor, *_: object, axes: list[int], **__: object) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _expand(x: torch.Tensor, *_: object, shape: list[int], **__: object) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


def _transpose(x: torch.Tensor, *_: object, perm: list[int] | None = None, **__: object) -> torch.Tensor:
    return x.permute(perm if perm else list(reversed(range(x.dim()))))


def _concat(*xs: torch.Tensor, axis: int, **__: object) -> torch.Tensor:
    return torch.cat([x for x in xs if x is not None], dim=axis)


def _split(x: torch.Tensor, *_: object, axis: int = 0, split: list[int], **__: object) -> tuple[torch.Tensor, ...]:
    return torch.split(x, split, dim=axis)


def _slice(x: torch.Tensor, *_: object, starts: list[int], ends: list[int], axes: list[int] | None = None,
           steps: list[int] | None = None, **__: object) -> torch.Tensor:
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise NotImplementedError("negative Slice steps")
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _gather(x: torch.Tensor, indices: torch.Tensor, *_: object, axis: int = 0, **__: object) -> torch.Tensor:
    axis %= x.dim()
    idx = indices.long() % x.shape[axis]
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _gather_elements(x: torch.Tensor, indices: torch.Tensor, *_: object, axis: int = 0, **__: object) -> torch.Tensor:
    return torch.gather(x, axis, indices.long() % x.shape[axis])


def _gather_nd(x: torch.Tensor, indices: torch.Tensor, *_: object, batch_dims: int = 0, **__: object) -> torch.Tensor:
    """ONNX GatherND: the last axis of ``indices`` addresses the ``k`` axes of ``x`` after
    its ``batch_dims`` leading ones; the remaining axes of ``x`` ride along."""
    b, k = batch_dims, indices.shape[-1]
    lead = x.shape[:b]
    xs = x.reshape(-1, *x.shape[b:])                      # batch axes merged
    idx = indices.long().reshape(xs.shape[0], -1, k)      # per batch entry, a list of k-tuples
    sizes = torch.tensor(x.shape[b:b + k])
    idx = idx % sizes
    rows = torch.arange(xs.shape[0]).unsqueeze(1).expand(-1, idx.shape[1])
    out = xs[(rows, *idx.unbind(-1))]                     # (batch, n, *x.shape[b + k:])
    return out.reshape(*lead, *indices.shape[b:-1], *x.shape[b + k:])


def _depth_to_space(x: torch.Tensor, *_: object, blocksize: int, mode: str = "DCR", **__: object) -> torch.Tensor:
    b, c, h, w = x.shape
    r = blocksize
    if mode == "CRD":
        return x.reshape(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)
    return x.reshape(b, r, r, c // (r * r), h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c // (r * r), h * r, w * r)


def _space_to_depth(x: torch.Tensor, *_: object, blocksize: int, **__: object) -> torch.Tensor:
    b, c, h, w = x.shape
    r = blocksize
    return x.reshape(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).reshape(b, c * r * r, h // r, w // r)


def _tile(x: torch.Tensor, *_: object, repeats: list[int], **__: object) -> torch.Tensor:
    return x.repeat(repeats)


ONNX_IMPLS: dict[str, Impl] = {
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Expand": _expand,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "GatherND": _gather_nd, "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Tile": _tile,
}
