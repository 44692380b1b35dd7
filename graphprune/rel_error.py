"""How a compact model's outputs are checked against the zeroed full model's."""
from __future__ import annotations

from typing import Any

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
