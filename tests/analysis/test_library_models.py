"""Architectures from timm (and transformers) whose model code broke capture or analysis
(issue 18's held-out set), each from a small config at a small input: the property must
hold (compact == zeroed, fewer parameters) on the real library code, not on a mimic."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import check_zero_invariance

timm = pytest.importorskip("timm")


def test_weight_standardised_convs_keep_their_batch_statistics() -> None:
    """NFNet's ``ScaledStdConv2d`` standardises its weight with ``F.batch_norm(w, None,
    None, training=True)``: the compact module in eval mode must not switch that batch
    norm to running statistics it does not have (it raised ``running_mean must be defined
    in evaluation mode``).  Its SE units and head stay prunable."""
    from timm.models.nfnet import NfCfg, NormFreeNet
    torch.manual_seed(0)
    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(16, 32, 32, 64), stem_chs=16, group_size=8, num_features=64,
                attn_layer="se", attn_kwargs={"rd_ratio": 0.5})
    g = check_zero_invariance(NormFreeNet(cfg, num_classes=5), (torch.randn(2, 3, 32, 32),))
    assert any("attn_last" in grp.name for grp in g.groups), g.summary()
    compact = g.construct_subnet().train()  # batch statistics in training mode as well
    compact(torch.randn(2, 3, 32, 32))


def test_a_linear_whose_bias_is_computed_keeps_its_outputs() -> None:
    """EVA (DINOv3) and BEiT add ``torch.cat((q_bias, k_bias, v_bias))`` as the qkv bias:
    nothing slices a computed bias, so the qkv features it adds to must stay (the compact
    model failed to run: the full bias against the pruned features)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_dinov3_qkvb", img_size=32, embed_dim=48, depth=1, num_heads=2)
    g = check_zero_invariance(model, (torch.randn(2, 3, 32, 32),))
    assert not any(s.param == "blocks.0.attn.qkv.weight" and s.dim == 0 for grp in g.groups for s in grp.slices)


def test_cross_covariance_attention() -> None:
    """XCiT attends across channels (``q @ k.T`` over [heads, C/heads, tokens], L2-normalised
    along the tokens, a learnt temperature per head) and adds class-attention layers and
    a Fourier positional encoding: issue 18 saw a shape crash in the analysis here."""
    from timm.models.xcit import Xcit
    torch.manual_seed(0)
    model = Xcit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1, num_classes=5)
    g = check_zero_invariance(model, (torch.randn(2, 3, 32, 32),))
    assert any("mlp.fc1" in grp.name for grp in g.groups), g.summary()
