"""The README's main job: train a small CNN on scikit-learn's digits, prune it with HESSO
to half its FLOPs while training, build the compact model, export it to ONNX, compile it
with TVM for this CPU (when TVM is installed), and compare before/after.

Runs in a few minutes on 2 CPU cores; no download.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphprune as gp
from graphprune.compile import codegen_api
from graphprune.errors import TuningError


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def latency_ms(model: nn.Module, x: torch.Tensor, repeat: int = 20) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def tvm_latency_ms(model: nn.Module, x: torch.Tensor) -> float | None:
    """Median latency of the model built with TVM for this CPU, or None without TVM."""
    try:
        build = codegen_api("build")
    except TuningError as exc:
        print(f"(no TVM latency: {exc})")
        return None
    return build(model, (x,), target="x86").benchmark()["median_ms"]


def train(model: nn.Module, opt: torch.optim.Optimizer, xtr, ytr, steps: int, batch: int = 64) -> None:
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(xtr), (batch,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, xte, ytr, yte = digits()
    dense = small_cnn()
    train(dense, torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9), xtr, ytr, steps=400)
    dense_acc = accuracy(dense, xte, yte)

    g = gp.trace(dense, xte[:2])
    print(g.summary())
    opt = gp.HESSO(g, lr=0.05, target=gp.Target(flops=0.5), warmup_steps=100, pruning_steps=400,
                   pruning_periods=8, momentum=0.9)
    train(dense, opt, xtr, ytr, steps=800)
    compact = g.construct_subnet()
    pruned_acc = accuracy(compact, xte, yte)
    small = gp.trace(compact, xte[:2], verify=False)

    def n_params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    rows = [("accuracy", f"{dense_acc:.4f}", f"{pruned_acc:.4f}"),
            ("parameters", f"{g.total_params:,}", f"{n_params(compact):,}"),
            ("MMACs", f"{g.total_flops / 1e6:.2f}", f"{small.total_flops / 1e6:.2f}"),
            ("latency batch 64 (ms, torch)", f"{latency_ms(dense, xte[:64]):.2f}", f"{latency_ms(compact, xte[:64]):.2f}")]
    os.makedirs("runs/quickstart", exist_ok=True)
    gp.export_onnx(compact, (xte[:2],), "runs/quickstart/compact.onnx")
    dense_tvm, compact_tvm = tvm_latency_ms(dense, xte[:64]), tvm_latency_ms(compact, xte[:64])
    if dense_tvm is not None and compact_tvm is not None:
        rows.append(("latency batch 64 (ms, TVM x86 untuned)", f"{dense_tvm:.2f}", f"{compact_tvm:.2f}"))
    print(f"\n{'':30} {'dense':>12} {'HESSO 50% FLOPs':>16}")
    for name, a, b in rows:
        print(f"{name:30} {a:>12} {b:>16}")
    print("compact model as ONNX: runs/quickstart/compact.onnx")


if __name__ == "__main__":
    main()
