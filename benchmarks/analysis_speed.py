"""Time to a pruned model: graphprune against Torch-Pruning, in one run, one thread.

**End to end** (the first table), per model, interleaved repeats (so both see the same
machine load) of what a user runs, each on a fresh copy of the model (copying untimed):
- graphprune's default path: ``gp.trace(model, x)`` (with verification: every group is
  checked zero-invariant on the example), ``gp.prune(g, "l2", 0.3)`` (L2 norms, 30% of
  the FLOPs), ``g.construct_subnet()`` and one forward of the compact model;
- Torch-Pruning's: ``MetaPruner`` (its DependencyGraph build) with ``MagnitudeImportance(p=2)``,
  global pruning, the classifier ignored, attention heads given, at the channel ratio
  that removes the same 30% of the FLOPs (found before timing, by bisection on
  PyTorch's FLOP counter), ``pruner.step()`` and one forward of the pruned model (no
  check that its groups are right: on 30 of 46 non-torchvision models its pruned
  models do not run).
The FLOPs each actually removed are printed beside the times, and so is the part of
graphprune's time its check took (``PrunableGraph.verify``: the zeroed full model's
forward, the compact model built and run, on a 64x64 crop of the picture where the model
runs the same ops there, else on the example; recording the crop is part of it), with the
ratio TP / graphprune without it: the check runs the full model once, which
Torch-Pruning's build also does, and a compact one.

**Narrow** (the second table), the analysis alone, interleaved:
- ``gp.trace(model, x, verify=False)``: the default path, recording ATen ops on meta
  tensors (``graphprune.frontends.torch_record``); the ExportedProgram is built later,
  when a compact model is first emitted, and is not part of this time;
- ``gp.trace(model, x, verify=False, recorder=False)``: through ``torch.export`` at once;
- Torch-Pruning's ``DependencyGraph().build_dependency(model, example_inputs=x)``.
Prints medians and the ratio TP / graphprune (over 1: graphprune faster) and writes both
tables to ``benchmarks/results/analysis_speed.txt`` (with the command and the machine's
load average).  Batch 1, 224x224, random weights.

    python benchmarks/analysis_speed.py [--models resnet50 vit_b_16] [--repeat 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

import graphprune as gp

MODELS = ["resnet50", "resnet152", "vit_b_16", "vit_l_16", "convnext_tiny"]
FLOPS = 0.3  # fraction of the FLOPs both remove
OUT = Path(__file__).parent / "results" / "analysis_speed.txt"


def _seconds(fn: Callable[[], Any]) -> float:
    gc.collect()  # the previous run's garbage (an ExportedProgram is large) is not this run's cost
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, repeat: int) -> dict[str, float]:
    import torch_pruning as tp

    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    runs: dict[str, Callable[[], Any]] = {
        "graphprune": lambda: gp.trace(model, x, verify=False),
        "graphprune (export)": lambda: gp.trace(model, x, verify=False, recorder=False),
        "torch-pruning": lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x),
    }
    for fn in runs.values():  # warm-up: imports, first-call caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            times[k].append(_seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates by PyTorch's FLOP counter (a referee neither pruner wrote).
    Counted with gradients on: under ``no_grad`` ``nn.MultiheadAttention`` takes its fused
    fast path, which the counter has no formula for, so the full ViT would count less
    than a compact one built from the ops it is made of."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2


def _tp_pruner(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> Any:
    """Torch-Pruning's MetaPruner as its examples set it up for torchvision models."""
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    return tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                global_pruning=True, ignored_layers=[head], num_heads=heads)


def _tp_step(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    _tp_pruner(model, x, ratio).step()
    if isinstance(model, torchvision.models.VisionTransformer):  # its forward reads this width
        model.hidden_dim = model.conv_proj.out_channels
    return model


def _tp_ratio(model: torch.nn.Module, x: torch.Tensor, full: float) -> float:
    """The channel ratio at which Torch-Pruning removes ``FLOPS`` of the FLOPs (bisection)."""
    lo, hi = 0.0, 0.9
    for _ in range(8):
        mid = (lo + hi) / 2
        got = 1 - _macs(_tp_step(copy.deepcopy(model), x, mid), x) / full
        if abs(got - FLOPS) < 0.005:
            return mid
        lo, hi = (mid, hi) if got < FLOPS else (lo, mid)
    return hi


def end_to_end(name: str, repeat: int) -> dict[str, float]:
    """Median seconds of both default paths (see the module docstring) and the FLOPs removed."""
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    full = _macs(model, x)
    ratio = _tp_ratio(model, x, full)
    out: dict[str, Any] = {}

    in_verify: list[float] = []  # seconds of each verify() call in the run being timed
    verify = gp.PrunableGraph.verify

    def timed_verify(self: gp.PrunableGraph, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return verify(self, *a, **k)
        finally:
            in_verify.append(time.perf_counter() - t)

    def ours(m: torch.nn.Module) -> torch.nn.Module:
        g = gp.trace(m, x)
        gp.prune(g, "l2", FLOPS)
        compact = g.construct_subnet()
        with torch.no_grad():
            compact(x)
        return compact

    def theirs(m: torch.nn.Module) -> torch.nn.Module:
        pruned = _tp_step(m, x, ratio)
        with torch.no_grad():
            pruned(x)
        return pruned

    runs = {"graphprune": ours, "torch-pruning": theirs}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k, fn in runs.items():  # warm-up: imports, first-call caches
        out[k + " flops"] = 1 - _macs(fn(copy.deepcopy(model)), x) / full
    check: list[float] = []  # per graphprune run: its seconds in verify()
    gp.PrunableGraph.verify = timed_verify  # type: ignore[method-assign]
    try:
        for _ in range(repeat):
            for k, fn in runs.items():
                in_verify.clear()
                times[k].append(_seconds(functools.partial(fn, copy.deepcopy(model))))  # the copy is not timed
                if k == "graphprune":
                    check.append(sum(in_verify))
    finally:
        gp.PrunableGraph.verify = verify  # type: ignore[method-assign]
    out.update({k: statistics.median(v) for k, v in times.items()})
    out["check"] = statistics.median(check)
    out["ratio"] = ratio
    return out


def _write(lines: list[str]) -> None:
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(OUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only (a partial run is not a result)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [f"python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip(),
             f"median of {args.repeat} interleaved runs, batch 1, 224x224, random weights, {torch.get_num_threads()} "
             f"thread(s), torch {torch.__version__}, {os.cpu_count()} cores, load average at start {load}",
             "",
             f"end to end: graphprune = trace (verified) + prune l2 {FLOPS:.0%} FLOPs + construct_subnet + 1 forward;",
             "Torch-Pruning = MetaPruner build (MagnitudeImportance p=2, global) + step at the ratio removing the "
             "same FLOPs + 1 forward",
             f"{'model':14} {'graphprune s':>12} {'TP s':>8} {'TP/gp':>7} {'gp FLOPs-':>9} {'TP FLOPs-':>9} {'TP ratio':>8}"
             f" {'gp check s':>10} {'TP/(gp-check)':>13}"]
    print("\n".join(lines), flush=True)
    for name in args.models:
        e = end_to_end(name, args.repeat)
        g, t = e["graphprune"], e["torch-pruning"]
        line = (f"{name:14} {g:12.3f} {t:8.3f} {t / g:7.2f} {e['graphprune flops']:9.1%} "
                f"{e['torch-pruning flops']:9.1%} {e['ratio']:8.3f} {e['check']:10.3f} {t / (g - e['check']):13.2f}")
        print(line, flush=True)
        lines.append(line)
    head = f"{'model':14} {'graphprune s':>12} {'gp export s':>12} {'TP s':>8} {'TP/gp':>7} {'TP/gp export':>12}"
    lines += ["", "narrow: gp.trace(verify=False) (recorded; export deferred), gp.trace(verify=False, recorder=False), "
              "TP DependencyGraph.build_dependency", head]
    print("\n".join(lines[-2:]), flush=True)
    for name in args.models:
        m = measure(name, args.repeat)
        g, e, t = m["graphprune"], m["graphprune (export)"], m["torch-pruning"]
        line = f"{name:14} {g:12.3f} {e:12.3f} {t:8.3f} {t / g:7.2f} {t / e:12.2f}"
        print(line, flush=True)
        lines.append(line)
    lines.append(f"load average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(lines[-1])
    if not args.no_write:
        _write(lines)


if __name__ == "__main__":
    main()
