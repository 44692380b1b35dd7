"""Module mode: the compact model is a copy of the user's own module, its standard layers
shrunk in place and its width attributes found, and it computes what the zeroed model
computes (on the example and on another input), or the reason it cannot be is given.

The property is the graph form's: for a model and zeroed units, compact == zeroed full
model.  Every model here keeps its class (``type(compact) is type(model)``)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torchvision

import graphprune as gp
from graphprune.errors import NotInPlace
from graphprune.rel_error import max_rel_error
from tests.helpers import n_params, randomise_batch_norms


def _zero_half(g: gp.PrunableGraph, keep: Callable[[gp.Group], bool] = lambda grp: True, seed: int = 0) -> None:
    """Zero a random half (rounded down) of the units of the groups ``keep`` accepts."""
    gen = torch.Generator().manual_seed(seed)
    for grp in g.groups:
        if keep(grp):
            mask = torch.zeros(grp.size, dtype=torch.bool)
            mask[torch.randperm(grp.size, generator=gen)[: grp.size // 2]] = True
            grp.scatter_(g.params, mask)


def _assert_in_place(model: torch.nn.Module, g: gp.PrunableGraph, *inputs: tuple) -> torch.nn.Module:
    """The module-mode compact model keeps the class, shrinks, leaves the user's model
    alone, and equals the zeroed model (``model``, zeroed in place) on every input."""
    before = n_params(model)
    compact = g.construct_subnet(mode="module")
    assert type(compact) is type(model)
    assert compact is not model and n_params(model) == before
    mine = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in mine for p in compact.parameters())  # training it leaves the user's alone
    assert n_params(compact) < before
    assert g.compact_form.startswith("module")
    for args in inputs:
        with torch.no_grad():
            assert max_rel_error(model(*args), compact(*args)) < 1e-4
    return compact


def test_resnet_keeps_its_class_and_shrinks_every_layer() -> None:
    model = randomise_batch_norms(torchvision.models.resnet18(num_classes=10))
    g = gp.trace(model, (torch.randn(1, 3, 32, 32),), verify=False)
    _zero_half(g)
    compact = _assert_in_place(model, g, (torch.randn(1, 3, 32, 32),), (torch.randn(3, 3, 48, 48),))
    conv, bn = compact.layer1[0].conv1, compact.layer1[0].bn1
    assert conv.out_channels == conv.weight.shape[0] < 64 and bn.num_features == conv.out_channels
    assert compact.fc.in_features == compact.fc.weight.shape[1] < 512


def test_vit_mlp_in_place_and_heads_fall_back_with_the_reason() -> None:
    """torchvision's ViT: MLP units shrink its Linear layers in place; heads cannot
    (``nn.MultiheadAttention`` requires its inner width to be the model width), so module
    mode says so and "auto" builds the graph, which still equals the zeroed model."""
    def vit() -> torch.nn.Module:
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                    hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    x = (torch.randn(2, 3, 32, 32),)
    model = vit()
    g = gp.trace(model, x, verify=False)
    _zero_half(g, lambda grp: ".mlp." in grp.name)
    compact = _assert_in_place(model, g, x, (torch.randn(1, 3, 32, 32),))
    assert compact.encoder.layers[0].mlp[0].out_features == 32

    model = vit()
    g = gp.trace(model, x, verify=False)
    _zero_half(g, lambda grp: grp.kind == "head")
    with pytest.raises(NotInPlace, match="user's own module"):
        g.construct_subnet(mode="module")
    compact = g.construct_subnet(mode="auto")
    assert type(compact) is not type(model) and g.compact_form.startswith("graph (module mode failed: ")
    with torch.no_grad():
        assert max_rel_error(model(*x), compact(*x)) < 1e-4


class Attention(torch.nn.Module):
    """Self-attention that reshapes with its own width attributes, as hand-written
    attention does: ``heads`` and ``inner`` scale with the heads kept, ``head_dim`` stays."""

    def __init__(self, dim: int = 16, heads: int = 4, head_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim, self.inner = heads, head_dim, heads * head_dim
        self.qkv = torch.nn.Linear(dim, 3 * self.inner)
        self.out = torch.nn.Linear(self.inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        return x + self.out(a.transpose(1, 2).reshape(b, t, self.inner))


def test_the_width_attributes_the_forward_reads_are_found() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Attention(), Attention()).eval()
    x = (torch.randn(2, 5, 16),)
    g = gp.trace(model, x, verify=False)
    assert [grp.kind for grp in g.groups] == ["head", "head"]
    _zero_half(g)
    compact = _assert_in_place(model, g, x, (torch.randn(3, 7, 16),))
    assert [(m.heads, m.head_dim, m.inner) for m in compact] == [(2, 4, 8), (2, 4, 8)]
    assert "width attributes set" in g.compact_form


def test_a_pruned_hidden_width_under_a_layer_norm_falls_back_with_the_reason() -> None:
    """BERT's layer norms subtract the mean over the hidden width: with fewer channels no
    rescale keeps them exact (RMS norms, which have no mean, are rescaled: see
    tests/api/test_pretrained.py), which only the graph form rewrites; the reason names a norm."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = gp.trace(model, (torch.randint(0, 100, (2, 7)),), verify=False)
    hidden = [grp for grp in g.groups if grp.name == "bert.embeddings.word_embeddings"]
    assert len(hidden) == 1
    _zero_half(g, lambda grp: grp is hidden[0])
    with pytest.raises(NotInPlace, match="normalises over a pruned axis"):
        g.construct_subnet(mode="module")


def test_module_mode_refuses_what_it_cannot_be() -> None:
    model = randomise_batch_norms(torchvision.models.resnet18(num_classes=10))
    g = gp.trace(model, (torch.randn(1, 3, 32, 32),), verify=False)
    _zero_half(g)
    with pytest.raises(NotInPlace, match="fold_bn"):
        g.construct_subnet(fold_bn=True, mode="module")
    with pytest.raises(gp.GraphPruneError, match="unknown construct_subnet mode"):
        g.construct_subnet(mode="inplace")
