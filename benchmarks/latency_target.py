"""Latency-targeted pruning on the codegen target: budgets of 60% and 40% of the dense model's
measured latency, met with the compiler in the loop (``gp.Target(latency_ms=...)``).

Not run in CI (each model measures tens of compiled layers and several whole models).
``python benchmarks/latency_target.py [--models resnet18,mobilenet_v2,vit,bert] [--budgets 0.6,0.4]
[--criterion l2] [--multiple 8] [--threads 1] [--tuning-db DIR] [--results benchmarks/results/latency_target.txt]``

Per model: the dense model is compiled and timed (``graphprune.codegen``, the same build a
compile does, tuning records from ``--tuning-db`` or the machine's shared database), then for
each budget a fresh trace of the model is pruned to it with ``gp.prune`` and the compact model
compiled and timed again, independently of the pruning's own rounds.  Columns: the budget,
what the pruning's last round measured, the independent re-measure, their miss against the
budget (done when: within 5%), the MACs removed, the rounds, the layer timings measured and
reused from the table cache, and the wall time.  The models are the latency benchmark's
(random weights: latency does not depend on them).
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latency_target.txt"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vit,bert")
    ap.add_argument("--budgets", default="0.6,0.4", help="fractions of the dense model's measured latency")
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tuning-db", help="tuning database (default: the machine's shared one)")
    ap.add_argument("--results", default=str(RESULTS))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import graphprune as gp
    from graphprune.atomic import atomic_path
    from graphprune.codegen.layer_latency import measure_model
    from latency import make_model

    rows = []
    for name in args.models.split(","):
        made = make_model(name)
        if made is None:
            rows.append(f"| {name} | n/a (not installed) |" + " |" * 9)
            continue
        model, inputs = made
        dense = measure_model(model, inputs, "x86", args.tuning_db)
        for fraction in (float(b) for b in args.budgets.split(",")):
            budget = fraction * dense
            work = copy.deepcopy(model)
            g = gp.trace(work, inputs)
            start = time.perf_counter()
            report = gp.prune(g, args.criterion, gp.Target(latency_ms=budget, multiple=args.multiple),
                              tuning_db=args.tuning_db)
            seconds = time.perf_counter() - start
            remeasured = measure_model(g.construct_subnet(), inputs, "x86", args.tuning_db)
            run = report.latency
            rows.append(f"| {name} | {dense:.2f} | {fraction:.0%} = {budget:.2f} | {run.achieved_ms:.2f} | "
                        f"{remeasured:.2f} | {remeasured / budget - 1:+.1%} | {report.achieved['flops']:.1%} | "
                        f"{len(run.rounds)} | {run.layers_measured} / {run.layers_cached} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    within = sum(abs(float(r.split("|")[6].strip().rstrip("%")) / 100) <= 0.05 for r in rows if "n/a" not in r)
    measured = sum("n/a" not in r for r in rows)
    lines = [f"# {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
             f"# x86 (TVM), {args.threads} thread(s), criterion {args.criterion}, widths multiple of {args.multiple}, "
             f"tuning records: {args.tuning_db or 'the shared database'}",
             "",
             "| model | dense ms | budget | last round ms | re-measured ms | miss | MACs removed | rounds "
             "| layer timings measured / cached | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"re-measured within 5% of the budget: {within} of {measured}"]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.results) as tmp:
        Path(tmp).write_text(text)


if __name__ == "__main__":
    main()
