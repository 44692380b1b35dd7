"""PyTorch capture on model code as libraries write it (issue 18): modules shared under
several paths, state computed on the first call, verification that fails for a reason
that is not numeric.  Real timm architectures from small configs where they exist."""
from __future__ import annotations

import pytest
import torch

import graphprune as gp
from tests.helpers import check_zero_invariance, n_params

timm = pytest.importorskip("timm")


def test_a_module_shared_under_two_paths_is_left_as_it_was() -> None:
    """CoaT's convolutional position encoding ``cpe1`` is also ``serial_blocks1.0.cpe``.
    Recording and verifying used to leave the user's model holding meta tensors under one
    of the paths (export then failed: ``weight is on meta``), and the compact model held
    a copy of the shared weights per path (so it was not smaller)."""
    from timm.models.coat import CoaT
    torch.manual_seed(0)
    model = CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 32, 32), serial_depths=(1, 1, 1, 1), parallel_depth=0,
                 num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    before = dict(model.named_parameters(remove_duplicate=False))
    g = gp.trace(model, (x,))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[k] is before[k] for k in before), "the user's model holds other tensors after tracing"
    assert not g.withdrawn, g.summary()
    assert n_params(g.construct_subnet()) == n_params(model)  # one tensor per shared weight, as in the model
    check_zero_invariance(model, (x,))
