"""Layers timed for the latency tables on real compiled kernels (TVM on x86)."""
import pytest
import torch

from graphprune.ops.registry import Layer

pytest.importorskip("tvm")

from graphprune.codegen import layer_latency  # noqa: E402
from graphprune.codegen.tuning import tune  # noqa: E402


@pytest.mark.slow
def test_a_width_is_timed_on_its_measured_schedule_and_remembers_which(tmp_path):
    """A narrower width than the tuned one first has its carried-over schedules measured into
    the database, so it is timed on the one a compile keeps; each timing names the database's
    best seconds for its functions under the keys the database's own records read back as,
    which is how a table later finds the entries the database has improved on."""
    torch.manual_seed(0)
    layer = Layer("w", "dense", 1, 0, (256, 256), rows=64, epilogue=("relu",))
    tune(*layer_latency.layer_module(layer, 256, 256), "x86", tmp_path, trials_per_task=4)
    donor = layer_latency.best_known("x86", tmp_path)
    (wide_ms, wide), (narrow_ms, narrow) = layer_latency.measure_layers([(layer, 256, 256), (layer, 256, 96)],
                                                                        "x86", tmp_path)
    best = layer_latency.best_known("x86", tmp_path)
    assert set(wide) == set(donor)  # the tuned width: its record, nothing new
    assert narrow and not set(narrow) & set(donor)  # the narrow width: functions of its own,
    assert all(best[h] == s for fns in (wide, narrow) for h, s in fns.items())  # each with a measured record
    assert narrow_ms > 0 and wide_ms > 0
