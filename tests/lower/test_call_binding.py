"""A graph-form compact model is called as the user's model is: by the forward's own
signature, the traced non-tensor inputs filled in, anything else refused clearly."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import graphprune as gp
from graphprune.rel_error import max_rel_error
from tests.helpers import zero_random_half


class Gated(torch.nn.Module):
    """Keyword inputs whose signature order is not the example's, and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x=None, mask=None, gate=True, *, scale=1.0):  # noqa: ANN001, ANN201
        h = torch.relu(self.up(x))
        y = self.down(h) * scale
        return y * mask if gate else y


def _compact(recorder: bool) -> tuple[gp.PrunableGraph, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, mask = torch.randn(3, 8), torch.rand(3, 8)
    g = gp.trace(Gated().eval(), example_kwargs={"mask": mask, "x": x, "gate": True}, recorder=recorder)
    zero_random_half(g)
    return g, g.construct_subnet(), x, mask


@pytest.mark.parametrize("recorder", [True, False], ids=["replayed", "exported"])
def test_positional_and_partial_calls_bind_by_the_forward_signature(recorder: bool) -> None:
    g, compact, x, mask = _compact(recorder)
    with torch.no_grad():
        ref = g.model(x, mask, True)  # the zeroed full model
        for out in (compact(x, mask), compact(mask=mask, x=x), compact(x, mask, gate=True),
                    compact(mask=mask, x=x, gate=True, scale=1.0)):
            assert max_rel_error(ref, out) < 1e-5


def test_the_traced_specialisation_is_not_silently_ignored() -> None:
    _, compact, x, mask = _compact(True)
    with pytest.raises(ValueError, match="traced with gate=True"):
        compact(x, mask, False)
    with pytest.raises(TypeError, match="needs the input 'mask'"):
        compact(x)
    with pytest.raises(TypeError, match="traced without 'scale'"):
        compact(x, mask, scale=2.0)
    with pytest.raises(TypeError, match="model's own arguments"):
        compact(x, mask, True, 1.0)


def test_bound_compact_model_survives_saving_and_copying() -> None:
    _, compact, x, mask = _compact(True)
    buf = io.BytesIO()
    torch.save(compact, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        want = compact(x, mask)
        assert torch.equal(loaded(x, mask), want)
        assert torch.equal(copy.deepcopy(compact)(x, mask), want)


def test_lm_traced_with_keywords_recovers_on_plain_id_batches() -> None:
    """A causal LM traced as ``example_kwargs={"input_ids": ..., "use_cache": False}`` (the
    way transformers models are usually called) takes plain id batches, as ``gp.recover``
    and ``generate``-style code pass them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, 64, (2, 12))
    g = gp.trace(model, example_kwargs={"input_ids": ids, "use_cache": False})
    gp.prune(g, "l2", 0.3)
    compact = g.construct_subnet(mode="graph")
    with torch.no_grad():
        assert torch.equal(compact(ids).logits, compact(input_ids=ids, use_cache=False).logits)
    with pytest.raises(ValueError, match="use_cache"):
        compact(ids, use_cache=True)
    before = [p.detach().clone() for p in compact.parameters()]
    data = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    gp.recover(compact, dense, data, steps=3, augment=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, compact.parameters()))
