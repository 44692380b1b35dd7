"""How a compact model's outputs are checked against the zeroed full model's."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch.utils import _pytree as pytree


def max_rel_error(ref: Any, out: Any) -> float:
    """The largest ``max|ref - out| / max|ref|`` over the floating-point outputs of two
    pytrees of torch tensors or numpy arrays (leaves matched in order); ``inf`` when two
    matched outputs differ in shape."""
    worst = 0.0
    for a, b in zip(pytree.tree_leaves(ref), pytree.tree_leaves(out)):
        if not isinstance(a, (torch.Tensor, np.ndarray)):
            continue
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape:
            return float("inf")
        if a.is_floating_point():
            worst = max(worst, float((a - b).abs().max() / (a.abs().max() + 1e-12)))
    return worst


#: how many units of rounding of a model's least precise float type its compact model may
#: differ by: the compact model's narrower matmuls sum in another order, and in bf16 that
#: grows with depth (random Phi-3-mini weights, every group right: 0.009 at 4 layers, 0.016
#: at 8, 0.033-0.040 at its 32; the same in float32: 2e-6), while a wrong pairing moves the
#: output by tenths
ROUNDING_UNITS = 8


def check_tolerance(rtol: float, tensors: Iterable[torch.Tensor]) -> float:
    """The check's relative tolerance: ``rtol`` (which holds for float32), raised to
    :data:`ROUNDING_UNITS` of the least precise floating-point type among ``tensors``
    (bf16: 0.0625).  A wrong pairing that moves the outputs by less than that cannot be
    told from rounding in that precision; one that does still fails."""
    floats = {t.dtype for t in tensors if t.is_floating_point()}
    return max([rtol, *(ROUNDING_UNITS * torch.finfo(d).eps for d in floats)])
