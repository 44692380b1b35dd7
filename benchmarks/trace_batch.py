"""Default ``gp.trace`` at a batch of 2: the batch-general replay against torch.export.

Not run in CI.  ``nice -n 19 python benchmarks/trace_batch.py [--models a,b] [--out FILE]``

A trace at batch > 1 used to export the model with a dynamic batch for the program
compact models are lowered from (8.9 s median over the coverage models at batch 2
against 1.7 s at a batch of one); it now replays the recording, made batch-general by
recording at two more batches (:mod:`graphprune.frontends.batch_general`).  Each model
of a representative subset of the coverage table (built as ``coverage.py`` builds it:
random weights, a batch of 2) is traced both ways in this one process, one thread, the
order alternating from model to model; "export" is today's code with the batch-general
step refused, which is exactly the old path (the recording's analysis, then export for
verification and emission).  Times are single runs: read the ratios and the medians.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coverage  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.frontends import batch_general  # noqa: E402

MODELS = (
    # torchvision classifiers
    "resnet18", "resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
    "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "inception_v3", "vit_b_16",
    "swin_t", "maxvit_t",
    # timm families, the slow ones of coverage.jsonl among them
    "timm/densenet121", "timm/swin_tiny_patch4_window7_224", "timm/coat_tiny", "timm/halonet_h1",
    "timm/maxvit_pico_rw_256", "timm/cait_xxs24_224", "timm/xcit_nano_12_p8_224", "timm/efficientvit_m0",
    "timm/mvitv2_tiny", "timm/levit_128s", "timm/convit_tiny", "timm/vit_tiny_patch16_224",
    "timm/resnet10t", "timm/mobilevit_xxs",
    # a detector
    "zoo/retinanet_resnet50_fpn",
)


def _export_path(*a, **k):
    raise batch_general.NotBatchGeneral("benchmark: the export path")


def _trace(model: torch.nn.Module, inputs: tuple, old: bool) -> tuple[float, str]:
    real = batch_general.batch_general
    if old:
        batch_general.batch_general = _export_path
    try:
        gc.collect()
        t = time.perf_counter()
        g = gp.trace(model, inputs)
        took = time.perf_counter() - t
    finally:
        batch_general.batch_general = real
    how = "replay" if g.backend.replay is not None else "export"
    if not old and how == "export":
        how += ": " + "; ".join(g.notes)[:120]
    return took, how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=None, help="also write the table here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    lines, new_t, old_t = [], [], []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"{'model':40} {'replay s':>8} {'export s':>8} {'ratio':>6}  how (new path)")
    for k, name in enumerate(a.models.split(",")):
        try:
            model, inputs = coverage.build(name, 64)
            runs = {}
            for old in ((False, True) if k % 2 == 0 else (True, False)):
                runs[old] = _trace(model, inputs, old)
        except Exception as exc:  # noqa: BLE001  (one model's failure is a row, not the end of the table)
            say(f"{name:40} failed: {type(exc).__name__}: {str(exc)[:150]}")
            continue
        (new, how), (old_s, _) = runs[False], runs[True]
        new_t.append(new)
        old_t.append(old_s)
        say(f"{name:40} {new:8.2f} {old_s:8.2f} {old_s / new:6.1f}  {how}")
        del model, inputs
    if new_t:
        say(f"{len(new_t)} models: median {statistics.median(new_t):.2f} s (replay) vs "
            f"{statistics.median(old_t):.2f} s (export), max {max(new_t):.2f} s vs {max(old_t):.2f} s")
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
