"""Verification on cheaper examples (:mod:`graphprune.frontends.small_check`): a picture
is checked on a crop of it where the model runs the same ops there, and only a pass
counts there; a plan that rewrites a size following the picture, a model that runs
other ops on (or fails on) the crop and a broken group all go on to the next example:
a batch's first samples, and at last the example itself."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.frontends.small_check import cropped, small_side, varying_nodes
from graphprune.frontends.torch_record import record_call
from graphprune.ops.catalog import canonical_aten, rule_for
from graphprune.rel_error import max_rel_error
from tests.helpers import zero_random_half


class Net(nn.Module):
    """Two convolutions and a linear head on the mean over pixels; ``flat`` averages a
    ``reshape`` to (batch, channels, height * width), a size that follows the picture;
    ``rolled`` rolls the channels between the convolutions; ``pos`` adds a learned map
    of the example's size, as a vision transformer's position embedding ties it to one."""

    def __init__(self, flat: bool = False, rolled: bool = False, pos: int | None = None) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b, self.head = nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Linear(24, 5)
        self.flat, self.rolled = flat, rolled
        self.pos = nn.Parameter(torch.randn(1, 16, pos, pos)) if pos else None
        for p in self.bn.parameters():
            nn.init.uniform_(p, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        if self.pos is not None:
            h = h + self.pos
        if self.rolled:
            h = torch.roll(h, 3, dims=1)
        h = self.b(h)
        if self.flat:
            return self.head(h.reshape(h.shape[0], h.shape[1], h.shape[2] * h.shape[3]).mean(-1))
        return self.head(h.mean((2, 3)))


def _sizes_seen(model: Net) -> list[tuple[int, int]]:
    """(batch, width) of every real (non-meta) call of the first convolution."""
    seen: list[tuple[int, int]] = []
    model.a.register_forward_pre_hook(
        lambda m, args: None if args[0].is_meta else seen.append((args[0].shape[0], args[0].shape[-1])))
    return seen


def test_small_side_crops_to_a_quarter_in_multiples_of_32() -> None:
    assert [small_side(n) for n in (224, 256, 512, 800, 100, 64, 48, 32)] == [64, 64, 128, 224, 32, 32, 48, 32]


def test_a_picture_is_verified_on_a_crop() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    seen = _sizes_seen(model)
    x = torch.randn(1, 3, 128, 96)
    g = gp.trace(model, x)
    assert seen == [(1, 32)], "the zeroed model ran once, on the 32x32 crop"
    assert [grp.name for grp in g.groups] == [grp.name for grp in gp.trace(model, x, verify=False).groups]
    assert not g.withdrawn and not g.notes
    # and the compact model the user gets, at the example's size, is the zeroed one
    assert zero_random_half(g, seed=1) > 0
    with torch.no_grad():
        assert max_rel_error(model(x), g.construct_subnet()(x)) < 1e-5


def test_a_classifier_ending_in_softmax_compares_its_logits_on_the_crop() -> None:
    """A final softmax's inputs are compared too (saturated outputs hide differences):
    the full model they are read from is lowered from the crop's program as well (the
    pooling's kernel is the picture's size, so the example's program fails on the crop)."""
    class Softmaxed(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.bn(self.a(x))))
            h = nn.functional.avg_pool2d(h, tuple(h.shape[-2:])).flatten(1)
            return torch.softmax(self.head(h), -1)

    model = Softmaxed().eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(1, 3, 128, 128))
    assert seen == [(1, 32)] and not g.withdrawn and not g.notes


def test_a_batch_of_pictures_is_verified_on_two_cropped_samples() -> None:
    model = Net().eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(8, 3, 128, 128))
    assert seen == [(2, 32)] and not g.withdrawn and not g.notes
    assert g.backend.replay.any_batch


def test_a_rewritten_size_that_follows_the_picture_is_judged_on_the_example() -> None:
    """The reshape to (b, c, h * w) shrinks its channel entry in every compact plan, and
    its h * w differs on the crop: the crop cannot speak for the example, which is
    checked instead (no note: nothing was found; the crop's reference ran first)."""
    model = Net(flat=True).eval()
    crop = cropped((torch.randn(1, 3, 128, 128),), {})
    full, small = (record_call(model, (x,), {}) for x in (torch.randn(1, 3, 128, 128), crop[0][0]))
    assert varying_nodes(full, small) == {"reshape"}  # only its h * w follows the picture
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(1, 3, 128, 128))
    assert seen == [(1, 32), (1, 128)] and not g.withdrawn and not g.notes


def test_a_batch_whose_crop_cannot_judge_the_plan_is_verified_on_two_samples() -> None:
    """The crop cannot judge the reshape's rewrite; the batch's first two samples, on the
    model's own any-batch program, can: eight samples are never run."""
    model = Net(flat=True).eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(8, 3, 128, 128))
    assert seen == [(2, 32), (2, 128)] and not g.withdrawn and not g.notes


def test_a_model_tied_to_its_example_size_is_verified_on_the_example() -> None:
    model = Net(pos=128).eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(1, 3, 128, 128))
    assert seen == [(1, 128)] and not g.withdrawn


def test_a_batch_that_does_not_crop_is_still_verified_on_two_samples() -> None:
    """Where the crop does not replay (a learned map of the example's size), a batch of
    eight is still checked on its first two samples, on the model's own program."""
    model = Net(pos=128).eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(8, 3, 128, 128))
    assert seen == [(2, 128)] and not g.withdrawn and not g.notes


def test_a_model_running_other_ops_on_the_crop_is_not_compared_there() -> None:
    class Doubling(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * 2 if x.shape[-1] > 64 else x)

    model = Doubling().eval()
    x = torch.randn(1, 3, 128, 128)
    crop = cropped((x,), {})[0]
    assert varying_nodes(record_call(model, (x,), {}), record_call(model, crop, {})) is None
    seen = _sizes_seen(model)
    gp.trace(model, x)
    assert seen == [(1, 128)]


def test_a_broken_group_fails_on_the_crop_and_is_withdrawn_on_the_example(monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The check is not weakened: with roll given relu's rule (channels kept in place), the
    group of ``a`` is wrong; the crop finds it, and the example, bisected, withdraws it alone."""
    torch.manual_seed(0)
    model = Net(rolled=True).eval()
    honest = gp.trace(model, torch.randn(1, 3, 128, 128))
    assert "a" not in [grp.name for grp in honest.groups]  # roll's own rule keeps a's channels
    roll, relu = rule_for(canonical_aten("roll")), rule_for(canonical_aten("relu"))
    monkeypatch.setattr(type(roll), "propagate", lambda self, node, lab: type(relu).propagate(relu, node, lab))
    seen = _sizes_seen(model)
    with caplog.at_level(logging.INFO, logger="graphprune.prunable"):
        g = gp.trace(model, torch.randn(1, 3, 128, 128))
    assert [w.name for w, _ in g.withdrawn] == ["a"] and "rel. error" in g.withdrawn[0][1]
    assert seen[0] == (1, 32) and set(seen[1:]) == {(1, 128)}, seen
    assert "the check on a crop of the example failed" in caplog.text and not g.notes


def test_a_model_that_fails_on_the_crop_is_checked_on_the_example_without_a_note() -> None:
    """A position table of the example's size passes the meta recording on the crop (its
    broadcast is not checked there) but fails to run: the example is checked, and a crop
    that does not apply is no news for the summary."""
    class Biased(Net):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(1, 1, 32 * 32))  # a bias per key pixel at 64x64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.bn(self.a(x))))
            q = h.flatten(2).transpose(1, 2)  # (b, pixels, c)
            att = nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=self.table)
            return self.head(att.mean(1))

    model = Biased().eval()
    seen = _sizes_seen(model)
    g = gp.trace(model, torch.randn(1, 3, 64, 64))
    assert seen == [(1, 32), (1, 64)] and not g.withdrawn and not g.notes
