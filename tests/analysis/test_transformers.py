"""Zero-invariance on Hugging Face transformers built from small random configs.

No weights are downloaded: every model (see :mod:`tests.analysis.hf_models`) is built
from a config with 1-2 layers and a hidden size of 32-64.  Both the fused
``scaled_dot_product_attention`` and the "eager" matmul-softmax-matmul attention are
covered, because the two lower to different ATen graphs.
"""
from __future__ import annotations

import pytest

import graphprune as gp
from tests.helpers import check_zero_invariance

pytest.importorskip("transformers")

from tests.analysis.hf_models import MODELS, build  # noqa: E402  (needs transformers)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_invariance(name: str, attention: str) -> None:
    model, inputs = build(name, attention)
    g = check_zero_invariance(model, inputs)
    spec = MODELS[name]
    head_groups = [grp for grp in g.groups if grp.kind == "head"]
    if spec.heads is None:
        assert not head_groups, g.summary()
    else:
        assert head_groups and all(grp.size == spec.heads for grp in head_groups), g.summary()
    assert any(grp.kind == "channel" and grp.size == spec.mlp for grp in g.groups), g.summary()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_self_verification_keeps_every_group(name: str) -> None:
    """``gp.trace`` with ``verify`` withdraws nothing and reports only the expected
    barriers (ops whose channels must stay, kept conservatively and named)."""
    model, inputs = build(name, "sdpa")
    g = gp.trace(model, inputs)
    assert not g.withdrawn, g.summary()
    assert sorted({b.op for b in g.barriers}) == sorted(MODELS[name].barriers), g.summary()


def test_gqa_head_slices() -> None:
    """A Llama GQA unit owns its key/value head's rows and its query heads' rows and columns."""
    model, inputs = build("llama_gqa", "sdpa")
    g = gp.trace(model, inputs, verify=False)
    head = next(grp for grp in g.groups if grp.kind == "head")
    rows = {s.param.rsplit(".", 2)[-2]: (s.dim, s.index.shape[1]) for s in head.slices}
    head_dim = 64 // 4
    assert rows["q_proj"] == (0, 2 * head_dim) and rows["o_proj"] == (1, 2 * head_dim)
    assert rows["k_proj"] == (0, head_dim) and rows["v_proj"] == (0, head_dim)
