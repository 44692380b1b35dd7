"""Autotune a pruned model with TVM: prune a small CNN with OBSPA, then let meta-schedule tune
the compact model's kernels for this CPU, and compare its latency with the untuned build.

    python examples/autotune.py                       # 8 trials per task, database in runs/tuning/autotune
    python examples/autotune.py --trials 64           # run again: tasks already tuned are reused

The database is resumable: a second run skips every task that already has a measured
record, so tuning can be stopped and continued, and a model pruned differently re-tunes
only the layers whose shapes changed.  Needs TVM (``pip install -e ".[tvm]"``); without
it the script says so and exits cleanly.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import graphprune as gp
from graphprune.compile import codegen_api
from graphprune.errors import TuningError


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(3, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 10)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="tuning trials per task (default 8)")
    parser.add_argument("--codegen", default="x86", choices=["x86", "arm", "cuda"])
    parser.add_argument("--db", default="runs/tuning/autotune", help="tuning database folder (resumed)")
    parser.add_argument("-o", "--output", default="runs/autotune", help="report folder")
    args = parser.parse_args()
    try:
        codegen_api("build")
    except TuningError as exc:
        print(f"skipping: {exc}")
        return

    torch.manual_seed(0)
    model, x = cnn(), torch.randn(1, 3, 32, 32)
    untuned = gp.compile(model, (x,), method="obspa", target=0.5, codegen=args.codegen, progress=True)
    tuned = gp.compile(model, (x,), method="obspa", target=0.5, codegen=args.codegen, tune_trials=args.trials,
                       tuning_db=args.db, output=args.output, progress=True)
    print(tuned.summary())
    print(tuned.tuning.summary())
    if untuned.report.latency and tuned.report.latency:
        before, after = untuned.report.latency["median_ms"], tuned.report.latency["median_ms"]
        print(f"compact model on {args.codegen}: {before:.3f} ms untuned -> {after:.3f} ms tuned "
              f"({before / after:.2f}x)")
    print(f"wrote {args.output}/ (report.md with the tuning summary, tuning.png)")


if __name__ == "__main__":
    main()
