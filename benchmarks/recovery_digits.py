"""Each criterion at 30/50% of MACs on the digits ResNet and ViT, then 200 steps of label-free
recovery (``gp.recover``) on 4 unlabeled batches of 64 training images; held-out top-1.

Not run in CI.  Needs the dense models ``benchmarks/one_shot.py`` trained and cached (seed 0,
600 steps).  ``python benchmarks/recovery_digits.py resnet,vit``
"""
import copy
import os
import sys
import time

import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
from digits import MODELS, accuracy, batches, digits_split, example
import graphprune as gp
CACHE = "/tmp/graphprune-one-shot-cache"
for name in (sys.argv[1] if len(sys.argv) > 1 else "resnet,vit").split(","):
    xtr, ytr, xte, yte = digits_split(MODELS[name][1])
    base = MODELS[name][0](); base.load_state_dict(torch.load(f"{CACHE}/{name}-seed0-steps600.pt")); base.eval()
    calib = [x for x, _ in batches(xtr, ytr, 4, 64, 100)]
    ex = example(name)
    print(name, "dense", round(accuracy(base, xte, yte), 3), flush=True)
    for frac in (0.3, 0.5):
        for crit, data in [("l2", None), ("obspa", None), ("obspa", calib), ("wanda", calib), ("reconstruction", calib)]:
            m = copy.deepcopy(base); g = gp.trace(m, (ex,), verify=False)
            r = gp.prune(g, crit, gp.Target(flops=frac), data=data)
            c = g.construct_subnet(); a0 = accuracy(c, xte, yte)
            t = time.time(); rec = gp.recover(c, base, calib, steps=200)
            print(f"  {name} {frac} {crit}{'-cal' if data else ''} flops-{r.achieved['flops']:.3f} acc={a0:.3f} recovered={accuracy(c, xte, yte):.3f} ({rec.loss_before:.3g}->{rec.loss_after:.3g}, {time.time()-t:.0f}s)", flush=True)
