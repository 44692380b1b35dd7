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

``--alloc`` also prints, for the data-free criteria, the accuracy under the allocation
rules before issue 19 (no floor, per-criterion normalisation of that time) next to
today's defaults, the figure that justifies the defaults.
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
from digits import Attention, batches, digits_split  # noqa: E402
from one_shot import at_flops, macs  # noqa: E402

import graphprune as gp  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
BATCH = 64


# ---------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, 16-32-64 channels), one input channel."""

    def __init__(self, classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    for name in a.models.split(","):
        model, (_, _, xte, yte) = pretrained(name)
        print(f"{name}: dense test accuracy {accuracy(model, xte, yte):.3f}", flush=True)
    if a.train_only:
        return


if __name__ == "__main__":
    main()
