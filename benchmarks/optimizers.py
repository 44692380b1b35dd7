"""Benchmark the OTO-family optimizers against dense training and Torch-Pruning.

Not run by CI; may take long.  sklearn digits (fixed 1297/500 split), a small ResNet
(3 stages, 32-64-128 channels) and a small ViT (the 8 image rows as 8 tokens), several
seeds.  Every method trains for the same number of steps; pruned models are measured
by tracing their compact form (FLOPs and parameters), so every row is compared on the
network that would actually ship.

    python benchmarks/optimizers.py --seeds 3 --steps 1500
    python benchmarks/optimizers.py --models resnet --methods HESSO,torch-pruning --targets 0.5
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.optim import DHSPG, H2SPG, HESSO, HESSO_CRIC
from graphprune.target import Target

EXAMPLE = torch.zeros(1, 1, 8, 8)


# ---- data and models ----------------------------------------------------------------------

def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # the fixed split
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    """3 stages of 32-64-128 channels, one basic block each."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stages = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class ViT(nn.Module):
    """Rows as tokens: 8 tokens of 8 pixels, 2 pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.LayerNorm(dim), attn=Attention(dim, heads), norm2=nn.LayerNorm(dim),
                mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)))))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2)) + self.pos  # [b, 1, 8, 8] -> 8 row tokens
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h))
            h = h + blk["mlp"](blk["norm2"](h))
        return self.head(self.norm(h).mean(dim=1))


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet": ResNet, "vit": ViT}


# ---- training -----------------------------------------------------------------------------

def batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        yield x[idx], y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        if _fixed_batch(model):
            pred = torch.cat([model(xi[None]) for xi in x]).argmax(1)
        else:
            pred = model(x).argmax(1)
    return float((pred == y).float().mean())


def _fixed_batch(model: nn.Module) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(2, 1, 8, 8))
        return False
    except Exception:  # compact models may keep the example's batch size
        return True


def measure(compact: nn.Module, dense_flops: float, dense_params: int) -> tuple[float, float]:
    g = gp.trace(compact, EXAMPLE)
    return 1 - g.total_flops / dense_flops, 1 - g.total_params / dense_params


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, seed: int) -> None:
    """Cross-entropy SGD with a cosine schedule; graphprune optimizers also log the loss."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for xb, yb in batches(data[0], data[1], steps, 64, seed):
        model.train()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if hasattr(opt, "record_loss"):
            opt.record_loss(loss)
        opt.step()
        sched.step()


def run_dense(name: str, seed: int, data, steps: int, target: float | None):
    torch.manual_seed(seed)
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train(model, opt, data, steps, seed)
    return model, 0.0, 0.0


def run_oto(cls) -> Callable:
    def run(name: str, seed: int, data, steps: int, target: float):
        torch.manual_seed(seed)
        model = MODELS[name]()
        g = gp.trace(model, EXAMPLE)
        kw = dict(warmup_steps=steps // 10, pruning_steps=steps // 2, weight_decay=1e-4)
        if cls in (HESSO, HESSO_CRIC):
            kw["pruning_periods"] = 10
        if cls is HESSO_CRIC:
            xh, yh = data[0][:256], data[1][:256]
            kw["loss_fn"] = lambda: F.cross_entropy(model(xh), yh)
        opt = cls(g, lr=0.05, target=Target(flops=target), **kw)
        train(model, opt, data, steps, seed)
        return g.construct_subnet(), None, None
    return run


def run_torch_pruning(name: str, seed: int, data, steps: int, target: float):
    """Group-norm sparse training, then prune in small steps to the FLOPs target, then fine-tune."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = MODELS[name]()
    example = torch.zeros(2, 1, 8, 8)
    head = model.fc if name == "resnet" else model.head
    kwargs = {}
    if name == "vit":
        kwargs = dict(num_heads={blk["attn"].q: blk["attn"].heads for blk in model.blocks} |
                      {blk["attn"].k: blk["attn"].heads for blk in model.blocks} |
                      {blk["attn"].v: blk["attn"].heads for blk in model.blocks})
    pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=0.9, iterative_steps=90, global_pruning=True,
                                       ignored_layers=[head], **kwargs)
    dense_macs, _ = tp.utils.count_ops_and_params(model, example)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sparse_steps = steps * 6 // 10
    stream = batches(data[0], data[1], steps, 64, seed)
    for t, (xb, yb) in enumerate(stream):
        model.train()
        if t == sparse_steps:
            pruner.update_regularizer()
            for _ in range(90):
                macs, _ = tp.utils.count_ops_and_params(model, example)
                if 1 - macs / dense_macs >= target:
                    break
                pruner.step()
            pruner.update_regularizer()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if t < sparse_steps:
            pruner.regularize(model)
        opt.step()
    return model, None, None


METHODS: dict[str, Callable] = {"dense": run_dense, "HESSO": run_oto(HESSO), "DHSPG": run_oto(DHSPG),
                                "H2SPG": run_oto(H2SPG), "HESSO-CRIC": run_oto(HESSO_CRIC),
                                "torch-pruning": run_torch_pruning}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet,vit")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="0.5,0.7")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads() // 2, 1))
    data = digits_split()
    rows = []
    for name in args.models.split(","):
        dense_g = gp.trace(MODELS[name](), EXAMPLE)
        for method in args.methods.split(","):
            for target in ([None] if method == "dense" else [float(t) for t in args.targets.split(",")]):
                accs, flops, params, secs = [], [], [], []
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    try:
                        model, _, _ = METHODS[method](name, seed, data, args.steps, target)
                    except Exception as exc:  # report and keep going: one failure must not hide the table
                        print(f"{name} {method} {target} seed {seed}: {type(exc).__name__}: {exc}")
                        break
                    secs.append(time.perf_counter() - start)
                    accs.append(accuracy(model, data[2], data[3]))
                    f, p = measure(model, dense_g.total_flops, dense_g.total_params)
                    flops.append(f)
                    params.append(p)
                if accs:
                    rows.append((name, method, target, accs, flops, params, secs))
                    print(_row(rows[-1]), flush=True)
    print("\n" + _header())
    for row in rows:
        print(_row(row))


def _header() -> str:
    return f"{'model':<7} {'method':<14} {'target':>6} {'accuracy':>15} {'FLOPs -':>8} {'params -':>8} {'time s':>7}"


def _row(row) -> str:
    name, method, target, accs, flops, params, secs = row
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    tgt = "-" if target is None else f"{target:.0%}"
    return (f"{name:<7} {method:<14} {tgt:>6} {statistics.mean(accs):>8.2%} ± {std:5.2%} "
            f"{statistics.mean(flops):>8.1%} {statistics.mean(params):>8.1%} {statistics.mean(secs):>7.1f}")


if __name__ == "__main__":
    main()
