"""PairedTimer: a model timed in turn with a reference, read on the reference's scale."""
import pytest
import torch
from torch import nn

from graphprune.codegen import layer_latency


class FakeCompiled:
    """A compiled model whose time is its base times the machine's current slowness, in every
    window of a timing but those a burst of interference slows (``bursts`` pops how many of
    the next timing's windows it takes, and how much slower they run)."""

    def __init__(self, base_ms: float, slowness: list[float], bursts: list[tuple[int, float]] | None = None) -> None:
        self.base_ms, self.slowness, self.bursts = base_ms, slowness, bursts if bursts is not None else []

    def benchmark(self, repeat: int = 7) -> dict[str, float]:
        windows, factor = self.bursts.pop(0) if self.bursts else (0, 1.0)
        times = sorted([self.base_ms * self.slowness[0] * factor] * windows
                       + [self.base_ms * self.slowness[0]] * (repeat - windows))
        return {"median_ms": times[repeat // 2], "min_ms": times[0]}


def test_drift_after_the_reference_was_timed_cancels_in_the_ratio(monkeypatch):
    """The machine slows by 20% after the dense reference was timed: a half-size model timed
    then reads at half the reference, where timing it alone would read 60%."""
    slowness = [1.0]
    monkeypatch.setattr(layer_latency, "build", lambda model, *a, **k: FakeCompiled(model, slowness))
    timer = layer_latency.PairedTimer(4.0, (torch.zeros(1),), rounds=3)
    assert timer.reference_ms == pytest.approx(4.0)
    slowness[0] = 1.2
    assert timer(2.0) == pytest.approx(0.5 * timer.reference_ms)
    assert FakeCompiled(2.0, slowness).benchmark()["median_ms"] / 4.0 == pytest.approx(0.6)


def test_a_slow_start_does_not_set_the_scale(monkeypatch):
    """The reference was first timed during a slow minute (25% slow): once the machine is
    back, the scale follows the median of all the reference's timings, not the first ones."""
    slowness = [1.25]
    monkeypatch.setattr(layer_latency, "build", lambda model, *a, **k: FakeCompiled(model, slowness))
    timer = layer_latency.PairedTimer(4.0, (torch.zeros(1),), rounds=3)
    slowness[0] = 1.0
    for width in (3.0, 2.5, 2.0):
        timer(width)
    assert timer.reference_ms == pytest.approx(4.0)
    assert timer(2.0) == pytest.approx(2.0)


def test_a_burst_over_most_of_a_timing_does_not_move_it(monkeypatch):
    """Interference slows 5 of the 7 windows of the compact model's timing in two of three
    rounds by 30%: its medians would read those rounds 30% slow and the timer 0.65 of the
    reference; the best windows read the half it is."""
    bursts = {4.0: [], 2.0: [(5, 1.3), (5, 1.3), (0, 1.0)]}
    monkeypatch.setattr(layer_latency, "build", lambda model, *a, **k: FakeCompiled(model, [1.0], bursts[model]))
    timer = layer_latency.PairedTimer(4.0, (torch.zeros(1),), rounds=3)
    assert timer(2.0) == pytest.approx(2.0)


def test_times_a_real_compiled_model_on_the_reference_scale():
    """Two real compiled models: the narrower one reads faster than the reference."""
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    wide, narrow = nn.Linear(512, 512), nn.Linear(512, 64)
    x = (torch.randn(64, 512),)
    timer = layer_latency.PairedTimer(wide, x, "x86", rounds=2, repeat=3)
    assert 0 < timer(narrow) < timer.reference_ms


@pytest.mark.parametrize("trials", [0, 1, 8])
def test_carried_schedules_are_measured_into_the_database_before_a_build_when_asked(monkeypatch, trials):
    """With ``schedule_trials`` the reference and every timed model first go through a tune of
    that many trials into the timer's database (the carried-over schedules measured first),
    and the functions that lag a wider one tuned on (:func:`~graphprune.codegen.tuning.catch_up`),
    then the build; without, nothing is tuned."""
    calls = []
    monkeypatch.setattr(layer_latency, "build", lambda model, *a, **k: calls.append(("build", model))
                        or FakeCompiled(model, [1.0]))
    monkeypatch.setattr(layer_latency, "tune", lambda model, inputs, target, db, trials_per_task: calls.append(
        ("tune", model, db, trials_per_task)))
    monkeypatch.setattr(layer_latency, "catch_up", lambda model, inputs, target, db, trials: calls.append(
        ("catch up", model, db, trials)))
    timer = layer_latency.PairedTimer(4.0, (torch.zeros(1),), "x86", "db", rounds=1, schedule_trials=trials)
    timer(2.0)
    expected = [("build", 4.0), ("build", 2.0)]
    if trials:
        expected = [("tune", 4.0, "db", trials), ("catch up", 4.0, "db", trials), ("build", 4.0),
                    ("tune", 2.0, "db", trials), ("catch up", 2.0, "db", trials), ("build", 2.0)]
    assert calls == expected
