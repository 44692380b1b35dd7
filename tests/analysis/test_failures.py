"""Failures are typed: a rule or a check that raises is a bug surfaced as an error naming
node, op and file, distinct from an op that is knowingly a barrier and from a group that
fails the numeric check (withdrawn and reported)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis.labels import Labels
from graphprune.errors import RuleError, VerificationError
from graphprune.ir.graph import Node
from graphprune.ops.catalog import canonical_aten, rule_for


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_rule_that_raises_is_an_error_naming_node_op_and_file(monkeypatch: pytest.MonkeyPatch) -> None:
    relu = rule_for(canonical_aten("relu"))

    def broken(self: object, node: Node, lab: Labels) -> None:
        raise IndexError("tuple index out of range")
    monkeypatch.setattr(type(relu), "propagate", broken)
    with pytest.raises(RuleError) as info:
        gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    err = info.value
    assert err.node and "relu" in err.node and "relu" in err.op
    assert err.source.endswith("Mlp") and "IndexError: tuple index out of range" in str(err)
    assert "graphprune/ops/" in str(err)  # the file of the rule to fix
    assert isinstance(err.__cause__, IndexError)


def test_a_rule_that_declares_a_barrier_is_a_reported_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    relu = rule_for(canonical_aten("relu"))

    def keep(self: object, node: Node, lab: Labels) -> None:
        lab.barrier(node, "test: channels kept on purpose")
    monkeypatch.setattr(type(relu), "propagate", keep)
    g = gp.trace(Mlp(), torch.randn(3, 6))
    assert [b.reason for b in g.barriers] == ["test: channels kept on purpose"]
    assert "relu" in g.barriers[0].op and "channels kept on purpose" in g.summary()


def test_a_check_that_raises_is_an_error_not_a_withdrawn_group(monkeypatch: pytest.MonkeyPatch) -> None:
    g = gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    assert g.groups

    def broken(pg: object, tensors: object, removed: object = None, example: object = None) -> float:
        raise KeyError("fc.weight")
    monkeypatch.setattr(g.backend, "compare", broken)
    with pytest.raises(VerificationError, match="KeyError") as info:
        g.verify()
    assert info.value.source.endswith("Mlp") and g.groups and not g.withdrawn


def test_a_group_that_fails_the_numeric_check_is_withdrawn_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    g = gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    bad = g.groups[0]

    def compare(pg: gp.PrunableGraph, tensors: dict[str, torch.Tensor], removed: object = None,
                example: object = None) -> float:
        touched = any(bool((tensors[s.param] == 0).any()) for s in bad.slices)
        return 1.0 if touched else 0.0
    monkeypatch.setattr(g.backend, "compare", compare)
    withdrawn = g.verify()
    assert [w.id for w, _ in withdrawn] == [bad.id] and bad not in g.groups
    assert "rel. error" in withdrawn[0][1] and bad.name in g.summary()


class TwoBranches(nn.Module):
    """A branch whose channels are reversed before its consumer reads them (``roll``'s
    rule, if broken, pairs the wrong columns) beside a plain branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)
        self.c, self.d = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).roll(3, -1)) + self.d(torch.relu(self.c(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_broken_group_checked_with_good_ones_is_the_only_one_withdrawn(monkeypatch: pytest.MonkeyPatch,
                                                                         dtype: torch.dtype) -> None:
    """The default path checks every group in one zeroed forward and bisects only on a
    failure: a group broken by a wrong rule (``roll`` passed through as if elementwise)
    is found among the good ones and withdrawn alone, on the replayed recording (batch 1).
    In bf16 too: the tolerance follows the rounding, and the broken group still fails it."""
    roll, relu = rule_for(canonical_aten("roll")), rule_for(canonical_aten("relu"))
    torch.manual_seed(1)  # the wrong pairing moves the output by 0.6 of its size (seed 0: 0.017, under bf16's 0.03)
    model, x = TwoBranches().eval().to(dtype), torch.randn(1, 6, dtype=dtype)
    calls = []
    honest = gp.trace(model, x)
    assert honest.backend.replay is not None and not honest.withdrawn
    assert [grp.name for grp in honest.groups] == ["c"]  # roll's rule keeps a's channels

    monkeypatch.setattr(type(roll), "propagate", lambda self, node, lab: type(relu).propagate(relu, node, lab))
    from graphprune.frontends.torch_backend import TorchBackend
    compare = TorchBackend.compare
    monkeypatch.setattr(TorchBackend, "compare", lambda self, *a, **k: calls.append(1) or compare(self, *a, **k))
    g = gp.trace(model, x)
    assert g.backend.replay is not None, "the replayed program reproduces the model: it stays"
    assert [w.name for w, _ in g.withdrawn] == ["a"] and [grp.name for grp in g.groups] == ["c"]
    assert "rel. error" in g.withdrawn[0][1] and "a" in g.summary()
    # one batched check, its two halves, then the full program checked alone (nothing removed)
    assert len(calls) == 4


def test_a_bf16_model_keeps_its_groups() -> None:
    """Half-precision rounding is no failure: a Llama in bf16 keeps every group the float32
    one has (with float32's tolerance its compact model's rounding withdrew them)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=1024, use_cache=False)
    model, inputs = transformers.LlamaForCausalLM(cfg), (torch.randint(0, 512, (1, 16)),)  # wide enough to round
    full = gp.trace(model.eval(), inputs)
    half = gp.trace(model.to(torch.bfloat16), inputs)
    assert not half.withdrawn and [g.name for g in half.groups] == [g.name for g in full.groups]


class Branching(nn.Module):
    """Two linear layers with a pre-hook that logs the batch of every real (non-meta) call;
    ``odd_at`` is a batch at which the forward returns something else."""

    def __init__(self, odd_at: int | None = None) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)
        self.odd_at = odd_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        return -y if x.shape[0] == self.odd_at else y


def _batches_seen(model: nn.Module) -> list[int]:
    seen: list[int] = []
    model.a.register_forward_pre_hook(lambda m, args: None if args[0].is_meta else seen.append(args[0].shape[0]))
    return seen


def test_an_example_batch_of_eight_is_verified_on_two_samples() -> None:
    """The replayed program takes any batch, so the check runs the zeroed model on two of
    the example's samples, not on all eight."""
    model = Branching().eval()
    seen = _batches_seen(model)
    g = gp.trace(model, torch.randn(8, 6))
    assert g.backend.replay is not None and g.backend.replay.any_batch
    assert seen == [2] and g.groups and not g.withdrawn and not g.notes


def test_a_difference_at_the_small_batch_is_judged_at_the_examples_batch() -> None:
    """A model that computes something else at a batch of two (here: the output negated)
    fails the small check; nothing is withdrawn for it: the check runs again at the
    example's batch, which passes, and the summary says so."""
    model = Branching(odd_at=2).eval()
    seen = _batches_seen(model)
    g = gp.trace(model, torch.randn(8, 6))
    assert seen == [2, 8] and [grp.name for grp in g.groups] == ["a"] and not g.withdrawn
    assert any("first samples" in n for n in g.notes)


def test_a_broken_group_is_withdrawn_at_the_examples_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong rule fails the batch-2 check and then the example's batch, where it is
    withdrawn alone as at a batch of one."""
    roll, relu = rule_for(canonical_aten("roll")), rule_for(canonical_aten("relu"))
    monkeypatch.setattr(type(roll), "propagate", lambda self, node, lab: type(relu).propagate(relu, node, lab))
    torch.manual_seed(1)
    model = TwoBranches().eval()
    seen: list[int] = []
    model.a.register_forward_pre_hook(lambda m, args: None if args[0].is_meta else seen.append(args[0].shape[0]))
    g = gp.trace(model, torch.randn(8, 6))
    assert [w.name for w, _ in g.withdrawn] == ["a"] and [grp.name for grp in g.groups] == ["c"]
    assert seen[0] == 2 and set(seen[1:]) == {8}, seen
