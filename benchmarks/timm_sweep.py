"""Sweep the smallest model of every timm family through ``gp.trace`` and the coverage
property check, to find the PyTorch capture's failure classes on code no test was written
against.

A family is a timm model module (``timm.list_modules()``: ``resnet``, ``xcit``, ``nfnet``...);
its smallest model by parameter count (counted on the meta device, nothing downloads) is
the one swept, random weights, at its default input size capped at 128 where the model
takes another size.  Each model runs in its own one-thread subprocess under a timeout, so
a hang or a crash is one row, not the end of the sweep.  A row passes when the trace
finds groups and the property holds: zero a random half of every group's units, the
compact model equals the zeroed model within 1e-4, with fewer parameters.

    python benchmarks/timm_sweep.py --out /tmp/sweep.jsonl        # every family
    python benchmarks/timm_sweep.py --out /tmp/s.jsonl xcit nfnet  # some families

``results/timm_sweep_before.jsonl``: every family on the code before issue 18's capture
work (91/98 pass); ``results/timm_sweep_after.jsonl``: the families that failed, re-run after it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def smallest_per_family(families: list[str]) -> dict[str, str]:
    """Family -> the name of its model with the fewest parameters."""
    import timm
    import torch
    out = {}
    for fam in families:
        best = None
        for name in timm.list_models(module=fam):
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False)
            except Exception:  # a model that needs arguments: another in the family will do
                continue
            n = sum(p.numel() for p in m.parameters())
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            out[fam] = best[1]
    return out


def _example(name: str) -> tuple:
    """The model and a batch of 2 at its default input size (at most 128 where it may change)."""
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if not model.pretrained_cfg.get("fixed_input_size", False) and max(h, w) > 128:
        try:  # a model that fixes its size at construction (img_size) gets built at 128
            model = timm.create_model(name, pretrained=False, img_size=128)
            h = w = 128
        except TypeError:
            h, w = min(h, 128), min(w, 128)
    return model.eval(), torch.randn(2, c, h, w)


def run_one(name: str) -> dict:
    """One row: groups, coverage and the property for ``name``."""
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import graphprune as gp
    from tests.helpers import load_benchmark
    coverage = load_benchmark("coverage")
    row: dict = {"model": name}
    try:
        model, x = _example(name)
        with torch.no_grad():
            model(x)
    except Exception as exc:
        return {**row, "result": "skip", "reason": f"model does not run: {coverage._reason(exc)}"}
    t = time.perf_counter()
    try:
        g = gp.trace(model, (x,))
        row.update(groups=len(g.groups), grouped=round(g.grouped_params / max(1, g.total_params), 3),
                   withdrawn=[f"{w.name}: {r}" for w, r in g.withdrawn[:2]], n_withdrawn=len(g.withdrawn),
                   barriers=sorted({b.op for b in g.barriers}), notes=list(g.notes))
        row["trace_s"] = round(time.perf_counter() - t, 2)
        row["property"] = coverage._property_torch(g, model, (x,))
    except Exception as exc:
        row["property"] = coverage._reason(exc)
    row["result"] = "pass" if row["property"] == "ok" else "fail"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help="timm modules to sweep (default: all)")
    ap.add_argument("--out", required=True, help="JSON lines, one row per family")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess: one model, row on stdout
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one)))
        return
    import timm
    picks = smallest_per_family(args.families or timm.list_modules())
    passed = 0
    with open(args.out, "a") as f:
        for fam, name in picks.items():
            try:
                p = subprocess.run([sys.executable, __file__, "--out", "-", "--one", name], capture_output=True,
                                   text=True, timeout=args.timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
                rows = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
                row = json.loads(rows[-1]) if rows else {"model": name, "result": "fail",
                                                          "property": f"crashed: {p.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                row = {"model": name, "result": "fail", "property": f"timeout after {args.timeout} s"}
            row["family"] = fam
            passed += row["result"] == "pass"
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{fam:28s} {name:40s} {row['result']:5s} {row.get('property', row.get('reason'))[:120]}",
                  flush=True)
    print(f"passed {passed}/{len(picks)} families")


if __name__ == "__main__":
    main()
