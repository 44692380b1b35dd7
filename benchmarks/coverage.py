"""Coverage table: which models each tool can analyse, how much it finds, at what cost.

Not run in CI.  ``python benchmarks/coverage.py [--models resnet50,vit_b_16,hf_llama_gqa]
[--skip-peers] [--size 224] [--repeat 3] [--timeout 600] [--out results.json]``

One row per torchvision classification model (``torchvision.models.list_models``) plus
the small random-config Hugging Face models of the tests (``hf_*``).  Columns per tool:

* **graphprune**: groups, share of parameters inside groups
  (``grouped_params / total_params``), seconds of ``gp.trace(..., verify=False)`` (median
  of ``--repeat``), peak memory of that analysis, ``verify`` (every group kept by
  ``g.verify()``) and ``property`` (zero a random half of every group's units: the compact
  model must equal the zeroed model, with fewer parameters);
* **torch-pruning**: groups from ``DependencyGraph.get_all_groups`` (the output layer
  ignored), seconds of ``build_dependency`` (median), peak memory, and whether pruning
  half of every group's channels with ``MagnitudePruner`` leaves a model that still runs
  and keeps its output shape;
* **oto** (Only-Train-Once): groups, seconds of building ``OTO(model, dummy_input)`` and
  whether ``construct_subnet`` after zeroing random groups runs, where the package
  imports at all (the failure is reported as the reason otherwise).

Every (model, tool) pair runs in its own subprocess: memory numbers are that process's
``ru_maxrss`` growth over the resident size just before the analysis (so the model's own
weights and the imports are not counted), and a crash or a timeout costs one cell, not the
run.  New columns (the ONNX frontend's) are one more entry in ``TOOLS``: a function
``(model, inputs, repeat) -> dict`` returning the same keys.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the property check and the Hugging Face builders live in tests/

FIXED_SIZE = ("vit", "swin", "maxvit")  # models that only take 224x224
PERF_MODELS = ("resnet50", "resnet152", "vit_b_16", "vit_l_16")


# ---------------------------------------------------------------------------- models
def model_names() -> list[str]:
    import torchvision
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    try:
        from tests.analysis.hf_models import MODELS
    except ImportError:  # transformers not installed
        return names
    return names + [f"hf_{n}" for n in sorted(MODELS)]


def build(name: str, size: int) -> tuple[torch.nn.Module, tuple]:
    """A model with random weights in eval mode and its example inputs.  A batch of 2:
    ``torch.export`` specialises a batch of 1, so ``gp.trace``'s dynamic-batch export would
    fail and be redone with static shapes, timing two exports instead of one."""
    torch.manual_seed(0)
    if name.startswith("hf_"):
        from tests.analysis.hf_models import build as build_hf
        return build_hf(name[3:])
    import torchvision
    kwargs: dict[str, Any] = {}
    if name.startswith("inception") or name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    side = 224 if name.startswith(FIXED_SIZE) else size
    return model, (torch.randn(2, 3, side, side),)


# ---------------------------------------------------------------------------- measuring
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_mib_since(baseline: int) -> float:
    """Growth of the process's peak resident size over ``baseline`` (ru_maxrss is in KiB)."""
    return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2 ** 20


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float, float]:
    """(last result, median seconds, peak MiB) of ``repeat`` calls."""
    baseline, times, out = _rss_bytes(), [], None
    for _ in range(repeat):
        out = None  # let the previous result go before the next run
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), _peak_mib_since(baseline)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


# ---------------------------------------------------------------------------- tools
def run_graphprune(model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    import graphprune as gp
    from tests.helpers import check_zero_invariance
    g, secs, mib = _timed(lambda: gp.trace(model, inputs, verify=False), repeat)
    row = {"groups": len(g.groups), "grouped": g.grouped_params / max(1, g.total_params), "seconds": secs,
           "peak_mib": mib, "barriers": sorted({b.op for b in g.barriers})}
    try:
        withdrawn = g.verify()
        row["verify"] = "ok" if not withdrawn else f"{len(withdrawn)} withdrawn: {withdrawn[0][0].name}: {withdrawn[0][1]}"
    except Exception as exc:  # a crash inside verify is a finding
        row["verify"] = _reason(exc)
    try:
        check_zero_invariance(model, inputs)
        row["property"] = "ok"
    except Exception as exc:
        row["property"] = _reason(exc)
    return row


def _output_layers(model: torch.nn.Module, width: int) -> list[torch.nn.Module]:
    """Layers whose outputs are the model's outputs (``width`` features): pruning them
    would change the model's interface, so Torch-Pruning is told to ignore them."""
    return [m for m in model.modules()
            if (isinstance(m, torch.nn.Linear) and m.out_features == width)
            or (isinstance(m, torch.nn.Conv2d) and m.out_channels == width)]


def _first_tensor(out: Any) -> torch.Tensor:
    from torch.utils import _pytree as pytree
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


def run_torch_pruning(model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    import torch_pruning as tp
    with torch.no_grad():
        ref = _first_tensor(model(*inputs))
    example = inputs[0] if len(inputs) == 1 else inputs
    dg, secs, mib = _timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                                           verbose=False), repeat)
    ignored = _output_layers(model, ref.shape[-1])
    row = {"groups": sum(1 for _ in dg.get_all_groups(ignored_layers=ignored)), "seconds": secs, "peak_mib": mib}
    try:
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=_output_layers(pruned, ref.shape[-1]))
        pruner.step()
        with torch.no_grad():
            out = _first_tensor(pruned(*inputs))
        row["runs"] = "ok" if out.shape == ref.shape else f"output shape {tuple(out.shape)} != {tuple(ref.shape)}"
    except Exception as exc:
        row["runs"] = _reason(exc)
    return row


def run_oto(model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    try:
        from only_train_once import OTO
    except Exception as exc:  # e.g. it imports torch.onnx internals that torch 2.x removed
        raise RuntimeError(f"only_train_once does not import: {_reason(exc)}") from exc
    example = inputs[0] if len(inputs) == 1 else inputs
    oto, secs, mib = _timed(lambda: OTO(model=copy.deepcopy(model), dummy_input=example), repeat)
    row = {"groups": len(oto._graph.node_groups), "seconds": secs, "peak_mib": mib}
    try:
        oto.random_set_zero_groups()
        out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "gp_coverage_oto"
        oto.construct_subnet(out_dir=str(out_dir))
        compact = torch.load(oto.compressed_model_path, weights_only=False)
        with torch.no_grad():
            compact(*inputs)
        row["runs"] = "ok"
    except Exception as exc:
        row["runs"] = _reason(exc)
    return row


def run_graphprune_onnx(model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    """The same columns through the ONNX door: export (TorchScript exporter, dynamic
    batch), trace the file, verify with onnxruntime, and check the property on it."""
    import tempfile

    import graphprune as gp
    from tests.frontends.test_onnx import check_onnx, export
    if len(inputs) != 1:
        raise ValueError("the ONNX column exports single-input models only")
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, inputs[0], f"{tmp}/m.onnx")
        g, secs, mib = _timed(lambda: gp.trace(path, verify=False), repeat)
        row = {"groups": len(g.groups), "grouped": g.grouped_params / max(1, g.total_params), "seconds": secs,
               "peak_mib": mib, "barriers": sorted({b.op for b in g.barriers})}
        try:
            withdrawn = g.verify()
            row["verify"] = "ok" if not withdrawn else f"{len(withdrawn)} withdrawn: {withdrawn[0][0].name}: {withdrawn[0][1]}"
        except Exception as exc:
            row["verify"] = _reason(exc)
        try:
            check_onnx(path, inputs[0])
            row["property"] = "ok"
        except Exception as exc:
            row["property"] = _reason(exc)
    return row


TOOLS: dict[str, Callable[[torch.nn.Module, tuple, int], dict]] = {
    "graphprune": run_graphprune,
    "graphprune-onnx": run_graphprune_onnx,
    "torch-pruning": run_torch_pruning,
    "oto": run_oto,
}
PEERS = ("torch-pruning", "oto")


# ---------------------------------------------------------------------------- driver
def worker(name: str, tool: str, size: int, repeat: int) -> None:
    """Run one (model, tool) cell and print its row as the last line of stdout."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        model, inputs = build(name, size)
        row = {"status": "ok", **TOOLS[tool](model, inputs, repeat)}
    except Exception as exc:
        row = {"status": "fail", "reason": _reason(exc), "trace": traceback.format_exc(limit=3)[-800:]}
    print(json.dumps(row))


def run_cell(name: str, tool: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--tool", tool, "--size", str(args.size),
           "--repeat", str(args.repeat)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "reason": f"timeout after {args.timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "fail", "reason": f"crashed (exit {proc.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


def _cell(row: dict, key: str, fmt: str = "{}") -> str:
    if row.get("status") != "ok":
        return "fail"
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def _short(v: str) -> str:
    return "ok" if v == "ok" else "FAIL"


def print_table(results: dict[str, dict[str, dict]], tools: list[str]) -> None:
    head = f"{'model':28} {'gp groups':>9} {'in grp':>7} {'gp s':>7} {'gp MiB':>7} {'verify':>6} {'prop':>5}"
    if "torch-pruning" in tools:
        head += f" | {'tp groups':>9} {'tp s':>7} {'tp MiB':>7} {'runs':>5}"
    if "oto" in tools:
        head += f" | {'oto groups':>10} {'oto s':>7} {'runs':>5}"
    print(head)
    for name, cells in results.items():
        g = cells.get("graphprune", {})
        line = (f"{name[:28]:28} {_cell(g, 'groups'):>9} {_cell(g, 'grouped', '{:.1%}'):>7} "
                f"{_cell(g, 'seconds', '{:.2f}'):>7} {_cell(g, 'peak_mib', '{:.0f}'):>7} "
                f"{_short(g.get('verify', '')) if g.get('status') == 'ok' else 'fail':>6} "
                f"{_short(g.get('property', '')) if g.get('status') == 'ok' else 'fail':>5}")
        if "torch-pruning" in tools:
            t = cells.get("torch-pruning", {})
            line += (f" | {_cell(t, 'groups'):>9} {_cell(t, 'seconds', '{:.2f}'):>7} {_cell(t, 'peak_mib', '{:.0f}'):>7} "
                     f"{_short(t.get('runs', '')) if t.get('status') == 'ok' else 'fail':>5}")
        if "oto" in tools:
            o = cells.get("oto", {})
            line += (f" | {_cell(o, 'groups'):>10} {_cell(o, 'seconds', '{:.2f}'):>7} "
                     f"{_short(o.get('runs', '')) if o.get('status') == 'ok' else 'fail':>5}")
        print(line)


def print_totals(results: dict[str, dict[str, dict]], tools: list[str]) -> None:
    n = len(results)
    print(f"\ntotals over {n} models")
    for tool in tools:
        rows = [cells[tool] for cells in results.values() if tool in cells]
        ok = [r for r in rows if r.get("status") == "ok"]
        line = f"  {tool:14} analysed {len(ok)}/{n}, groups {sum(r.get('groups', 0) for r in ok)}, " \
               f"seconds {sum(r.get('seconds', 0.0) for r in ok):.1f}"
        if tool == "graphprune" and ok:
            line += (f", mean share in groups {statistics.mean(r['grouped'] for r in ok):.1%}, "
                     f"verify ok {sum(r.get('verify') == 'ok' for r in ok)}, "
                     f"property ok {sum(r.get('property') == 'ok' for r in ok)}")
        elif ok:
            line += f", pruned model runs {sum(r.get('runs') == 'ok' for r in ok)}"
        print(line)
    print("\nfailures")
    for name, cells in results.items():
        for tool, r in cells.items():
            problems = [r.get("reason")] if r.get("status") != "ok" else \
                [f"{k}: {r[k]}" for k in ("verify", "property", "runs") if k in r and r[k] != "ok"]
            for p in problems:
                print(f"  {name:28} {tool:14} {p}")
    perf = [m for m in PERF_MODELS if m in results and "torch-pruning" in results[m]]
    if perf:
        print("\ntrace+analysis vs Torch-Pruning build_dependency (median seconds)")
        for m in perf:
            g, t = results[m].get("graphprune", {}), results[m]["torch-pruning"]
            if g.get("status") == "ok" and t.get("status") == "ok":
                print(f"  {m:12} graphprune {g['seconds']:.2f}  torch-pruning {t['seconds']:.2f}  "
                      f"ratio {g['seconds'] / t['seconds']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: every torchvision classifier + hf_*)")
    ap.add_argument("--skip-peers", action="store_true", help="graphprune columns only")
    ap.add_argument("--size", type=int, default=224, help="input side for models that take any size")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the median is reported")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per (model, tool) cell")
    ap.add_argument("--out", help="write every cell (with failure reasons) as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.tool, args.size, args.repeat)
    names = args.models.split(",") if args.models else model_names()
    tools = ["graphprune", "graphprune-onnx"] + ([] if args.skip_peers else list(PEERS))
    results: dict[str, dict[str, dict]] = {}
    for name in names:
        results[name] = {}
        for tool in tools:  # the same order for every model
            results[name][tool] = run_cell(name, tool, args)
            r = results[name][tool]
            print(f"[{name} / {tool}] {r.get('status')} {r.get('reason', '')}"
                  f"{'' if r.get('status') != 'ok' else ' %.2fs' % r.get('seconds', 0)}", file=sys.stderr, flush=True)
        if args.out:  # after every model, so a long run can be read while it goes
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results, tools)
    print_totals(results, tools)


if __name__ == "__main__":
    main()
