"""The check zeroes units in the weights themselves (no copy of a transformer's weights)
and puts every value back bit for bit: kept in memory or spilled to disk, on success and
on an error, through tied weights and block slices."""
from __future__ import annotations

import pytest
import torch
import torchvision

import graphprune as gp
from graphprune.analysis.block_groups import block_groups
from graphprune.in_place import ZeroedInPlace


def _half(size: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: size // 2]] = True
    return mask


def _tiny_llama(tied: bool) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tied,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("spill_above", [1 << 30, 0], ids=["in-memory", "spilled"])
def test_zeroed_units_are_zero_inside_and_every_value_is_back_after(spill_above: int) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = gp.trace(model, torch.randn(1, 3, 32, 32), verify=False)
    groups = [*g.groups, *block_groups(g, block=(2, 16))]
    assert any(s.is_block for grp in groups for s in grp.slices)
    masks = [(grp, _half(grp.size, i)) for i, grp in enumerate(groups)]
    before = {k: v.detach().clone() for k, v in g.params.items()}
    zeroer = ZeroedInPlace(g.params, masks, spill_above=spill_above)
    with zeroer as tensors:
        assert tensors is g.params and zeroer.spilled == (spill_above == 0)
        for grp, mask in masks:
            assert bool(grp.zero_mask(tensors)[mask].all())
        assert sum(int((v != before[k]).sum()) for k, v in tensors.items()) > 0
    assert all(torch.equal(v, before[k]) for k, v in g.params.items())
    assert not zeroer.spilled  # the temporary folder is gone


def test_an_error_inside_still_puts_every_value_back() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = gp.trace(model, torch.randn(1, 3, 32, 32), verify=False)
    before = {k: v.detach().clone() for k, v in g.params.items()}
    with pytest.raises(RuntimeError, match="stop"):
        with ZeroedInPlace(g.params, [(grp, _half(grp.size, 0)) for grp in g.groups], spill_above=0):
            raise RuntimeError("stop")
    assert all(torch.equal(v, before[k]) for k, v in g.params.items())


def test_verify_runs_on_the_weights_themselves_and_restores_tied_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tied embedding and LM head share storage and are both sliced by the hidden group:
    the check zeroes and restores them in place (no copy handed to the compare), and the
    model keeps its groups, its values and its tie."""
    model = _tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = gp.trace(model, (torch.randint(0, 96, (1, 12)),), verify=False)
    seen = []
    compare = type(g.backend).compare
    monkeypatch.setattr(type(g.backend), "compare",
                        lambda self, pg, tensors, *a, **k: seen.append(tensors is pg.params) or compare(self, pg, tensors, *a, **k))
    assert g.verify(spill_above=0) == [] and seen == [True]
    assert any(grp.kind == "channel" and len(grp.slices) > 10 for grp in g.groups)  # the hidden columns
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_verify_spills_the_saved_weights_only_where_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the saved weights stay in memory while the available memory holds them
    beside two more copies of the weights (a compact model, a forward); past 1 GiB else."""
    import graphprune.prunable as prunable

    g = gp.trace(torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32), verify=False)
    weights = sum(t.numel() * t.element_size() for t in g.params.values())
    seen: list[int] = []

    class Spying(ZeroedInPlace):
        def __init__(self, params, masks, spill_above):  # type: ignore[no-untyped-def]
            seen.append(spill_above)
            super().__init__(params, masks, spill_above)

    monkeypatch.setattr(prunable, "ZeroedInPlace", Spying)
    for available in (0, 8 << 30):
        monkeypatch.setattr(prunable, "available_bytes", lambda: available)
        assert g.verify() == []
    assert seen == [1 << 30, (8 << 30) - 2 * weights]
