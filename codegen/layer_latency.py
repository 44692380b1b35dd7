"""Time single layers and whole models as the codegen target runs them, for latency targets.

A :class:`~graphprune.ops.registry.Layer` is rebuilt as a one-layer PyTorch module at the
asked widths and compiled exactly as a model would be (same import, fusion, schedules and
tuning database), so its time is the compiled layer's, not an estimate from its FLOPs.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graphprune.ops.registry import Layer

from .compile import build
from .compiled import compile_program
from .frontend import import_model
from .targets import resolve_target
from .tuning import best_by_function, catch_up, has_records, open_database, shared_database_dir, tune


class _WithEpilogue(nn.Module):
    """A layer followed by its :attr:`~graphprune.ops.registry.Layer.epilogue`: activations, and
    residual adds of extra inputs, so it compiles to the fused kernel the model runs."""

    def __init__(self, core: nn.Module, epilogue: tuple[str, ...]) -> None:
        super().__init__()
        self.core, self.epilogue = core, epilogue

    def forward(self, x: torch.Tensor, *residuals: torch.Tensor) -> torch.Tensor:
        y, rest = self.core(x), iter(residuals)
        for op in self.epilogue:
            y = y + next(rest) if op == "add" else _ACTIVATIONS[op](y)
        return y


#: the epilogue's activations (:data:`graphprune.latency.ACTIVATIONS`, and ``relu6``)
_ACTIVATIONS = {"relu": torch.relu, "relu6": lambda y: torch.clamp(y, 0.0, 6.0), "gelu": nn.functional.gelu,
                "silu": nn.functional.silu, "sigmoid": torch.sigmoid, "hardswish": nn.functional.hardswish}


def layer_module(layer: Layer, cin: int, cout: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The layer at input width ``cin`` and output width ``cout`` with its epilogue, and inputs for it
    (the activation, then one tensor per residual add)."""
    torch.manual_seed(0)
    if layer.kind == "conv2d":
        groups = cin if layer.depthwise else layer.groups
        core = nn.Conv2d(cin, cout, layer.kernel, layer.stride, layer.padding, layer.dilation, groups=groups)
        x = torch.randn(layer.rows, cin, *layer.size)
    elif layer.kind == "dense":
        core, x = nn.Linear(cin, cout), torch.randn(*(layer.lead or (layer.rows,)), cin)
    else:
        raise ValueError(f"no layer module for kind {layer.kind!r}")
    with torch.no_grad():
        shape = core(x).shape
    residuals = tuple(torch.randn(shape) for op in layer.epilogue if op == "add")
    return _WithEpilogue(core, layer.epilogue).eval(), (x, *residuals)


def measure_layers(requests: Sequence[tuple[Layer, int, int]], target: str = "x86",
                   tuning_db: str | os.PathLike | None = None, repeat: int = 5
                   ) -> list[tuple[float, dict[str, float | None]]]:
    """Milliseconds of each compiled layer ``(layer, in width, out width)`` on ``target``
    (:func:`best_window_ms`), with the database's best seconds for its functions at the time
    (a :class:`graphprune.latency.LayerTime`'s fields).

    First every function without a record of its own has its carried-over schedules measured
    and the best recorded (one tuning run for the whole batch, as :class:`PairedTimer` does for
    a whole model), so a width is timed on the schedule a compile would keep, not on whichever
    carried-over schedule comes first: unmeasured, a narrower layer can read as slow as the
    full one."""
    resolved = resolve_target(target)
    modules = [layer_module(*r) for r in requests]
    bundle = _Bundle([m for m, _ in modules], [len(x) for _, x in modules])
    tune(bundle, tuple(t for _, x in modules for t in x), target, tuning_db, trials_per_task=1)
    database = open_database(tuning_db if tuning_db is not None else shared_database_dir(resolved))
    times = []
    for module, inputs in modules:
        compiled = compile_program(import_model(module, inputs), resolved, database)
        times.append((best_window_ms(compiled, repeat), compiled.recorded))
    return times


def best_window_ms(compiled: Any, repeat: int) -> float:
    """Milliseconds of a compiled model or layer: the best of ``repeat`` timing windows (see
    :class:`PairedTimer` for why not their median); layers and whole models are read alike."""
    return float(compiled.benchmark(repeat=repeat)["min_ms"])


def best_known(target: str = "x86", tuning_db: str | os.PathLike | None = None) -> dict[str, float]:
    """The database's best seconds per function now (:func:`.tuning.best_by_function`), which
    :class:`~graphprune.latency.LatencyTable` compares its entries' schedules with."""
    folder = tuning_db if tuning_db is not None else shared_database_dir(resolve_target(target))
    return best_by_function(open_database(folder)) if has_records(folder) else {}


class _Bundle(nn.Module):
    """Several layer modules side by side, so one tuning run covers all their functions."""

    def __init__(self, layers: Sequence[nn.Module], arity: Sequence[int]) -> None:
        super().__init__()
        self.layers, self.arity = nn.ModuleList(layers), list(arity)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs, at = [], 0
        for layer, n in zip(self.layers, self.arity):
            outs.append(layer(*inputs[at:at + n]))
            at += n
        return tuple(outs)


#: trials per function before a model compiled for a latency target is timed (:class:`PairedTimer`)
ROUND_TRIALS = 8


class PairedTimer:
    """Whole-model timings taken in turn with a reference model compiled once, and read on the
    reference's scale: ``reference_ms x median(model / reference)`` over ``rounds`` alternations.

    A shared machine drifts: on 2 cores one compact mobilenet_v2 at 1 thread measured 4.6 to
    5.7 ms over a few minutes, so two timings of one model can differ by more than the 5% a
    latency budget is met within.  Drift slows the model and the reference alike; their ratio
    keeps what pruning changed.  The scale, :attr:`reference_ms`, is the median of every
    timing of the reference so far, not of the first few: a reference first timed in a slow
    minute would read every later model slow (anchored on its first timings, a ViT's compact
    models read 21% slower in the pruning's rounds than in an independent re-measure).

    Fifteen alternations by default.  The ratio itself moves from one alternation to the next:
    one build of a compact mobilenet_v2 read 0.674-0.743 of the dense model in 16 medians of
    5 alternations over 80 s (standard deviation 2.5%, as much as half the 5% a budget is met
    within), and 4 builds of it from one database 0.688-0.735; 10 medians of 15 read
    0.679-0.730, a standard deviation of 1.8% (the noise is partly correlated over seconds,
    so not the square root of 3 less), for about 10 s more a timing against a build's minutes.

    A timing is the best of its ``repeat`` windows (each at least 50 ms of runs), not their
    median: the machine's interference comes in bursts of about a second, which only ever add
    time, and a burst over half a timing's windows moves its median.  One build of a compact
    ViT timed against the dense one 8 times read 0.335-0.421 of it by medians and
    0.341-0.354 by the best windows; whole :class:`PairedTimer` calls on that build read
    0.326-0.384 by medians."""

    def __init__(self, reference: Any, example_inputs: Any, target: str = "x86",
                 tuning_db: str | os.PathLike | None = None, rounds: int = 15, repeat: int = 7,
                 schedule_trials: int = 0) -> None:
        self.example_inputs, self.target, self.tuning_db = example_inputs, target, tuning_db
        self.rounds, self.repeat, self.schedule_trials = rounds, repeat, schedule_trials
        self.reference = self._build(reference)
        self.reference_times = [self._time(self.reference) for _ in range(rounds)]

    @property
    def reference_ms(self) -> float:
        """The reference's milliseconds: the median of all its timings."""
        return statistics.median(self.reference_times)

    def _build(self, model: Any) -> Any:
        """``model`` compiled with the database; with :attr:`schedule_trials`, every function
        first has that many trials in the database (fewer where it already has them): those
        without a record of their own start from their carried-over schedules, measured.

        A pruned form's functions otherwise take carried-over schedules unmeasured, and
        their quality, not the widths, set the time: a compact mobilenet_v2 with 25 such
        functions read 10.98 ms where a wider one with 11 read 8.58 ms, and the correction
        rounds never came within 10% of its budget at 60% or 40% of the dense time.  One
        trial (the carried-over schedules measured) is still a lottery for a width no donor
        fits: three compact ViTs whose residual stream was 144, 120 and 112 wide read 0.668,
        0.695 and 0.576 of the dense time, the 120-wide MLP slower than the 144-wide; with
        :data:`ROUND_TRIALS` the same three read 0.681, 0.592 and 0.545, in the order of their
        widths (about 80 s a model on 2 cores, against 35-50 s).  Eight are still a lottery for
        some functions (an 88-wide layer norm 8 times slower than the 104-wide one), so those
        slower than a wider function of their structure are tuned on (:func:`.tuning.catch_up`)."""
        if self.schedule_trials:
            tune(model, self.example_inputs, self.target, self.tuning_db, trials_per_task=self.schedule_trials)
            catch_up(model, self.example_inputs, self.target, self.tuning_db, self.schedule_trials)
        return build(model, self.example_inputs, target=self.target, tuning_db=self.tuning_db)

    def _time(self, compiled: Any) -> float:
        return best_window_ms(compiled, self.repeat)

    def __call__(self, model: Any) -> float:
        """Milliseconds of ``model`` (a module or ONNX model) compiled for the target, on the
        reference's scale."""
        compiled = self._build(model)
        ratios = []
        for _ in range(self.rounds):
            mine, reference = self._time(compiled), self._time(self.reference)
            self.reference_times.append(reference)
            ratios.append(mine / reference)
        return self.reference_ms * statistics.median(ratios)


def table_path(target: str = "x86", tuning_db: str | os.PathLike | None = None) -> Path:
    """Where the layer latency table for ``target`` is cached: next to the tuning records it
    was measured with (the given database, else the machine's shared one)."""
    folder = Path(tuning_db) if tuning_db is not None else shared_database_dir(resolve_target(target))
    return folder / "layer_latency.json"
