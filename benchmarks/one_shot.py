"""One-shot pruning on sklearn digits: graphprune's criteria next to Torch-Pruning's.

Not run in CI.  ``python benchmarks/one_shot.py [--seeds 3] [--steps 600] [--ft-steps 50]
[--models resnet,vit,mobilenet] [--ratios 0.3,0.5] [--out benchmarks/results/one_shot.txt]``

The models and data are the shared ones of ``benchmarks/digits.py`` (a ResNet with
32-64-128 channels, a ViT that reads the 8 image rows as tokens with separate q/k/v
projections, and torchvision's mobilenet_v2 with one input channel on digits upsampled
to 32x32), traced with a batch-2 example so compact models take any batch size.  For
each model, seed and FLOPs reduction, every method prunes a copy of the same trained
model to the same *measured* FLOPs (one counter for all: PyTorch's ``FlopCounterMode`` on
the pruned model, which agrees with graphprune's own count on the ResNet and the
MobileNet and counts 3% fewer MACs on the ViT, whose elementwise ops it skips; each
method's own knob is searched until the measured reduction lands within 1% above the
ratio).  Accuracy on the 500 held-out digits is reported without
fine-tuning and after a short fine-tune (``--ft-steps`` Adam steps), averaged over
seeds.  The taylor/hessian criteria (ours and Torch-Pruning's) see 4 calibration
batches of 64 training digits; everything else sees no data.  Torch-Pruning is told
the attention head counts and not to prune the classifier.  Methods that fail on a
model are reported as ``n/a``.  Trained dense models are cached (``--cache``), so a
rerun only prunes; ``--first-seed``/``--methods``/``--ratios`` split a run into parts
that ``--merge`` (their logs or ``--json`` files) puts back into one table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import MODELS, accuracy, attention_heads, batches, digits_split, example, head_layer  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.errors import UnprunableTargetError  # noqa: E402
from graphprune.optim.oneshot import finetune, prune  # noqa: E402
from graphprune.target import Target  # noqa: E402

OURS = ["l1", "l2", "bn_scale", "taylor", "hessian", "obspa", "obspa-cal", "wanda", "reconstruction"]
#: Ours that read the 4 calibration batches: gradient criteria with their labels, calibrated ones without.
WITH_DATA = ("taylor", "hessian", "obspa-cal", "wanda", "reconstruction")
THEIRS = ["tp-magnitude", "tp-taylor", "tp-hessian"]
BATCH = 64


# ---------------------------------------------------------------------------- training
def train_dense(name: str, seed: int, data, steps: int, cache: Path | None) -> nn.Module:
    """The dense model of ``name`` trained with Adam (cosine) for ``steps`` batches; cached."""
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    path = cache / f"{name}-seed{seed}-steps{steps}.pt" if cache is not None else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    finetune(model, list(batches(data[0], data[1], steps, BATCH, seed)), F.cross_entropy, epochs=1, lr=3e-3,
             optimizer="adam")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


# ---------------------------------------------------------------------------- pruning methods
def macs(model: nn.Module, ex: torch.Tensor) -> float:
    """Multiply-accumulates of one example by PyTorch's own FLOP counter (a referee neither
    pruner wrote; on these models it agrees with ``gp.trace(model).total_flops``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ex[:1])
    return counter.get_total_flops() / 2


class Ours:
    """graphprune on one traced copy of the base model, its weights restored before each try."""

    def __init__(self, base: nn.Module, ex: torch.Tensor) -> None:
        self.model = copy.deepcopy(base).eval()
        self.g = gp.trace(self.model, (ex,), verify=False)
        self.state = copy.deepcopy(self.model.state_dict())

    def __call__(self, method: str, fraction: float, calib) -> nn.Module:
        self.model.load_state_dict(self.state)
        data = calib if method in WITH_DATA else None  # obspa with data would be calibrated: that is obspa-cal
        prune(self.g, method.removesuffix("-cal"), Target(flops=fraction), data=data, loss_fn=F.cross_entropy)
        return self.g.construct_subnet()


def theirs(method: str, base: nn.Module, ratio: float, ex: torch.Tensor, calib) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    imp = {"tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
           "tp-taylor": tp.importance.TaylorImportance, "tp-hessian": tp.importance.HessianImportance}[method]()
    pruner = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  ignored_layers=[head_layer(model)], num_heads=attention_heads(model))
    if method == "tp-taylor":
        model.zero_grad()
        for x, y in calib:
            F.cross_entropy(model(x), y).backward()
    elif method == "tp-hessian":
        imp.zero_grad()
        for x, y in calib:
            for loss in F.cross_entropy(model(x), y, reduction="none"):
                model.zero_grad()
                loss.backward(retain_graph=True)
                imp.accumulate_grad(model)
    pruner.step()
    return model.eval()


def at_flops(make: Callable[[float], nn.Module], full: float, ratio: float, ex: torch.Tensor | None,
             steps: int = 8, tol: float = 0.01,
             measure: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, float]:
    """Search a method's knob until the measured FLOPs reduction lands in ``[ratio, ratio + tol)``.

    The reduction is ``1 - macs(model, ex) / full``, or ``measure(model)`` for models that do
    not take one tensor (a language model reads keyword ids).

    The first try is the ratio itself; then regula falsi between the closest tries
    below and above (bisection while only one side is known).  The result is the try
    with the smallest measured reduction that reaches ``ratio``.
    """
    lo, hi = (0.0, 0.0), (0.95, None)  # (knob, measured) below and at/above the ratio
    best, knob = None, ratio
    for _ in range(steps):
        try:
            model = make(knob)
            got = measure(model) if measure is not None else 1 - macs(model, ex) / full
        except UnprunableTargetError:  # past what the guards allow: too far
            hi, got = (knob, None), None
        if got is not None and got >= ratio:
            hi = (knob, got)
            if best is None or got < best[1]:
                best = (model, got)
            if got < ratio + tol:
                break
        elif got is not None:
            lo = (knob, got)
        if hi[1] is None:  # nothing measured at or above the ratio yet: scale up the last try
            guess = lo[0] * (ratio + tol / 3) / lo[1] if lo[1] else (lo[0] + hi[0]) / 2
            knob = guess if guess < hi[0] else (lo[0] + hi[0]) / 2
        else:
            t = (ratio + tol / 3 - lo[1]) / (hi[1] - lo[1])
            knob = lo[0] + min(max(t, 0.1), 0.9) * (hi[0] - lo[0])
    if best is None:
        raise UnprunableTargetError(f"could not reach {ratio:.0%} fewer FLOPs")
    return best


# ---------------------------------------------------------------------------- driver
def run(models: list[str], ratios: list[float], seeds: int, steps: int, ft_steps: int, methods: list[str],
        cache: Path | None, first_seed: int = 0, save: Callable[[dict], None] | None = None) -> dict:
    results: dict[tuple[str, float, str], list[tuple[float, float, float]]] = {}
    for name in models:
        xtr, ytr, xte, yte = data = digits_split(MODELS[name][1])
        ex = example(name)
        for seed in range(first_seed, first_seed + seeds):
            t0 = time.perf_counter()
            base = train_dense(name, seed, data, steps, cache)
            dense = accuracy(base, xte, yte)
            results.setdefault((name, 0.0, "dense"), []).append((dense, dense, 0.0))
            print(f"{name} seed={seed} dense acc={dense:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            full = macs(base, ex)
            calib = list(batches(xtr, ytr, 4, BATCH, 100 + seed))
            mine = Ours(base, ex)
            for ratio in ratios:
                for method in methods:
                    t0 = time.perf_counter()
                    def make(f: float) -> nn.Module:
                        return mine(method, f, calib) if method in OURS else theirs(method, base, f, ex, calib)
                    try:
                        pruned, got = at_flops(make, full, ratio, ex)
                    except Exception as exc:  # a method that cannot handle a model is a result too
                        print(f"  {name} {method}: n/a ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                        continue
                    acc0 = accuracy(pruned, xte, yte)
                    acc1 = acc0
                    if ft_steps:
                        finetune(pruned, list(batches(xtr, ytr, ft_steps, BATCH, 1000 + seed)), F.cross_entropy,
                                 epochs=1, lr=1e-3, optimizer="adam")
                        acc1 = accuracy(pruned, xte, yte)
                    results.setdefault((name, ratio, method), []).append((acc0, acc1, got))
                    if save is not None:  # partial results survive an interrupted run
                        save(results)
                    print(f"  {name} seed={seed} r={ratio} {method:13s} flops-{got:.1%} acc={acc0:.3f} "
                          f"ft={acc1:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return results


_LINE = re.compile(r"^\s*(\w+) seed=(\d+) r=([\d.]+) (\S+)\s+flops-([\d.]+)% acc=([\d.]+) ft=([\d.]+)")
_DENSE = re.compile(r"^(\w+) seed=(\d+) dense acc=([\d.]+)")


def read_results(path: Path) -> dict:
    """Results of an earlier run as ``{(model, ratio, method): {seed: row}}``: from its printed
    log (the lines above, which name the seed), or its ``--json`` file (seeds unnamed)."""
    text = path.read_text()
    out: dict = {}
    if path.suffix == ".json":
        for k, rows in json.loads(text):
            out[tuple(k)] = {f"{path}#{i}": tuple(r) for i, r in enumerate(rows)}
        return out
    for line in text.splitlines():
        if m := _LINE.match(line):
            name, seed, ratio, method, got, acc0, acc1 = m.groups()
            out.setdefault((name, float(ratio), method), {})[int(seed)] = (float(acc0), float(acc1), float(got) / 100)
        elif m := _DENSE.match(line):
            out.setdefault((m[1], 0.0, "dense"), {})[int(m[2])] = (float(m[3]), float(m[3]), 0.0)
    return out


def merge(parts: list[dict]) -> dict:
    """Union of several runs; a (model, ratio, method, seed) measured by two runs keeps the first."""
    out: dict = {}
    for part in parts:
        for key, rows in part.items():
            have = out.setdefault(key, {})
            for seed, row in rows.items():
                have.setdefault(seed, row)
    return {key: list(rows.values()) for key, rows in out.items()}


def table(results: dict, seeds: int) -> str:
    lines = [f"{'model':10s} {'FLOPs-':>6s} {'method':13s} {'got':>6s} {'no-FT':>6s} {'FT':>6s}  n"]
    order = {m: i for i, m in enumerate(["dense"] + OURS + THEIRS)}
    for (name, ratio, method), rows in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                 order.get(kv[0][2], 99))):
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        lines.append(f"{name:10s} {ratio:>6.0%} {method:13s} {mean[2]:>6.1%} {mean[0]:>6.3f} {mean[1]:>6.3f}  "
                     f"{len(rows)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet,vit,mobilenet")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--methods", default=",".join(OURS + THEIRS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600, help="training steps of the dense models (batch 64)")
    ap.add_argument("--ft-steps", type=int, default=50, help="fine-tuning steps after pruning (0: none)")
    ap.add_argument("--cache", default="/tmp/graphprune-one-shot-cache", help="trained dense models ('': none)")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the raw per-seed results here")
    ap.add_argument("--merge", nargs="*", help="only print (and --out) the table of these --json files or logs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Unwrapped parameters")  # TP on the ViT's `pos`: it prunes it right
    if a.merge:
        res = merge([read_results(Path(f)) for f in a.merge])
        text = table(res, a.seeds)
        print(text)
        if a.out:
            Path(a.out).write_text(f"# python benchmarks/one_shot.py {' '.join(sys.argv[1:])}\n{text}\n")
        return
    def save(res: dict) -> None:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps([[list(k), v] for k, v in res.items()]))

    res = run(a.models.split(","), [float(r) for r in a.ratios.split(",")], a.seeds, a.steps, a.ft_steps,
              a.methods.split(","), Path(a.cache) if a.cache else None, a.first_seed, save if a.json else None)
    if a.json:
        save(res)
    text = table(res, a.seeds)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/one_shot.py " + " ".join(sys.argv[1:])
        Path(a.out).write_text(f"# {cmd}\n# accuracy on 500 held-out digits, mean over seeds (n)\n{text}\n")


if __name__ == "__main__":
    main()
