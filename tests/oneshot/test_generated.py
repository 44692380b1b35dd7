"""A generative LM given no data calibrates and recovers on text it samples itself: the
sampler draws from the model's own distribution, leaves global state alone, and
``gp.prune``/``gp.recover``/``gp.compile`` use it exactly when no data is given (their
quality on a trained LM is measured in ``benchmarks/pretrained.py``)."""
from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.errors import GraphPruneError
from graphprune.optim import generated
from graphprune.optim.generated import can_generate, continuations, generated_inputs

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _few_samples(monkeypatch) -> None:
    """Sixteen sampled sequences by default here, not 256: the wiring is under test, not the sampler's size."""
    monkeypatch.setattr(generated, "DEFAULT_SEQUENCES", 16)


def _lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=24,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _trace(model: torch.nn.Module) -> gp.PrunableGraph:
    ids = torch.arange(1, 9).view(1, 8)
    return gp.trace(model, example_kwargs={"input_ids": ids, "use_cache": False}, verify=False)


def test_sampling_is_the_models_own_and_leaves_global_state_alone() -> None:
    model = _lm()
    model.train()
    rng = torch.get_rng_state()
    batches = generated_inputs(model, n=10, length=40, batch=4, seed=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # RNG and mode as they were
    ids = torch.cat(batches)
    assert [len(b) for b in batches] == [4, 4, 2] and ids.shape == (10, 24)  # capped by the context
    assert (ids[:, 0] == 1).all()  # from BOS
    assert torch.equal(torch.cat(generated_inputs(model, n=10, length=40, batch=4, seed=3)), ids)
    assert not torch.equal(torch.cat(generated_inputs(model, n=10, length=40, batch=4, seed=4)), ids)
    # at a vanishing temperature sampling is the model's greedy choice: the tokens come from it
    cold = torch.cat(generated_inputs(model.eval(), n=2, length=12, seed=0, temperature=1e-4))
    with torch.no_grad():
        greedy = model.generate(cold[:, :1], attention_mask=torch.ones_like(cold[:, :1]), do_sample=False,
                                max_length=12, eos_token_id=None, pad_token_id=1)
    assert torch.equal(cold, greedy)


def test_only_generative_language_models_sample() -> None:
    assert can_generate(_lm())
    assert not can_generate(torch.nn.Linear(3, 3))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    assert not can_generate(bert)
    with pytest.raises(GraphPruneError, match="cannot generate"):
        generated_inputs(torch.nn.Linear(3, 3))


def test_prune_without_data_calibrates_on_the_models_own_samples() -> None:
    target = gp.Target(flops=0.3)
    g = _trace(_lm())
    report = gp.prune(g, target=target)
    assert report.criterion == "obspa" and report.calibration is not None
    assert "sampled itself" in report.reason
    # exactly what passing those samples does
    model = _lm()
    same = gp.prune(_trace(model), target=target, data=generated_inputs(model))
    assert all(torch.equal(a, b) for a, b in zip(report.masks, same.masks))
    # opted out, or a criterion that reads no calibration: the weights alone
    off = gp.prune(_trace(_lm()), target=target, generate=False)
    assert off.calibration is None and "sampled" not in off.reason
    assert gp.prune(_trace(_lm()), "l2", target).calibration is None


def test_generate_true_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(GraphPruneError, match="does not read"):
        gp.prune(_trace(_lm()), "l2", 0.3, generate=True)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    with pytest.raises(GraphPruneError, match="generative language model"):
        gp.prune(gp.trace(conv, (torch.randn(1, 3, 8, 8),), verify=False), "obspa", 0.3, generate=True)


def test_recover_without_data_distils_on_the_dense_models_samples() -> None:
    dense = _lm()
    g = _trace(_lm())
    gp.prune(g, "l2", gp.Target(flops=0.4))
    compact = g.construct_subnet(mode="module")  # the transformers model: it takes input_ids alone
    result = gp.recover(compact, dense, steps=5)
    assert result.batches == 4 and result.improved  # twice the default sequences, in batches of 8
    with pytest.raises(GraphPruneError, match="none were given"):
        gp.recover(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), steps=1)


def test_continuations_write_on_from_the_rows_openings() -> None:
    model = _lm().train()
    rows = torch.randint(3, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    out = continuations(model, rows, n=7, prefix=5, batch=4, seed=2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # RNG and mode as they were
    ids = torch.cat(out)
    assert [len(b) for b in out] == [4, 3] and ids.shape == (7, 20)
    assert torch.equal(ids[:, :5], rows[torch.arange(7) % 3, :5])  # each row's opening, cycled through
    assert not torch.equal(ids[:, 5:], rows[torch.arange(7) % 3, 5:])  # and the model's own text after it
    assert torch.equal(torch.cat(continuations(model, rows, n=7, prefix=5, batch=4, seed=2)), ids)
    # at a vanishing temperature the continuation is the model's greedy one
    cold = torch.cat(continuations(model.eval(), rows[:1], n=1, prefix=5, temperature=1e-4))
    with torch.no_grad():
        greedy = model.generate(rows[:1, :5], attention_mask=torch.ones_like(rows[:1, :5]), do_sample=False,
                                max_length=20, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cold, greedy)
    with pytest.raises(GraphPruneError, match="integer ids"):
        continuations(model, rows.float(), n=2)
    with pytest.raises(GraphPruneError, match="prefix"):
        continuations(model, rows, n=2, prefix=20)
    with pytest.raises(GraphPruneError, match="cannot generate"):
        continuations(torch.nn.Linear(3, 3), rows, n=2)


def test_recover_distils_on_the_dense_models_continuations_too() -> None:
    dense = _lm()
    data = [torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def recovered(**kw) -> tuple[gp.Recovery, torch.nn.Module]:
        g = _trace(_lm())
        gp.prune(g, "l2", gp.Target(flops=0.4))
        compact = g.construct_subnet(mode="module")
        return gp.recover(compact, dense, data, steps=6, loss="kl", **kw), compact

    # by default, as many sequences as the steps draw beyond the data: 6 x 4 - 8 = 16, in batches of 4
    default, a = recovered()
    assert default.augmented_batches == 4 and default.batches == 2 and "continuations" in repr(default)
    alone, b = recovered(augment=0)
    assert alone.augmented_batches == 0
    # the continuations are trained on (the loss itself is measured on the data alone)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    capped, _ = recovered(augment=3)
    assert capped.augmented_batches == 1  # three sequences: one short batch
    # a dense model that cannot write text takes no augment, and says so when one is asked for
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    images = [torch.randn(2, 3, 6, 6)]
    assert gp.recover(conv, conv, images, steps=2).augmented_batches == 0
    with pytest.raises(GraphPruneError, match="cannot generate"):
        gp.recover(conv, conv, images, steps=2, augment=4)


def test_compile_without_calibration_samples_for_scoring_and_recovery() -> None:
    ids = torch.arange(1, 9).view(1, 8)
    model = _lm()
    model.config.use_cache = False  # the plain forward: a KV cache is no tensor to trace
    result = gp.compile(model, (ids,), target=0.3, recover_steps=20)
    report = result.report
    assert "sampled itself" in report.criterion_reason and report.calibration is not None
    # the 16 sampled sequences, shaped like the example (the compact graph is traced at that size),
    # and 20 - 16 continuations of them, shaped alike
    recovery = report.recovery
    assert recovery["batches"] == 16 and recovery["steps"] == 20 and not recovery["skipped_batches"]
    assert recovery["augmented_batches"] == 4 and "4 of the dense model's continuations" in report.summary()
    assert report.flops_removed > 0.25
