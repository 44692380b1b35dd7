"""Each criterion at 30/50% of MACs on the digits ResNet and ViT, then 200 steps of label-free
recovery (``gp.recover``) on 4 unlabeled batches of 64 training images; held-out top-1.

Not run in CI.  Needs the dense models ``benchmarks/one_shot.py`` trained and cached (seed 0,
600 steps).  ``python benchmarks/recovery_digits.py resnet,vit``
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import MODELS, accuracy, batches, digits_split, example  # noqa: E402

import graphprune as gp  # noqa: E402

CACHE = "/tmp/graphprune-one-shot-cache"


def main(names: list[str], steps: int = 200) -> None:
    torch.set_num_threads(1)
    for name in names:
        xtr, ytr, xte, yte = digits_split(MODELS[name][1])
        base = MODELS[name][0]()
        base.load_state_dict(torch.load(f"{CACHE}/{name}-seed0-steps600.pt"))
        base.eval()
        calib = [x for x, _ in batches(xtr, ytr, 4, 64, 100)]  # labels dropped: calibration is unlabeled
        print(name, "dense", round(accuracy(base, xte, yte), 3), flush=True)
        for frac in (0.3, 0.5):
            for crit, data in [("l2", None), ("obspa", None), ("obspa", calib), ("wanda", calib),
                               ("reconstruction", calib)]:
                g = gp.trace(copy.deepcopy(base), (example(name),), verify=False)
                r = gp.prune(g, crit, gp.Target(flops=frac), data=data)
                compact = g.construct_subnet()
                pruned = accuracy(compact, xte, yte)
                t0 = time.time()
                rec = gp.recover(compact, base, calib, steps=steps)
                print(f"  {name} {frac} {crit}{'-cal' if data else ''} flops-{r.achieved['flops']:.3f} "
                      f"acc={pruned:.3f} recovered={accuracy(compact, xte, yte):.3f} "
                      f"({rec.loss_before:.3g}->{rec.loss_after:.3g}, {time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main((sys.argv[1] if len(sys.argv) > 1 else "resnet,vit").split(","))
