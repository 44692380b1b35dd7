"""Latency-targeted pruning on the codegen target: budgets of 60% and 40% of the dense model's
measured latency, met with the compiler in the loop (``gp.Target(latency=0.4)`` and ``0.6``).

Not run in CI (each model measures tens of compiled layers and several whole models).
``python benchmarks/latency_target.py [--models resnet18,mobilenet_v2,vit,bert] [--budgets 0.6,0.4]
[--criterion l2] [--multiple 8] [--threads 1] [--tuning-db DIR] [--tune-minutes 3] [--quality-models resnet20,vit]
[--quality-criterion obspa] [--recover-steps 200] [--recover-seeds 3] [--resume] [--results benchmarks/results/latency_target.txt]``

Per model: the dense model is tuned for ``--tune-minutes`` (as a user tunes once), then
compiled and timed (``graphprune.codegen``, the same build a compile does: every pruned form
starts from the dense form's schedules, carried over to its widths), then for each budget a
fresh trace of the model is pruned to it with ``gp.prune`` and the compact model compiled and
timed again, independently of the pruning's own rounds. Every timing here (and in the pruning's
rounds) alternates with the dense model compiled once and is read as a share of it
(:class:`graphprune.codegen.layer_latency.PairedTimer`: the machine's drift over minutes is
larger than 5% for mobilenet_v2), each model's functions first given as many trials as the
pruning's rounds give them (``ROUND_TRIALS``, from their carried-over schedules). A budget is a
share of the dense model's time, so it is judged as one: a budget taken in ms from the dense
model's first timings inherits their noise (mobilenet_v2 read 13.6 ms right after tuning and
10.3-10.6 ms later). Columns: the dense model's time (the median of all its timings, each
the best of its windows), the budget, the kept try of the pruning's rounds and the
independent re-measure as shares of the dense model (and in ms on its time), the
re-measure's miss against the budget (done when: within 5%), the MACs removed, the rounds,
the layer timings measured and reused from the table cache, and the wall time. The models are the latency benchmark's (random weights: latency does
not depend on them).

The second table asks whether spending the budget by measured latency keeps more of a model
than spending it by FLOPs.  It takes the pretrained-quality benchmark's trained digits models
(``benchmarks/pretrained.py``: the latency benchmark's models have no trained weights here),
prunes each to a latency budget at a batch of ``--quality-batch`` digits, measures the
compact model, then finds by bisection the
FLOPs target whose compact model measures the same (within 2%, else the nearest of 8 tries),
and scores both: test accuracy after one-shot pruning with calibration, and the mean after
the same recoveries from it (``--recover-seeds``).  Both use one criterion, calibration set and width multiple; only the allocation
differs.  With calibration data the latency target meets the budget both by the knapsack and
in the FLOPs order and keeps the model whose outputs drift least from the dense model's on the
calibration set (:meth:`graphprune.latency.LatencyPlan.select`); the table says which it kept.

A whole run takes about three hours on 2 cores.  Each model's finished rows (both tables)
are kept under ``benchmarks/cache/latency_target/``, keyed by the options and a digest of the
code (:func:`pretrained.code_digest`), so ``--resume`` finishes an interrupted run of the same
command on the same code, measuring only the models it had not finished; the header names
those it took from the earlier run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latency_target.txt"
UNITS = ROOT / "benchmarks" / "cache" / "latency_target"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vit,bert")
    ap.add_argument("--budgets", default="0.6,0.4", help="fractions of the dense model's measured latency")
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tuning-db", help="tuning database (default: a new one for this run, in a temporary folder, "
                                         "so every layer timing is measured on this run's machine)")
    ap.add_argument("--tune-minutes", type=float, default=3.0,
                    help="tuning of each dense model before it is measured (0: default schedules)")
    ap.add_argument("--quality-models", default="resnet20,vit",
                    help="pretrained digits models for the quality comparison ('' to skip it)")
    ap.add_argument("--quality-criterion", default="obspa")
    ap.add_argument("--quality-batch", type=int, default=32,
                    help="the batch the digits models are timed at (at batch 2 a 16-token ViT is mostly overhead)")
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--recover-seeds", type=int, default=3,
                    help="recoveries per compact model, from the same pruned weights; the table gives their mean")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--resume", action="store_true",
                    help="take the models an earlier run of this command on the same code finished")
    return ap.parse_args()


class Units:
    """One model's finished rows of one table, kept for ``--resume`` in a JSON file keyed by
    the table, the model, the options that change its rows and the code's digest."""

    def __init__(self, args: argparse.Namespace, digest: str) -> None:
        options = {k: v for k, v in vars(args).items() if k not in ("results", "resume", "models", "quality_models")}
        options["tuning_db"] = args.tuning_db  # None: a fresh database per run, whatever its folder
        self.options, self.digest, self.resume, self.resumed = options, digest, args.resume, []

    def path(self, table: str, model: str) -> Path:
        from pretrained import unit_path

        return unit_path(UNITS, f"{table}-{model}", table, model, sorted(self.options.items()), self.digest,
                         suffix=".json")

    def load(self, table: str, model: str) -> dict | None:
        path = self.path(table, model)
        if not (self.resume and path.exists()):
            return None
        self.resumed.append(f"{model} ({table})")
        return json.loads(path.read_text())

    def save(self, table: str, model: str, rows: dict) -> None:
        from graphprune.atomic import atomic_path

        UNITS.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(table, model)) as tmp:
            Path(tmp).write_text(json.dumps(rows))


def main() -> None:
    args = parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import graphprune as gp
    from graphprune import codegen
    from graphprune.atomic import atomic_path
    from graphprune.codegen.layer_latency import ROUND_TRIALS, PairedTimer
    from latency import make_model
    from pretrained import code_digest

    units = Units(args, code_digest())
    fresh = args.tuning_db is None
    if fresh:
        args.tuning_db = tempfile.mkdtemp(prefix="graphprune-latency-target-")

    def tuned(model: Any, inputs: Any) -> None:
        if args.tune_minutes > 0:
            codegen.tune(model, inputs, "x86", args.tuning_db, minutes=args.tune_minutes)

    rows, details = [], []
    for name in filter(None, args.models.split(",")):
        done = units.load("budgets", name)
        if done is not None:
            rows += done["rows"]
            details += done["details"]
            continue
        first = len(rows)
        made = make_model(name)
        if made is None:
            rows.append(f"| {name} | n/a (not installed) |" + " |" * 9)
            continue
        model, inputs = made
        tuned(model, inputs)
        timer = PairedTimer(model, inputs, "x86", args.tuning_db, schedule_trials=ROUND_TRIALS)
        for fraction in (float(b) for b in args.budgets.split(",")):
            work = copy.deepcopy(model)
            g = gp.trace(work, inputs)
            start = time.perf_counter()
            report = gp.prune(g, args.criterion, gp.Target(latency=1 - fraction, multiple=args.multiple),
                              tuning_db=args.tuning_db)
            seconds = time.perf_counter() - start
            share = timer(g.construct_subnet()) / timer.reference_ms
            dense, run = timer.reference_ms, report.latency
            rows.append(f"| {name} | {dense:.2f} | {fraction:.0%} = {fraction * dense:.2f} | "
                        f"{run.achieved_share:.1%} = {run.achieved_share * dense:.2f} | {share:.1%} = {share * dense:.2f} "
                        f"| {share / fraction - 1:+.1%} | {report.achieved['flops']:.1%} | "
                        f"{len(run.rounds)} | {run.layers_measured} / {run.layers_refreshed} / {run.layers_cached} "
                        f"| {seconds:.0f} |")
            tries = ", ".join(f"{r['layer_budget_ms']:.2f} / {r['predicted_layers_ms']:.2f} / {r['measured_ms']:.2f} "
                              f"of {r['dense_ms']:.2f}" + (" (kept)" if i == run.chosen else "")
                              for i, r in enumerate(run.rounds))
            details.append(f"- {name} {fraction:.0%}: {tries}")
            print(rows[-1], details[-1], sep="\n", flush=True)
        units.save("budgets", name, {"rows": rows[first:], "details": details[first:]})
    quality = quality_rows(args, tuned, units) if args.quality_models else []
    within = sum(abs(float(r.split("|")[6].strip().rstrip("%")) / 100) <= 0.05 for r in rows if "n/a" not in r)
    measured = sum("n/a" not in r for r in rows)
    lines = [f"# {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
             f"# x86 (TVM), {args.threads} thread(s), criterion {args.criterion}, widths multiple of {args.multiple}, "
             f"each dense model tuned {args.tune_minutes:g} min into "
             f"{'one database that starts empty' if fresh else args.tuning_db} (pruned forms carry its schedules over)",
             *([f"# resumed: {', '.join(units.resumed)} from an earlier run of this command on the same code "
                f"(digest {units.digest}; its own database)"] if units.resumed else []),
             "",
             "| model | dense ms | budget (share = ms) | pruning's kept try | re-measured | miss | MACs removed | rounds "
             "| layer timings measured / of them re-timed / cached | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"re-measured within 5% of the budget: {within} of {measured}", "",
             "Each round of the pruning: the layers' budget / their predicted ms (the table) / the compiled "
             "model measured, of the dense model timed with it, ms", "", *details]
    if quality:
        kept = sum(r.endswith("yes |") for r in quality)
        lines += ["", f"## At equal measured latency: latency-targeted against FLOPs-targeted pruning "
                      f"({args.quality_criterion} with calibration, widths multiple of {args.multiple}, "
                      f"timed at batch {args.quality_batch}, "
                      f"recovery {args.recover_steps} steps, mean of {args.recover_seeds} seeds)", "",
                  "| model | dense ms / acc | budget | latency-targeted ms | kept order (output drift: knapsack / "
                  "FLOPs order) | MACs removed | acc | acc recovered "
                  "| FLOPs target | FLOPs-targeted ms | MACs removed | acc | acc recovered | latency-targeted keeps at least |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *quality, "",
                  f"latency-targeted pruning keeps at least the FLOPs-targeted accuracy (after recovery) "
                  f"at equal latency: {kept} of {len(quality)}"]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.results) as tmp:
        Path(tmp).write_text(text)


def quality_rows(args: argparse.Namespace, tuned: Callable[[Any, Any], None], units: Units) -> list[str]:
    """The second table's rows (see the module docstring); ``tuned(model, inputs)`` tunes a dense model."""
    import torch

    import graphprune as gp
    from graphprune.codegen.layer_latency import ROUND_TRIALS, PairedTimer
    from graphprune.errors import UnprunableTargetError
    from pretrained import Ours, digits_task, macs

    rows = []
    for name in filter(None, args.quality_models.split(",")):
        done = units.load("quality", name)
        if done is not None:
            rows += done["rows"]
            continue
        first = len(rows)
        task = digits_task(name)
        example = tuple(torch.cat([x[:1]] * args.quality_batch) for x in task.trace["example_inputs"])
        task.trace = {**task.trace, "example_inputs": example}  # what the latency target measures at
        mine = Ours(task)
        full = macs(task, task.dense)

        def pruned(target: gp.Target, **options: Any) -> Any:
            return mine(args.quality_criterion, target, task.unlabeled, tuning_db=args.tuning_db, **options)

        def scores(model: Any) -> tuple[str, str, str]:
            """MACs removed, accuracy as pruned, and the mean accuracy of ``--recover-seeds``
            recoveries from it (one recovery's accuracy moves by several test samples with its
            seed: as much as two allocations at one latency differ by)."""
            removed, before = 1 - macs(task, model) / full, task.metric(model)
            recovered = []
            for seed in range(args.recover_seeds):
                trial = copy.deepcopy(model)
                gp.recover(trial, task.dense, task.unlabeled, steps=args.recover_steps, seed=seed,
                           **task.recover_options)
                recovered.append(task.metric(trial))
            spread = f" ({min(recovered):.3f}-{max(recovered):.3f})" if len(recovered) > 1 else ""
            return f"{removed:.1%}", f"{before:.3f}", f"{sum(recovered) / len(recovered):.3f}{spread}"

        tuned(task.dense, example)
        measured = PairedTimer(task.dense, example, "x86", args.tuning_db, schedule_trials=ROUND_TRIALS)
        dense_metric = task.metric(task.dense)
        for fraction in (float(b) for b in args.budgets.split(",")):
            by_latency = pruned(gp.Target(latency=1 - fraction, multiple=args.multiple))
            run = mine.report.latency
            order = (f"{run.order} ({run.judged.get('knapsack', float('nan')):.3f} / "
                     f"{run.judged.get('flops order', float('nan')):.3f})")
            goal = measured(by_latency)
            lo, hi, best = 0.0, 0.95, None
            for _ in range(8):  # measured latency falls as the FLOPs target rises (noise aside)
                mid = (lo + hi) / 2
                try:
                    model = pruned(gp.Target(flops=mid, multiple=args.multiple))
                except UnprunableTargetError:  # past what the floors leave to remove: look lower
                    hi = mid
                    continue
                ms = measured(model)
                if best is None or abs(ms / goal - 1) < abs(best[1] / goal - 1):
                    best = (mid, ms, model)
                if abs(ms / goal - 1) <= 0.02:
                    break
                lo, hi = (mid, hi) if ms > goal else (lo, mid)
            ratio, ms, by_flops = best
            mine_cells, theirs_cells = scores(by_latency), scores(by_flops)
            verdict = "yes" if float(mine_cells[2].split()[0]) >= float(theirs_cells[2].split()[0]) else "no"
            rows.append(f"| {name} | {measured.reference_ms:.3f} / {dense_metric:.3f} | {fraction:.0%} | {goal:.3f} | {order} | "
                        + " | ".join(mine_cells) + f" | {ratio:.1%} | {ms:.3f} | " + " | ".join(theirs_cells)
                        + f" | {verdict} |")
            print(rows[-1], flush=True)
        units.save("quality", name, {"rows": rows[first:]})
    return rows


if __name__ == "__main__":
    main()
