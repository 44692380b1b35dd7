"""Pruning a *pretrained* model with no training set: every criterion against Torch-Pruning.

Not run in CI.  ``nice python benchmarks/pretrained.py [--models resnet20,vit] [--ratios 0.1,0.2,0.3,0.5]
[--out benchmarks/results/pretrained.txt]``

Issue 19's user holds a trained model and at most some unlabeled inputs.  This script
first trains, here on CPU, models that are genuinely good at their task (cached under
``benchmarks/cache/``, so a rerun only prunes):

* ``resnet20``: the CIFAR ResNet-20 (16-32-64 channels, 3 basic blocks per stage) on
  sklearn's digits upsampled to 32x32;
* ``vit``: a ViT (4x4 patches of 16x16 digits = 16 tokens, width 96, 4 pre-norm blocks,
  4 heads of 24, MLP 192);

both trained with random affine augmentation (rotation, shift, scale) on the fixed
1297-image split of ``benchmarks/digits.py`` and scored on its 500 held-out digits.
Then, for each model and each MACs reduction, every criterion that ``gp.prune`` lists at
run time (``graphprune.optim.scoring.CRITERIA``: criteria added later appear without an
edit here) and Torch-Pruning's importances prune a copy of the dense model to the same
*measured* MACs (PyTorch's ``FlopCounterMode``; each method's knob is searched as in
``benchmarks/one_shot.py``).  The score is test accuracy with no fine-tuning.  Gradient
criteria (ours and Torch-Pruning's Taylor) see 4 labelled batches of 64 training digits,
which is more than issue 19's user has; they are marked ``(labels)``.

Columns "calibration" and "calib+recovery" are filled once graphprune has calibrated
criteria (``gp.prune(..., data=unlabeled)`` with a criterion that declares it reads
unlabeled inputs) and a recovery function; until then they print ``n/a (not built)``.

``--alloc`` also prints, for the data-free criteria obspa, l1 and l2, the accuracy under
the allocation rules before issue 19 (no floor, no multiple), with the quarter floor, with
the floor and a multiple of 8 under each cross-group normalisation (mean, max, rank), and
with a half floor: the figures the defaults were chosen from.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import Attention, Block, batches, digits_split  # noqa: E402
from one_shot import at_flops, macs  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.errors import GraphPruneError  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
BATCH = 64


# ---------------------------------------------------------------------------- models
class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, 16-32-64 channels), one input channel."""

    def __init__(self, classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(Block(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class ViT(nn.Module):
    """Patch-4 ViT on 16x16 images: 16 tokens, pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 96, heads: int = 4, depth: int = 4, mlp: int = 192, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim), attn=Attention(dim, heads), norm2=nn.LayerNorm(dim),
            mlp=nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h))
            h = h + blk["mlp"](blk["norm2"](h))
        return self.head(self.norm(h).mean(dim=1))


# name -> (factory, image side, training epochs, peak learning rate)
MODELS = {"resnet20": (ResNet20, 32, 8, 3e-3), "vit": (ViT, 16, 30, 2e-3)}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (0.9-1.1) and shift (+-10%) of a batch of images."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * math.radians(24)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)]).eq(y).float().mean())


def pretrained(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The trained dense model (from the cache, else trained now and cached) and its data split."""
    factory, side, epochs, lr = MODELS[name]
    data = digits_split(side)
    torch.manual_seed(seed)
    model = factory()
    path = CACHE / f"{name}-seed{seed}-e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), data
    xtr, ytr = data[0], data[1]
    steps = epochs * math.ceil(len(ytr) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(batches(xtr, ytr, steps, BATCH, seed)):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(augment(x, gen)), y, label_smoothing=0.1).backward()
        opt.step()
        sched.step()
        if (step + 1) % (steps // 10) == 0:
            print(f"  {name} step {step + 1}/{steps} test acc {accuracy(model, data[2], data[3]):.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            model.train()
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, data


# ---------------------------------------------------------------------------- pruning
def calibrated_criteria() -> tuple[str, ...]:
    """Criteria that read unlabeled calibration inputs, as graphprune declares them (none before issue 19's item 1)."""
    from graphprune.optim import scoring

    return tuple(getattr(scoring, "CALIBRATED", ()))


def criteria() -> list[str]:
    """Every criterion ``gp.prune`` knows at run time."""
    from graphprune.optim.scoring import CRITERIA

    return list(CRITERIA)


LABELLED = ("taylor", "hessian")  # read labels through the loss: marked in the table


class Ours:
    """graphprune on one traced copy of the dense model, its weights restored before each try."""

    def __init__(self, base: nn.Module, ex: torch.Tensor) -> None:
        self.base = base
        self.model = copy.deepcopy(base).eval()
        self.g = gp.trace(self.model, (ex,), verify=False)
        self.state = copy.deepcopy(self.model.state_dict())

    def __call__(self, criterion: str, target: gp.Target, data=None, **options) -> nn.Module:
        self.model.load_state_dict(self.state)
        gp.prune(self.g, criterion, target, data=data, loss_fn=F.cross_entropy if data is not None else None,
                 **options)
        return self.g.construct_subnet()


def theirs(method: str, base: nn.Module, ratio: float, ex: torch.Tensor, labelled) -> nn.Module:
    """Torch-Pruning's global pruning with one of its importances (the classifier kept)."""
    import torch_pruning as tp

    from digits import attention_heads, head_layer

    model = copy.deepcopy(base).eval()
    imp = {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
           "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
           "tp-taylor": tp.importance.TaylorImportance,
           "tp-bnscale": tp.importance.BNScaleImportance}[method]()
    pruner = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  ignored_layers=[head_layer(model)], num_heads=attention_heads(model))
    if method == "tp-taylor":
        model.zero_grad()
        for x, y in labelled:
            F.cross_entropy(model(x), y).backward()
    pruner.step()
    return model.eval()


def sweep(name: str, ratios: list[float], recover_steps: int, alloc: bool) -> list[str]:
    """Table rows of one model: dense, then per MACs reduction every method."""
    base, (xtr, ytr, xte, yte) = pretrained(name)
    side = MODELS[name][1]
    ex = torch.zeros(2, 1, side, side)
    full = macs(base, ex)
    dense = accuracy(base, xte, yte)
    rows = [f"{name:9s} {'dense':>5s} {'dense':26s} {'':>6s} {dense:>9.3f}"]
    print(rows[-1], flush=True)
    gen = torch.Generator().manual_seed(100)
    pick = torch.randperm(len(ytr), generator=gen)[:256]
    labelled = [(xtr[pick[i:i + 64]], ytr[pick[i:i + 64]]) for i in range(0, 256, 64)]
    unlabeled = [x for x, _ in labelled]
    mine = Ours(base, ex)
    calibrated = calibrated_criteria()
    recover = getattr(gp, "recover", None)
    methods = [c for c in criteria() if c != "bn_scale" or any(isinstance(m, nn.BatchNorm2d) for m in base.modules())]
    tp_methods = ["tp-l1", "tp-l2", "tp-taylor"] + (["tp-bnscale"] if "bn_scale" in methods else [])

    def row(method: str, ratio: float, got: float, cells: list[str]) -> None:
        rows.append(f"{name:9s} {ratio:>5.0%} {method:26s} {got:>6.1%} " + " ".join(f"{c:>16s}" for c in cells))
        print(rows[-1], flush=True)

    for ratio in ratios:
        target = gp.Target(flops=ratio)
        for c in methods:
            t0 = time.perf_counter()
            data = labelled if c in LABELLED else None
            try:
                pruned = mine(c, target, data)
            except Exception as exc:  # a criterion that cannot run here is a result too
                if c not in calibrated or not isinstance(exc, GraphPruneError):  # calibrated ones need data
                    row(c, ratio, 0.0, [f"n/a ({type(exc).__name__})"])
                    continue
                pruned = None
            cells = [f"{accuracy(pruned, xte, yte):.3f}" if pruned is not None else "- (needs data)"]
            if c in calibrated:
                calib = mine(c, target, unlabeled)
                if pruned is None:
                    pruned = calib
                cells.append(f"{accuracy(calib, xte, yte):.3f}")
                if recover is not None:
                    recover(calib, base, unlabeled, steps=recover_steps)  # trains the module in place
                    cells.append(f"{accuracy(calib, xte, yte):.3f}")
                else:
                    cells.append("n/a (not built)")
            else:
                cells += ["n/a (not built)" if not calibrated else "-"] * 2
            got = 1 - macs(pruned, ex) / full
            row(c + (" (labels)" if c in LABELLED else ""), ratio, got, cells)
            print(f"    ({time.perf_counter() - t0:.0f}s)", flush=True)
        for method in tp_methods:
            try:
                pruned, got = at_flops(lambda r: theirs(method, base, r, ex, labelled), full, ratio, ex, steps=6,
                                       tol=0.02)
            except Exception as exc:
                row(method, ratio, 0.0, [f"n/a ({type(exc).__name__})"])
                continue
            row(method + (" (labels)" if method == "tp-taylor" else ""), ratio, got,
                [f"{accuracy(pruned, xte, yte):.3f}", "-", "-"])
        if alloc:  # the allocation rules before issue 19 and the variants the defaults were chosen from
            for c in ("obspa", "l1", "l2"):
                for label, kw, norm in (("no floor, x1 (before)", dict(min_fraction=0.0, multiple=1), None),
                                        ("floor .25, x1", dict(multiple=1), None),
                                        ("floor .25, x8, mean", dict(multiple=8), "mean"),
                                        ("floor .25, x8, max", dict(multiple=8), "max"),
                                        ("floor .25, x8, rank", dict(multiple=8), "rank"),
                                        ("floor .5, x8", dict(min_fraction=0.5, multiple=8), None)):
                    try:
                        pruned = mine(c, gp.Target(flops=ratio, **kw), normalize=norm)
                    except Exception as exc:
                        row(f"{c} {label}", ratio, 0.0, [f"n/a ({type(exc).__name__})"])
                        continue
                    row(f"{c} {label}", ratio, 1 - macs(pruned, ex) / full, [f"{accuracy(pruned, xte, yte):.3f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--alloc", action="store_true",
                    help="also the allocation variants (floor, multiple, normalisation)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    if a.train_only:
        for name in a.models.split(","):
            model, (_, _, xte, yte) = pretrained(name)
            print(f"{name}: dense test accuracy {accuracy(model, xte, yte):.3f}", flush=True)
        return
    cmd = "python benchmarks/pretrained.py " + " ".join(sys.argv[1:])
    header = [f"# {cmd}",
              "# test accuracy on 500 held-out digits, no fine-tuning; got = measured MACs removed (FlopCounterMode)",
              f"# calibration: 256 unlabeled training digits; recovery: {a.recover_steps} distillation steps "
              "on them; (labels): 256 labelled digits",
              f"{'model':9s} {'MACs-':>5s} {'method':26s} {'got':>6s} {'no data':>16s} {'calibration':>16s} "
              f"{'calib+recovery':>16s}"]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    for name in a.models.split(","):
        rows += sweep(name, [float(r) for r in a.ratios.split(",")], a.recover_steps, a.alloc)
        if a.out:  # partial tables survive an interrupted run
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text("\n".join(header + rows) + "\n")
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
