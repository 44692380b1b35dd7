"""Benchmark the OTO-family optimizers against dense training and Torch-Pruning.

Not run by CI; may take long.  sklearn digits (fixed 1297/500 split), a small ResNet
(3 stages, 32-64-128 channels) and a small ViT (the 8 image rows as 8 tokens), several
seeds.  Every method trains for the same number of steps with the same batches and the
same cosine schedule; pruned models are measured by tracing their compact form (FLOPs
and parameters), so every row is compared on the network that would actually ship.
Only-Train-Once's HESSO is tried (``import only_train_once``); where it cannot run its
row says why.

    python benchmarks/optimizers.py --seeds 3 --steps 600 --out benchmarks/results/optimizers.txt
    python benchmarks/optimizers.py --models resnet --methods HESSO,torch-pruning --targets 0.5
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.optim import DHSPG, H2SPG, HESSO, HESSO_CRIC
from graphprune.target import Target

from digits import MODELS, accuracy, attention_heads, batches, digits_split, example, head_layer


def measure(name: str, compact: nn.Module, dense_flops: float, dense_params: int) -> tuple[float, float]:
    g = gp.trace(compact, example(name), verify=False)
    return 1 - g.total_flops / dense_flops, 1 - g.total_params / dense_params


LR = 0.05


def lr_at(t: int, steps: int) -> float:
    """The one learning-rate schedule every method follows: cosine from ``LR`` to 0."""
    return LR * 0.5 * (1 + math.cos(math.pi * t / steps))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, seed: int) -> None:
    """Cross-entropy SGD on the shared schedule; graphprune optimizers also log the loss."""
    for t, (xb, yb) in enumerate(batches(data[0], data[1], steps, 64, seed)):
        set_lr(opt, lr_at(t, steps))
        model.train()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if hasattr(opt, "record_loss"):
            opt.record_loss(loss)
        opt.step()


def run_dense(name: str, seed: int, data, steps: int, target: float | None):
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    train(model, opt, data, steps, seed)
    return model, 0.0, 0.0


def run_oto(cls) -> Callable:
    def run(name: str, seed: int, data, steps: int, target: float):
        torch.manual_seed(seed)
        model = MODELS[name][0]()
        g = gp.trace(model, example(name))
        kw = dict(warmup_steps=steps // 10, pruning_steps=steps // 2, weight_decay=1e-4)
        if cls in (HESSO, HESSO_CRIC):
            kw["pruning_periods"] = 10
        if cls is HESSO_CRIC:
            xh, yh = data[0][:256], data[1][:256]
            kw["loss_fn"] = lambda: F.cross_entropy(model(xh), yh)
        opt = cls(g, lr=LR, target=Target(flops=target), **kw)
        train(model, opt, data, steps, seed)
        return g.construct_subnet(), None, None
    return run


def run_torch_pruning(name: str, seed: int, data, steps: int, target: float):
    """Group-norm sparse training, then prune in small steps to the FLOPs target, then fine-tune;
    on the same learning-rate schedule as every other method (pruning replaces the
    parameters, so the optimizer is rebuilt there and continues the schedule)."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = MODELS[name][0]()
    ex = example(name)
    kwargs = dict(num_heads=attention_heads(model)) if name == "vit" else {}
    pruner = tp.pruner.GroupNormPruner(model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=0.9, iterative_steps=90, global_pruning=True,
                                       ignored_layers=[head_layer(model)], **kwargs)
    dense_macs, _ = tp.utils.count_ops_and_params(model, ex)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    sparse_steps = steps * 6 // 10
    stream = batches(data[0], data[1], steps, 64, seed)
    for t, (xb, yb) in enumerate(stream):
        model.train()
        if t == sparse_steps:
            pruner.update_regularizer()
            for _ in range(90):
                macs, _ = tp.utils.count_ops_and_params(model, ex)
                if 1 - macs / dense_macs >= target:
                    break
                pruner.step()
            pruner.update_regularizer()
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
        set_lr(opt, lr_at(t, steps))
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if t < sparse_steps:
            pruner.regularize(model)
        opt.step()
    return model, None, None


def run_only_train_once(name: str, seed: int, data, steps: int, target: float):
    """Only-Train-Once's own HESSO on the same model, seed and steps, where its package imports."""
    import only_train_once  # noqa: F401  (raises on torch versions it does not support)

    raise NotImplementedError("only_train_once imported: wire its HESSO into this benchmark")


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here ("ExceptionType: message"), or None."""
    if method != "only-train-once":
        return None
    try:
        import only_train_once  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (any import failure is the answer)
        return f"{type(exc).__name__}: {exc}"
    return None


METHODS: dict[str, Callable] = {"dense": run_dense, "HESSO": run_oto(HESSO), "DHSPG": run_oto(DHSPG),
                                "H2SPG": run_oto(H2SPG), "HESSO-CRIC": run_oto(HESSO_CRIC),
                                "torch-pruning": run_torch_pruning, "only-train-once": run_only_train_once}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet,vit")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="0.5,0.7")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=None, help="also write the final table to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models: one thread is as fast, and leaves cores to others
    data = digits_split()  # the resnet and vit read 8x8 digits
    rows, notes = [], []
    for name in args.models.split(","):
        dense_g = gp.trace(MODELS[name][0](), example(name), verify=False)
        for method in args.methods.split(","):
            why = unavailable(method)
            if why is not None:
                rows.append((name, method, None, why))
                print(_row(rows[-1]), flush=True)
                continue
            for target in ([None] if method == "dense" else [float(t) for t in args.targets.split(",")]):
                accs, flops, params, secs = [], [], [], []
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    try:
                        model, _, _ = METHODS[method](name, seed, data, args.steps, target)
                    except Exception as exc:  # report and keep going: one failure must not hide the table
                        msg = " ".join(str(exc).split())
                        notes.append(f"{name} {method} {target} seed {seed}: {type(exc).__name__}: {msg}")
                        print(notes[-1], flush=True)
                        break
                    secs.append(time.perf_counter() - start)
                    accs.append(accuracy(model, data[2], data[3]))
                    f, p = measure(name, model, dense_g.total_flops, dense_g.total_params)
                    flops.append(f)
                    params.append(p)
                if accs:
                    rows.append((name, method, target, accs, flops, params, secs))
                    print(_row(rows[-1]), flush=True)
    lines = [f"# python {' '.join(sys.argv)}",
             f"# sklearn digits, 1297 train / 500 test; {args.seeds} seeds (0..{args.seeds - 1}); {args.steps} steps "
             f"of batch 64 for every method; accuracy: mean ± stdev over seeds; FLOPs -/params -: reduction of "
             f"the compact model, traced; torch {torch.__version__}",
             _header()] + [_row(row) for row in rows] + [f"# {n}" for n in notes]
    print("\n" + "\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


def _header() -> str:
    return f"{'model':<7} {'method':<15} {'target':>6} {'accuracy':>15} {'FLOPs -':>8} {'params -':>8} {'time s':>7}"


def _row(row) -> str:
    if len(row) == 4:  # a method that cannot run here
        name, method, _, why = row
        return f"{name:<7} {method:<15} {'-':>6} n/a: {why}"
    name, method, target, accs, flops, params, secs = row
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    tgt = "-" if target is None else f"{target:.0%}"
    return (f"{name:<7} {method:<15} {tgt:>6} {statistics.mean(accs):>8.2%} ± {std:5.2%} "
            f"{statistics.mean(flops):>8.1%} {statistics.mean(params):>8.1%} {statistics.mean(secs):>7.1f}")


if __name__ == "__main__":
    main()
