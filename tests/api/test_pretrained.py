"""Transformers-native compact models: with the same widths in every layer the compact
model is a standard transformers model (``save_pretrained`` -> ``from_pretrained`` ->
``generate()``), and with per-layer widths ``graphprune.load_pretrained`` reloads it
exactly.  Small random configs, nothing downloaded; the reference is always the zeroed
full model's greedy generation."""
from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.optim.uniform import role
from graphprune.rel_error import max_rel_error

transformers = pytest.importorskip("transformers")

PROMPT = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if family == "phi3":  # fused qkv_proj and gate_up_proj; its attention reads config.num_attention_heads
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, pad_token_id=0, eos_token_id=2)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


def _trace(model: torch.nn.Module) -> gp.PrunableGraph:
    # the cache a generating model returns is no tensor: trace the plain forward
    return gp.trace(model, example_kwargs={"input_ids": PROMPT, "use_cache": False}, verify=False)


def _zero_per_role(g: gp.PrunableGraph, counts: dict[str, int], seed: int = 0) -> None:
    """Zero ``counts[role]`` units of every head / MLP group (different units in each layer)
    and of the hidden width (``embed``, through every RMS norm)."""
    gen = torch.Generator().manual_seed(seed)
    for grp in g.groups:
        n = counts.get("head" if grp.kind == "head" else "mlp" if ".mlp." in grp.name else "embed", 0)
        mask = torch.zeros(grp.size, dtype=torch.bool)
        mask[torch.randperm(grp.size, generator=gen)[:n]] = True
        grp.scatter_(g.params, mask)


def _generate(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=16, do_sample=False, min_new_tokens=16)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_uniform_compact_model_round_trips_through_from_pretrained(family: str, tmp_path) -> None:
    model = _model(family)
    g = _trace(model)
    _zero_per_role(g, {"head": 2, "mlp": 40, "embed": 16})
    expected = _generate(model)  # the zeroed full model
    compact = g.construct_subnet(mode="module")
    assert type(compact) is type(model) and g.compact_form.endswith("config rewritten")
    cfg = compact.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.hidden_size) == (2, 4, 8, 56, 48)
    assert cfg.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * 64 / 48)  # the norms' rescale
    assert model.config.num_key_value_heads == 4  # the user's config is not the compact one's
    compact.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in compact.parameters())
    assert torch.equal(_generate(loaded), expected)
    other = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_rel_error(model(input_ids=other).logits, loaded(input_ids=other).logits) < 1e-4


def test_prune_uniform_then_save_and_load(tmp_path) -> None:
    """The whole path a user takes: prune(uniform=True) -> module -> from_pretrained."""
    model = _model("llama")
    g = _trace(model)
    report = gp.prune(g, "l2", gp.Target(params=0.15), uniform=True)
    counts: dict[tuple, set[int]] = {}
    for grp, mask in zip(report.groups, report.masks):
        counts.setdefault(role(grp), set()).add(int(mask.sum()))
    assert all(len(c) == 1 for c in counts.values()) and report.achieved["params"] >= 0.15
    expected = _generate(model)
    compact = g.construct_subnet(mode="module")
    compact.save_pretrained(tmp_path)
    assert torch.equal(_generate(type(model).from_pretrained(tmp_path).eval()), expected)


def test_per_layer_widths_reload_exactly_with_load_pretrained(tmp_path) -> None:
    model = _model("llama")
    g = _trace(model)
    gen = torch.Generator().manual_seed(1)
    for k, grp in enumerate(g.groups):  # layer 0 and layer 1 lose different numbers of units
        if grp.kind == "head" or ".mlp." in grp.name:
            mask = torch.zeros(grp.size, dtype=torch.bool)
            mask[torch.randperm(grp.size, generator=gen)[: (k % 3) + (30 if grp.kind != "head" else 0)]] = True
            grp.scatter_(g.params, mask)
    expected = _generate(model)
    compact = g.construct_subnet(mode="module")
    assert "load_pretrained" in g.compact_form
    widths = {m.self_attn.k_proj.out_features for m in compact.model.layers}
    assert len(widths) == 2
    compact.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)mismatch"):  # plain transformers refuses rather than reinitialising
        type(model).from_pretrained(tmp_path)
    loaded = gp.load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in compact.state_dict().items()}
    assert all(torch.equal(v, compact.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(_generate(loaded), expected)


def test_widths_the_config_validator_refuses_are_recorded_instead(tmp_path) -> None:
    """6 query heads do not divide a hidden size of 64, which LlamaConfig refuses even
    with head_dim explicit (Llama-3.2-1B pruned 20% met it): the config keeps the full
    model's fields, records the shapes, and load_pretrained reloads exactly."""
    model = _model("llama")
    g = _trace(model)
    _zero_per_role(g, {"head": 1, "mlp": 40})
    expected = _generate(model)
    compact = g.construct_subnet(mode="module")
    assert "refuses the compact widths" in g.compact_form
    assert compact.config.num_attention_heads == 8 and compact.config.graphprune_shapes
    compact.save_pretrained(tmp_path)
    loaded = gp.load_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.q_proj.out_features == 48
    assert torch.equal(_generate(loaded), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compensated_biases_survive_save_and_load(family: str, tmp_path) -> None:
    """Calibrated obspa gives ``o_proj``/``down_proj`` (no bias) the removed units' mean.
    Llama's config has flags that build those biases (``attention_bias``, ``mlp_bias``):
    they are set, the family's other projections get zero biases, and plain
    ``from_pretrained`` generates as the compact model does.  Qwen2 has no such flag: the
    compact form says so, plain ``from_pretrained`` would drop the biases, and
    ``gp.load_pretrained`` builds them."""
    model = _model(family)
    g = _trace(model)
    offered = [grp for grp in g.groups if grp.kind == "head" or ".mlp." in grp.name]  # the hidden width stays
    calib = [torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    for heads, share in ((True, 0.5), (False, 0.25)):  # half the KV groups (4 of 8 query heads), a quarter of the MLP
        g.groups = [grp for grp in offered if (grp.kind == "head") == heads]
        gp.prune(g, "obspa", gp.Target(groups=share), data=calib, uniform=True)
    g.groups = offered
    assert {n.rsplit(".", 2)[-2] for n in g.added_biases} == {"o_proj", "down_proj"}
    compact = g.construct_subnet(mode="module")  # checked against the zeroed model plus the biases
    assert all(layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias.abs().max() > 0
               for layer in compact.model.layers)
    expected = _generate(compact)
    compact.save_pretrained(tmp_path)
    if family == "llama":
        assert g.compact_form.endswith("config rewritten")
        assert compact.config.attention_bias and compact.config.mlp_bias
        assert torch.count_nonzero(compact.model.layers[0].self_attn.q_proj.bias) == 0
        loaded = type(model).from_pretrained(tmp_path).eval()
    else:
        assert "no field that makes Qwen2ForCausalLM build a bias" in g.compact_form
        loaded = gp.load_pretrained(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in compact.parameters())
    assert torch.equal(_generate(loaded), expected)
