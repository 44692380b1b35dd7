"""The README's main job: train a small CNN on scikit-learn's digits, prune it with HESSO
to half its FLOPs while training, build the compact model, export it to ONNX, compile it
with TVM for this CPU (tuned for a short, stated budget), and compare before/after against
PyTorch and onnxruntime on the same ONNX, every runtime on the same number of threads.

Runs in about five minutes on 2 CPU cores (most of it TVM tuning; a rerun reuses the tuning
databases in runs/quickstart/ and takes about a minute); no download.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphprune as gp
from graphprune.compile import codegen_api
from graphprune.errors import TuningError

OUT = "runs/quickstart"
THREADS = 1          # every runtime is timed on this many threads
TUNE_TRIALS = 16     # meta-schedule trials per task (fused function) for each form
BATCH = 64


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


def runners(model: nn.Module, onnx_path: str, x: torch.Tensor, tuning_dir: str) -> tuple[dict[str, Callable[[], Any]], str]:
    """One zero-argument call per runtime for one form of the model, and a note on TVM's tuning.
    TVM compiles the same ONNX file onnxruntime runs, after tuning it for ``TUNE_TRIALS`` trials
    per task (the database folder resumes, so a rerun only tops it up)."""
    import onnxruntime as ort

    model.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}

    def run_torch() -> Any:
        with torch.no_grad():
            return model(x)

    calls = {"PyTorch eager": run_torch, "onnxruntime": lambda: session.run(None, feed)}
    try:
        tune, build = codegen_api("tune"), codegen_api("build")
    except TuningError as exc:
        return calls, f"no TVM rows: {exc}"
    report = tune(onnx_path, (x,), "x86", tuning_dir, trials_per_task=TUNE_TRIALS)
    compiled = build(onnx_path, (x,), "x86", tuning_db=tuning_dir)
    arrays = [x.numpy()]
    calls[f"TVM x86, tuned {TUNE_TRIALS}/task"] = lambda: compiled.run(*arrays)
    note = f"{report.tasks_total} tasks, {report.trials_run} trials run now in {report.seconds:.0f} s"
    return calls, note


def median_ms(calls: dict[Any, Callable[[], Any]], rounds: int = 7, number: int = 10) -> dict[Any, float]:
    """Median over interleaved rounds (every call once per round, so load hits all alike) of
    each round's median of ``number`` runs, after one warm-up run each."""
    for call in calls.values():
        call()
    per_round: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            times = []
            for _ in range(number):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            per_round[key].append(statistics.median(times))
    return {key: 1e3 * statistics.median(v) for key, v in per_round.items()}


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
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # read when TVM's thread pool starts
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # training
    xtr, xte, ytr, yte = digits()
    dense = small_cnn()
    train(dense, torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9), xtr, ytr, steps=400)
    dense_acc = accuracy(dense, xte, yte)
    trained_dense = copy.deepcopy(dense)  # HESSO trains ``dense`` in place

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

    os.makedirs(OUT, exist_ok=True)
    x = xte[:BATCH]
    forms = {"dense": trained_dense, "compact": compact}
    calls, notes = {}, {}
    for form, model in forms.items():
        path = f"{OUT}/{form}.onnx"
        gp.export_onnx(model, (xte[:2],), path)
        form_calls, notes[form] = runners(model, path, x, f"{OUT}/tuning-{form}")
        calls.update({(runtime, form): call for runtime, call in form_calls.items()})
    torch.set_num_threads(THREADS)
    ms = median_ms(calls)

    rows = [("accuracy", f"{dense_acc:.4f}", f"{pruned_acc:.4f}"),
            ("parameters", f"{g.total_params:,}", f"{n_params(compact):,}"),
            ("MMACs", f"{g.total_flops / 1e6:.2f}", f"{small.total_flops / 1e6:.2f}"),
            (f"latency, batch {BATCH}, {THREADS} thread(s), ms", "", "")]
    runtimes = list(dict.fromkeys(runtime for runtime, _ in calls))
    rows += [(f"  {runtime}", f"{ms[runtime, 'dense']:.2f}", f"{ms[runtime, 'compact']:.2f}") for runtime in runtimes]
    tvm_rows = [r for r in runtimes if r.startswith("TVM")]
    if tvm_rows:
        rows.append(("  TVM / onnxruntime", *(f"{ms[tvm_rows[0], f] / ms['onnxruntime', f]:.2f}x" for f in forms)))
    print(f"\n{'':36} {'dense':>10} {'HESSO 50% FLOPs':>16}")
    for name, a, b in rows:
        print(f"{name:36} {a:>10} {b:>16}")
    print(f"medians of 7 interleaved rounds; TVM tuning: dense {notes['dense']}; compact {notes['compact']}")
    print(f"compact model as ONNX: {OUT}/compact.onnx")


if __name__ == "__main__":
    main()
