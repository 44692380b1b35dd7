"""The core property on real architectures: for any zeroed half of every group, the
compact model reproduces the zeroed full model and has fewer parameters."""
from __future__ import annotations

import pytest
import torch
import torchvision

from tests.analysis import blocks
from tests.helpers import check_zero_invariance

torch.manual_seed(0)

BLOCKS = {
    "se": (blocks.SEBlock, lambda: torch.randn(2, 3, 8, 8)),
    "channel_shuffle": (blocks.ChannelShuffle, lambda: torch.randn(2, 3, 8, 8)),
    "unet_skip": (blocks.UNetSkip, lambda: torch.randn(2, 3, 8, 8)),
    "dense_concat": (blocks.DenseConcat, lambda: torch.randn(2, 3, 8, 8)),
    "gated_chunk": (blocks.GatedChunk, lambda: torch.randn(2, 5, 12)),
    "shared_weights": (blocks.SharedWeights, lambda: torch.randint(0, 50, (2, 7))),
    "pixel_shuffle": (blocks.PixelShuffleNet, lambda: torch.randn(2, 3, 8, 8)),
    "flatten_linear": (blocks.FlattenLinear, lambda: torch.randn(2, 3, 6, 6)),
    "group_norm": (blocks.GroupNormNet, lambda: torch.randn(2, 3, 8, 8)),
    "moe": (blocks.MixtureOfExperts, lambda: torch.randn(2, 5, 12)),
    "mha": (blocks.Attention, lambda: torch.randn(2, 6, 32)),
    "gqa": (blocks.GroupedQueryAttention, lambda: torch.randn(2, 6, 32)),
    "rotary_table_gqa": (blocks.RotaryTableGQA, lambda: torch.randn(2, 6, 32)),
    "einsum_attention": (blocks.EinsumAttention, lambda: torch.randn(2, 6, 32)),
    "resize_to_size": (blocks.ResizeToSize, lambda: torch.randn(2, 3, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block(name):
    cls, make = BLOCKS[name]
    check_zero_invariance(cls(), make())


FAST_TORCHVISION = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf"]


@pytest.mark.parametrize("name", FAST_TORCHVISION)
def test_torchvision_fast(name):
    model = torchvision.models.get_model(name, num_classes=10)
    check_zero_invariance(model, torch.randn(2, 3, 64, 64))


def _classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.slow
@pytest.mark.parametrize("name", _classification_models())
def test_torchvision_all(name):
    model = torchvision.models.get_model(name, num_classes=10)
    size = 224 if any(k in name for k in ("vit", "swin", "maxvit")) else 96
    if name.startswith("inception") or name == "googlenet":
        model = torchvision.models.get_model(name, num_classes=10, aux_logits=False, init_weights=False)
        size = 96
    check_zero_invariance(model, torch.randn(2, 3, size, size))


def test_groups_are_reported_in_user_names():
    g = check_zero_invariance(blocks.SEBlock(), torch.randn(2, 3, 8, 8))
    names = {s.param for grp in g.groups for s in grp.slices}
    assert "conv.weight" in names and "fc2.weight" in names and "head.weight" in names
    trunk = next(grp for grp in g.groups if any(s.param == "conv.weight" for s in grp.slices))
    # the SE gate's output channels are tied to the trunk's channels
    assert {"conv.weight", "bn.weight", "fc2.weight", "fc1.weight", "head.weight"} <= set(trunk.param_names)
    assert trunk.param_slices(0)[0][2] == [0] or trunk.size == 16


def test_heads_are_units():
    g = check_zero_invariance(blocks.GroupedQueryAttention(), torch.randn(2, 6, 32))
    heads = [grp for grp in g.groups if grp.kind == "head"]
    assert len(heads) == 1 and heads[0].size == 2  # one unit per key/value group
    by_param = {s.param: s.index.shape[1] for s in heads[0].slices}
    assert by_param["q.weight"] == 16 and by_param["k.weight"] == 8  # 2 query heads + 1 kv head


def test_keyword_and_dict_io():
    model = blocks.DictInputs().eval()
    import graphprune as gp
    g = gp.trace(model, example_kwargs={"x": torch.randn(3, 6), "y": torch.randn(3, 4)})
    assert g.groups
    compact = g.construct_subnet()
    out = compact(x=torch.randn(3, 6), y=torch.randn(3, 4))
    assert set(out) == {"logits", "probs"}


def test_unknown_op_is_a_reported_barrier():
    import graphprune as gp
    g = gp.trace(blocks.UnknownOp(), torch.randn(2, 8))
    assert any("sort" in b.op for b in g.barriers)
    assert "sort" in g.summary()
    touched = {s.param for grp in g.groups for s in grp.slices}
    assert "a.weight" not in touched  # channels entering the unknown op are kept
    check_zero_invariance(blocks.UnknownOp(), torch.randn(2, 8))


def test_compact_model_takes_any_batch_size():
    import graphprune as gp
    from tests.helpers import zero_random_half
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = gp.trace(model, torch.randn(2, 3, 32, 32), verify=False)
    zero_random_half(g)
    compact = g.construct_subnet()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(compact(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_fully_zeroed_group_erases_its_branch_or_keeps_one_zero_unit():
    """A zeroed residual branch is erased (see tests/passes/test_erasure.py); the zeroed
    stem, the only path to the output, keeps one zero filter instead."""
    import copy
    import graphprune as gp
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = gp.trace(model, torch.randn(2, 3, 32, 32), verify=False)
    for name in ("layer1.0.conv1", "conv1"):
        grp = next(grp for grp in g.groups if grp.name == name)
        grp.scatter_(g.params, torch.ones(grp.size, dtype=torch.bool))
    compact = g.construct_subnet()
    assert not hasattr(compact.gm.layer1.get_submodule("0").conv1, "weight")
    assert compact.gm.conv1.weight.shape[0] == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), rtol=1e-4, atol=1e-5)
    copy.deepcopy(compact)


def test_constant_table_does_not_pin_heads():
    """A constant [1, 1, seq, head_dim] rotary table multiplies the heads: its entries along
    the sequence go together, so the heads stay prunable (they were all pinned before)."""
    g = check_zero_invariance(blocks.RotaryTableGQA(), torch.randn(2, 6, 32))
    assert [(grp.kind, grp.size) for grp in g.groups] == [("head", 2)]


def test_zero_mask_is_the_gathered_units_zero_test():
    """``Group.zero_mask`` reduces slice by slice (gathering a hidden-column group copied
    the model three times); it must say exactly what ``gather(...).abs().amax(1) == 0``
    said, NaN (not zero) and -0.0 (zero) included."""
    import graphprune as gp
    from tests.helpers import zero_random_half
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32).eval()
    g = gp.trace(model, (torch.randn(2, 3, 16, 16),), verify=False)
    zero_random_half(g)
    params = {k: v.detach().clone() for k, v in g.params.items()}

    def same() -> None:
        for grp in g.groups:
            assert torch.equal(grp.zero_mask(params), grp.gather(params).abs().amax(dim=1) == 0)
    same()
    for v in params.values():
        v[v == 0] = -0.0
    same()
    grp = g.groups[0]
    unit = int(grp.zero_mask(params).nonzero()[0])
    s = grp.slices[0]
    row = [slice(None)] * params[s.param].dim()
    row[s.dim] = int(s.index[unit, 0])
    params[s.param][tuple(row)] = float("nan")  # a zeroed unit with a NaN is not zero
    assert not grp.zero_mask(params)[unit]
    same()
