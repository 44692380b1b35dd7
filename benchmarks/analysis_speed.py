"""Trace + dependency analysis time: graphprune against Torch-Pruning, in one run.

For each model, interleaved repeats (so both see the same machine load) of
- ``gp.trace(model, x, verify=False)``: the default path, recording ATen ops on meta
  tensors (``graphprune.frontends.torch_record``); the ExportedProgram is built later,
  when a compact model is first emitted, and is not part of this time;
- ``gp.trace(model, x, verify=False, recorder=False)``: through ``torch.export`` at once;
- Torch-Pruning's ``DependencyGraph().build_dependency(model, example_inputs=x)``.
Prints medians and the ratio TP / graphprune (over 1: graphprune faster) and writes the
table to ``benchmarks/results/analysis_speed.txt``.  Batch 1, 224x224, random weights.

    python benchmarks/analysis_speed.py [--models resnet50 vit_b_16] [--repeat 5]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

import graphprune as gp

MODELS = ["resnet50", "resnet152", "vit_b_16", "vit_l_16"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    head = f"{'model':12} {'graphprune s':>12} {'gp export s':>12} {'TP s':>8} {'TP/gp':>7} {'TP/gp export':>12}"
    lines = [f"trace + analysis, median of {args.repeat} interleaved runs, batch 1, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", head]
    print("\n".join(lines), flush=True)
    for name in args.models:
        m = measure(name, args.repeat)
        g, e, t = m["graphprune"], m["graphprune (export)"], m["torch-pruning"]
        line = f"{name:12} {g:12.3f} {e:12.3f} {t:8.3f} {t / g:7.2f} {t / e:12.2f}"
        print(line, flush=True)
        lines.append(line)
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(OUT)


if __name__ == "__main__":
    main()
