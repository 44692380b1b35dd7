"""One-shot pruning on sklearn digits: graphprune's criteria next to Torch-Pruning's.

Not run in CI.  ``python benchmarks/one_shot.py [--seeds 3] [--epochs 8] [--ft-epochs 2]
[--models resnet,vit,mobilenet] [--ratios 0.3,0.5]``

For each model (a small ResNet, a small ViT that reads the 8 image rows as tokens, and
torchvision's mobilenet_v2 with one input channel on digits upsampled to 32x32), each
seed and each FLOPs reduction, every method prunes a copy of the same trained model to
the same *measured* FLOPs (one counter for all: ``gp.trace(model).total_flops`` of the
pruned model; each method's own knob is bisected until the measured reduction reaches
the ratio).  Accuracy on held-out digits is reported without fine-tuning and after a
short fine-tune, averaged over seeds.  Torch-Pruning methods that fail on a model are
reported as ``n/a``.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import graphprune as gp
from graphprune.errors import UnprunableTargetError
from graphprune.optim.oneshot import finetune, prune
from graphprune.target import Target

OURS = ["l1", "l2", "bn_scale", "taylor", "hessian", "obspa"]
THEIRS = ["tp-magnitude", "tp-taylor", "tp-hessian"]


# ---------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.short = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.layers = nn.Sequential(Block(width, width), Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TinyViT(nn.Module):
    """Rows as tokens: 8 tokens of 8 pixels, two pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, mlp: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(8, dim), nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": Attention(dim, heads), "ln2": nn.LayerNorm(dim),
            "fc1": nn.Linear(dim, mlp), "fc2": nn.Linear(mlp, dim)}) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["fc2"](F.gelu(b["fc1"](b["ln2"](x))))
        return self.head(self.norm(x).mean(1))


def mobilenet() -> nn.Module:
    from torchvision.models import mobilenet_v2

    m = mobilenet_v2(num_classes=10, width_mult=0.5)
    old = m.features[0][0]
    m.features[0][0] = nn.Conv2d(1, old.out_channels, 3, 1, 1, bias=False)  # 32x32 input: no first stride
    return m


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {  # factory, input side
    "resnet": (SmallResNet, 8), "vit": (TinyViT, 8), "mobilenet": (mobilenet, 32)}


# ---------------------------------------------------------------------------- data and training
def digits(side: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if side != 8:
        x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


BATCH = 64  # compact modules keep the traced example's batch size, so every batch has it


def loader(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[perm[i:i + BATCH]], y[perm[i:i + BATCH]]) for i in range(0, len(x) - BATCH + 1, BATCH)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in fixed-size batches (the last one padded by repetition, the padding not counted)."""
    model.eval()
    pad = -len(x) % BATCH
    xp = torch.cat([x, x[:pad]])
    with torch.no_grad():
        pred = torch.cat([model(xp[i:i + BATCH]).argmax(1) for i in range(0, len(xp), BATCH)])[:len(x)]
    return float((pred == y).float().mean())


# ---------------------------------------------------------------------------- pruning methods
def macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates by graphprune's counter (tracing does not change the model)."""
    return gp.trace(model, (example,), verify=False).total_flops


def ours(method: str, base: nn.Module, fraction: float, example: torch.Tensor, calib) -> nn.Module:
    model = copy.deepcopy(base).eval()
    g = gp.trace(model, (example,))
    prune(g, method, Target(flops=fraction), data=calib, loss_fn=F.cross_entropy)
    return g.construct_subnet()


def theirs(method: str, base: nn.Module, ratio: float, example: torch.Tensor, calib) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    imp = {"tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
           "tp-taylor": tp.importance.TaylorImportance, "tp-hessian": tp.importance.HessianImportance}[method]()
    heads = {m.qkv: m.heads for m in model.modules() if isinstance(m, Attention)}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  ignored_layers=[last], num_heads=heads)
    x, y = calib[0]
    if method == "tp-taylor":
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    elif method == "tp-hessian":
        imp.zero_grad()
        for loss in F.cross_entropy(model(x), y, reduction="none"):
            model.zero_grad()
            loss.backward(retain_graph=True)
            imp.accumulate_grad(model)
    pruner.step()
    return model


def at_flops(make: Callable[[float], nn.Module], full: float, ratio: float, example: torch.Tensor,
             steps: int = 7) -> tuple[nn.Module, float]:
    """Bisect a method's knob until the measured FLOPs reduction reaches ``ratio``."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            model = make(mid)
        except UnprunableTargetError:  # past what the guards allow: too far
            hi = mid
            continue
        got = 1 - macs(model, example) / full
        if got >= ratio:
            hi, best = mid, (model, got)
        else:
            lo = mid
    if best is None:
        raise UnprunableTargetError(f"could not reach {ratio:.0%} fewer FLOPs")
    return best


# ---------------------------------------------------------------------------- driver
def run(models: list[str], ratios: list[float], seeds: int, epochs: int, ft_epochs: int) -> dict:
    results: dict[tuple[str, float, str], list[tuple[float, float, float]]] = {}
    for name in models:
        factory, side = MODELS[name]
        xtr, ytr, xte, yte = digits(side)
        example = xtr[:BATCH]
        for seed in range(seeds):
            torch.manual_seed(seed)
            base = factory()
            finetune(base, loader(xtr, ytr, seed=seed), F.cross_entropy, epochs=epochs, lr=3e-3, optimizer="adam")
            results.setdefault((name, 0.0, "dense"), []).append((accuracy(base, xte, yte),) * 2 + (0.0,))
            full = macs(base, example)
            calib = loader(xtr, ytr, seed=100 + seed)[:4]
            for ratio in ratios:
                for method in OURS + THEIRS:
                    fn = ours if method in OURS else theirs
                    try:
                        pruned, got = at_flops(lambda f: fn(method, base, f, example, calib), full, ratio, example)
                    except Exception as exc:  # a method that cannot handle a model is a result too
                        print(f"  {name} {method}: n/a ({type(exc).__name__}: {str(exc)[:120]})")
                        continue
                    acc0 = accuracy(pruned, xte, yte)
                    finetune(pruned, loader(xtr, ytr, seed=seed), F.cross_entropy, epochs=ft_epochs, lr=1e-3,
                             optimizer="adam")
                    results.setdefault((name, ratio, method), []).append((acc0, accuracy(pruned, xte, yte), got))
                    print(f"  {name} seed={seed} r={ratio} {method:13s} flops-{got:.1%} "
                          f"acc={acc0:.3f} ft={results[(name, ratio, method)][-1][1]:.3f}", flush=True)
    return results


def table(results: dict) -> str:
    lines = [f"{'model':10s} {'FLOPs-':>6s} {'method':13s} {'got':>6s} {'no-FT':>6s} {'FT':>6s}  n"]
    for (name, ratio, method), rows in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        lines.append(f"{name:10s} {ratio:>6.0%} {method:13s} {mean[2]:>6.1%} {mean[0]:>6.3f} {mean[1]:>6.3f}  "
                     f"{len(rows)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet,vit,mobilenet")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ft-epochs", type=int, default=2)
    a = ap.parse_args()
    res = run(a.models.split(","), [float(r) for r in a.ratios.split(",")], a.seeds, a.epochs, a.ft_epochs)
    print(table(res))


if __name__ == "__main__":
    main()
