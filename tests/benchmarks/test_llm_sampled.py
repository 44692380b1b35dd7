"""A config too large to run with weights (``benchmarks/llm.py``'s Mistral-7B) is verified
at two layers with weights and its full-depth groups matched to the verified ones: the
match holds for the same widths at any depth, and fails where a layer's widths differ."""
from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

pytest.importorskip("transformers")


def test_full_depth_groups_match_the_verified_sample_of_the_same_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphprune as gp

    llm = load_benchmark("llm")
    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=64)
    monkeypatch.setitem(llm.CONFIGS, "mistral-tiny", ("MistralConfig", "MistralForCausalLM", tiny))
    monkeypatch.setitem(llm.CONFIGS, "mistral-wider-mlp", ("MistralConfig", "MistralForCausalLM",
                                                           {**tiny, "intermediate_size": 128}))
    for name, matched in (("mistral-tiny", True), ("mistral-wider-mlp", False)):
        cfg, meta = llm._model(name, weights=False)
        full = gp.trace(meta, example_kwargs={"input_ids": llm._example(cfg), "use_cache": False}, verify=False)
        assert len(full.groups) == 2 * 6 + 1  # heads and MLP units per layer, one hidden group
        check = llm._sampled_check("mistral-tiny", full)
        assert check["withdrawn"] == 0 and check["sampled_layers"] == 2
        n = len(full.groups)
        assert check["structural"] == (f"{n}/{n}" if matched else f"{n - 6}/{n}")  # the 6 MLP groups differ
