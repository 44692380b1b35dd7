"""Block groups: units that are R x C blocks of a layer's weight, for in-layer block sparsity.

Channel groups (``g.groups``) remove whole rows and make layers narrower; a block group
instead zeroes blocks *inside* a linear or 1x1-convolution weight, which makes the layer
block-sparse (BSR) but no smaller. That is worth something only to a kernel that skips
zero blocks: ``graphprune.codegen.build(..., sparse="auto")`` uses TIR BSR kernels where
they measure faster than the dense one. The block shape should be the one the build
will use (16x1 vectorises over output rows at batch 1; 1x16 over inputs).

Block groups are not zero-invariant channel groups: they are never added to ``g.groups``
and ``construct_subnet`` ignores them (a zero block leaves the compact model's shape
alone). Pass them to an optimizer or scorer explicitly:

>>> blocks = block_groups(g, block=(16, 1))
>>> opt = gp.HESSO(g, lr=0.05, groups=blocks, target=gp.Target(groups=0.8))  # 80% of blocks zero
>>> opt = gp.HESSO(g, lr=0.05, groups=[*g.groups, *blocks], target=gp.Target(flops=0.5))  # both kinds

FLOPs accounting: one block saves ``R * C * tokens`` multiply-accumulates, where
``tokens`` is how many input rows the layer sees at the example shape (batch x sequence
for a linear layer, batch x H x W for a 1x1 convolution).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from graphprune.errors import UnsupportedModelError
from graphprune.ops.catalog import rule_for

from .groups import Group, Slice

if TYPE_CHECKING:
    from ..prunable import PrunableGraph


def _candidate_layers(g: PrunableGraph) -> dict[str, str]:
    """Module name -> its ``weight``, for every layer whose registry entry says a BSR matmul
    computes it exactly (:meth:`Rule.block_sparse_weight`: linear layers, pointwise
    convolutions).  Block groups are addressed by module, so a weight that is not its
    module's ``weight`` (a fused attention in-projection) is not among them."""
    out = {}
    for node in g.ir.nodes:
        w = rule_for(node.op).block_sparse_weight(node, g.ir)
        name = g.ir.values[w].source_name if w is not None else None
        if name is not None and (name == "weight" or name.endswith(".weight")):
            out[name[: -len("weight")].rstrip(".")] = name
    return out


def block_groups(g: PrunableGraph, block: tuple[int, int] = (16, 1), layers: Iterable[str] | None = None) -> list[Group]:
    """One :class:`Group` of kind ``"block"`` per eligible weight of the traced model ``g``.

    ``block`` is (rows, cols) of the weight seen as an (out_features x in_features) matrix.
    ``layers`` restricts to these module names (default: every linear and 1x1 convolution);
    a weight whose shape is not a multiple of the block is skipped, or rejected if named in
    ``layers``. Unit ``u`` of a group is block ``(u // (K/C), u % (K/C))`` in row-major order.
    """
    model = getattr(g, "model", None)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError("block groups need a traced nn.Module (they are named by its layers)",
                                    hint="trace the PyTorch model rather than its ONNX export")
    r, c = block
    if r < 1 or c < 1:
        raise ValueError(f"block must be positive, got {block}")
    candidates = _candidate_layers(g)
    wanted = list(candidates) if layers is None else list(layers)
    unknown = [n for n in wanted if n not in candidates]
    if unknown:
        raise ValueError(f"not a linear or 1x1 convolution layer: {unknown}")
    macs = g.param_macs
    next_id = max((grp.id for grp in g.groups), default=-1) + 1
    groups: list[Group] = []
    for name in wanted:
        param = candidates[name]
        weight = g.params[param]
        n, k = weight.shape[:2]
        if n % r or k % c:
            if layers is not None:
                raise ValueError(f"{param} {tuple(weight.shape)} is not a multiple of block {block}")
            continue
        rows, cols = torch.meshgrid(torch.arange(n // r), torch.arange(k // c), indexing="ij")
        index = (rows.reshape(-1, 1) * r + torch.arange(r)).long()
        index2 = (cols.reshape(-1, 1) * c + torch.arange(c)).long()
        tokens = macs.get(param, 0.0) / weight.numel()
        groups.append(Group(id=next_id, name=name, kind="block", size=index.shape[0],
                            slices=[Slice(param, 0, index, dim2=1, index2=index2)],
                            params_per_unit=r * c, flops_per_unit=float(r * c * tokens)))
        next_id += 1
    return groups


def block_sparsity(g: PrunableGraph, groups: list[Group]) -> float:
    """Fraction of all blocks in ``groups`` that are exactly zero in ``g``'s current weights."""
    zero = sum(int((grp.gather(g.params).abs().amax(dim=1) == 0).sum()) for grp in groups)
    return zero / max(sum(grp.size for grp in groups), 1)
