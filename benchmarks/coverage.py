"""Coverage table: which models each tool can analyse, how much it finds, at what cost.

Not run in CI.  ``python benchmarks/coverage.py [--suite all|torchvision+hf|timm|zoo] [--models resnet50,vit_b_16,hf_llama_gqa]
[--tools graphprune,graphprune-onnx] [--skip-peers] [--size 64] [--repeat 3] [--timeout 1800]
[--peer-timeout 300]
[--mem-cap-gib 8] [--results benchmarks/results/coverage.jsonl] [--retry-failed] [--stale] [--report]``

One row per torchvision classification model (``torchvision.models.list_models``), per
small random-config Hugging Face model of the tests (``hf_*``) and per timm architecture
family (``timm/<model>``, the family's cheapest model at its default input size) and
segmentation, detection and diffusion architectures (``zoo/<name>``; both in
:mod:`model_zoo`), run smallest first (parameter count); ``--suite`` picks one of the
two sets, and totals are printed per set.  Columns per tool:

* **graphprune**: groups, share of parameters inside groups
  (``grouped_params / total_params``), seconds of ``gp.trace(..., verify=False)`` (median
  of up to ``--repeat`` runs), peak memory of that analysis, ``default_seconds`` (one run
  of the default ``gp.trace(model, inputs)``, verification on: what a user waits for;
  column ``def s``), ``verify`` (every group kept by ``g.verify()``) and ``property`` (zero a random half of every group's units: the compact
  model must equal the zeroed model within 1e-4 relative error, with fewer parameters);
* **graphprune-onnx**: the same columns through the ONNX door: the model is exported
  (TorchScript exporter, dynamic batch; the dynamo exporter where TorchScript cannot) and
  ``gp.trace(path)`` is timed (external weights are memory-mapped; resident pages of the
  file count once touched); ``property`` runs the compact
  ModelProto and the zeroed full one with onnxruntime on another batch size than traced;
* **graphprune-onnx-dynamo**: the same through the second exporter, ``torch.onnx.export(dynamo=True)``
  (a default column of ``--suite torchvision+hf``; ``--tools`` adds it to any suite);
* **torch-pruning**: groups from ``DependencyGraph.get_all_groups`` (the output layer
  ignored), seconds of ``build_dependency`` (median), peak memory, and whether pruning
  half of every group's channels with ``MagnitudePruner`` leaves a model that still runs
  and keeps its output shape;
* **oto** (Only-Train-Once): groups, seconds of building ``OTO(model, dummy_input)`` and
  whether ``construct_subnet`` after zeroing random groups runs, where the package
  imports at all (``n/a`` with the import's exception otherwise);
* **codegen-x86** (only when named in ``--tools``: a TVM build per model): seconds of
  ``gp.compile(model, inputs, method="l2", target=Target(flops=0.3), codegen="x86")``, the
  compiled library's relative error against the compact model (compile refuses one past
  1e-3) and its latency over onnxruntime's on the same compact ONNX (default schedules, no
  tuning: a first build, not the tuned bar of ``latency.py``).

**How memory is measured.** Every (model, tool) cell runs in its own subprocess (one
thread).  The model is built first (for ONNX, built and exported by a child process of
the cell, so the exporter's own peak is not the cell's); then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``),
the resident size is read from ``/proc/self/statm``, and the cell's number is the growth
of the process's peak resident size (``ru_maxrss``) over it during the timed analysis
alone.  So the model's own weights and the imports are not counted; everything
the analysis allocates (the exported program, copies of weights, onnxruntime sessions) is.
The driver also watches each subprocess's resident size and kills a cell that passes
``--mem-cap-gib`` (the machine is shared), which is reported as that cell's failure.

**Resumable.** Each finished cell is appended as one JSON line to the results file (one
``write`` of a whole line; a torn last line is ignored on reading), and cells already
there are skipped on restart, so a crash or a kill loses at most the cells in flight.
``--retry-failed`` runs the failed cells again (the newest line of a cell wins);
``--report`` only prints the table and totals from the file.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the property check and the Hugging Face builders live in tests/
sys.path.insert(0, str(ROOT / "benchmarks"))
import model_zoo  # noqa: E402

FIXED_SIZE = ("vit", "swin", "maxvit")  # models that only take 224x224
MIN_SIZE = {"inception_v3": 96}  # 75 is its smallest input
PERF_MODELS = ("resnet50", "resnet152", "vit_b_16", "vit_l_16")
RESULTS = ROOT / "benchmarks" / "results" / "coverage.jsonl"
TIME_BUDGET = 60.0  # seconds of timed repeats per cell: big models are timed once
TOL = 1e-4


# ---------------------------------------------------------------------------- models
def _num_params(name: str) -> int:
    """Parameter count from torchvision's weight metadata or the timm family file (no
    download, no model built)."""
    if name.startswith(("hf_", model_zoo.ZOO_PREFIX)):
        return 0
    if name.startswith(model_zoo.PREFIX):
        return model_zoo.timm_params(name)
    import torchvision
    try:
        return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
    except Exception:
        return 1 << 40


def suite_of(name: str) -> str:
    if name.startswith(model_zoo.PREFIX):
        return "timm"
    return "zoo" if name.startswith(model_zoo.ZOO_PREFIX) else "torchvision+hf"


def model_names(suite: str = "all") -> list[str]:
    """The models of ``suite`` (``torchvision+hf``: every torchvision classifier plus the
    ``hf_*`` models; ``timm``: one per timm family; ``zoo``: segmentation, detection and
    diffusion; ``all``), smallest first."""
    import torchvision
    names: list[str] = []
    if suite in ("all", "torchvision+hf"):
        names += list(torchvision.models.list_models(module=torchvision.models))
        try:
            from tests.analysis.hf_models import MODELS
            names += [f"hf_{n}" for n in MODELS]
        except ImportError:  # transformers not installed
            pass
    if suite in ("all", "timm"):
        names += model_zoo.timm_names()
    if suite in ("all", "zoo"):
        names += model_zoo.zoo_names()
    return sorted(names, key=lambda n: (_num_params(n), n))


def side_for(name: str, size: int) -> int:
    if name.startswith(model_zoo.PREFIX):
        return model_zoo.input_side(name)
    if name.startswith(model_zoo.ZOO_PREFIX):
        return model_zoo.zoo_side(name)
    return 224 if name.startswith(FIXED_SIZE) else max(size, MIN_SIZE.get(name, 0))


def build(name: str, size: int, attention: str = "sdpa") -> tuple[torch.nn.Module, tuple]:
    """A model with random weights in eval mode and its example inputs.  A batch of 2:
    ``torch.export`` specialises a batch of 1, so ``gp.trace``'s dynamic-batch export would
    fail and be redone with static shapes, timing two exports instead of one."""
    torch.manual_seed(0)
    if name.startswith("hf_"):
        from tests.analysis.hf_models import build as build_hf
        return build_hf(name[3:], attention)
    if name.startswith(model_zoo.PREFIX):
        return model_zoo.build_timm(name)
    if name.startswith(model_zoo.ZOO_PREFIX):
        return model_zoo.build_zoo(name)
    import torchvision
    kwargs: dict[str, Any] = {}
    if name.startswith("inception") or name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    side = side_for(name, size)
    return model, (torch.randn(2, 3, side, side),)


# ---------------------------------------------------------------------------- measuring
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Reset the kernel's peak resident size (VmHWM, ru_maxrss) to the current one, so the
    peak read after the analysis is the analysis's, not the model build's or the export's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: ru_maxrss then covers the whole process
        pass


def _peak_mib_since(baseline: int) -> float:
    """Growth of the process's peak resident size over ``baseline`` (ru_maxrss is in KiB)."""
    return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2 ** 20


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float, float, int]:
    """(last result, median seconds, peak MiB, runs) of up to ``repeat`` calls; no new
    call once ``TIME_BUDGET`` seconds are spent (big models are timed once)."""
    from graphprune.memory import release
    gc.collect()
    release()  # free heap left resident by the build and export would hide the analysis's growth
    _reset_peak()
    baseline, times, out = _rss_bytes(), [], None
    for _ in range(repeat):
        out = None  # let the previous result go before the next run
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        if sum(times) > TIME_BUDGET:
            break
    return out, statistics.median(times), _peak_mib_since(baseline), len(times)


MEMORY_METHOD = "peak-reset-trimmed"  # rows measured otherwise (before the reset and the heap trim) are run again by --retry-failed


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"


def _verify_cell(g: Any) -> str:
    try:
        withdrawn = g.verify()
        return "ok" if not withdrawn else f"{len(withdrawn)} withdrawn: {withdrawn[0][0].name}: {withdrawn[0][1]}"
    except Exception as exc:  # a crash inside verify is a finding
        return _reason(exc)


# ---------------------------------------------------------------------------- tools
def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _property_torch(g: Any, model: torch.nn.Module, inputs: tuple) -> str:
    """tests.helpers.check_zero_invariance without its copies of the model (which only
    check that the user's model is left alone, and would need four copies of vit_h_14):
    zero a random half of every group, the compact model must equal the zeroed model."""
    from graphprune.pre_activation import pre_activations, run_capturing
    from graphprune.rel_error import max_rel_error
    from tests.helpers import assert_same_structure, zero_random_half
    if not g.groups:
        return "no prunable group found"
    removed = zero_random_half(g)  # g.params are the model's own tensors: the model is zeroed
    with torch.no_grad():
        ref = model(*inputs)
        compact = g.construct_subnet()
        out = compact(*inputs)
    assert_same_structure(ref, out)
    err = max_rel_error(ref, out)
    logits = pre_activations(g.ir)
    if logits:  # a final sigmoid/softmax saturates: its inputs show what the outputs hide
        with torch.no_grad():
            err = max(err, max_rel_error(run_capturing(g.backend.full(g, g.params).gm, logits, inputs, {}),
                                         run_capturing(compact.gm, logits, inputs, {})))
    if not err < TOL:
        return f"compact model differs from the zeroed model: rel. error {err:.3e}"
    if removed and not _n_params(compact) < _n_params(model):
        return "compact model is not smaller"
    return "ok"


def run_graphprune(name: str, model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    import graphprune as gp
    g, secs, mib, runs = _timed(lambda: gp.trace(model, inputs, verify=False), repeat)
    row = {"groups": len(g.groups), "grouped": g.grouped_params / max(1, g.total_params), "seconds": secs,
           "runs": runs, "peak_mib": mib, "barriers": sorted({b.op for b in g.barriers})}
    row["verify"] = _verify_cell(g)
    try:  # before the property check, which zeroes the model's own weights
        g = None
        gc.collect()
        t = time.perf_counter()
        gp.trace(model, inputs)
        row["default_seconds"] = time.perf_counter() - t
    except Exception as exc:  # the verify column says the same; the cell stays
        row["default_seconds"] = None
        row["default_error"] = _reason(exc)
    g = gp.trace(model, inputs, verify=False)
    try:
        row["property"] = _property_torch(g, model, inputs)
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


def run_torch_pruning(name: str, model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    import torch_pruning as tp
    with torch.no_grad():
        ref = _first_tensor(model(*inputs))
    example = inputs[0] if len(inputs) == 1 else inputs
    dg, secs, mib, runs = _timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                                                 verbose=False), repeat)
    ignored = _output_layers(model, ref.shape[-1])
    row = {"groups": sum(1 for _ in dg.get_all_groups(ignored_layers=ignored)), "seconds": secs, "runs": runs,
           "peak_mib": mib}
    del dg
    try:
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=_output_layers(pruned, ref.shape[-1]))
        pruner.step()
        with torch.no_grad():
            out = _first_tensor(pruned(*inputs))
        row["pruned_runs"] = "ok" if out.shape == ref.shape else f"output shape {tuple(out.shape)} != {tuple(ref.shape)}"
    except Exception as exc:
        row["pruned_runs"] = _reason(exc)
    return row


def oto_import_error() -> str | None:
    try:
        import only_train_once  # noqa: F401
    except Exception as exc:  # it imports torch.onnx internals that torch 2.x removed
        return f"n/a: does not import on torch {torch.__version__.split('+')[0]}: {_reason(exc)}"
    return None


def run_oto(name: str, model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    error = oto_import_error()
    if error:
        return {"status": "n/a", "reason": error}
    from only_train_once import OTO
    example = inputs[0] if len(inputs) == 1 else inputs
    oto, secs, mib, runs = _timed(lambda: OTO(model=copy.deepcopy(model), dummy_input=example), repeat)
    row = {"groups": len(oto._graph.node_groups), "seconds": secs, "runs": runs, "peak_mib": mib}
    try:
        oto.random_set_zero_groups()
        out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "gp_coverage_oto"
        oto.construct_subnet(out_dir=str(out_dir))
        compact = torch.load(oto.compressed_model_path, weights_only=False)
        with torch.no_grad():
            compact(*inputs)
        row["pruned_runs"] = "ok"
    except Exception as exc:
        row["pruned_runs"] = _reason(exc)
    return row


class _Positional(torch.nn.Module):
    """The model with only the inputs fed: the TorchScript exporter otherwise makes a
    forward's defaulted arguments graph inputs too (OPT's and BLOOM's ``logits_to_keep``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:  # the ONNX column exports single-input models
        return self.model(x)


def export_onnx_file(name: str, model: torch.nn.Module, inputs: tuple, path: str, dynamo_only: bool = False) -> str:
    """Export with a dynamic batch: the TorchScript exporter; for transformers models it
    cannot export (GPT-2 and Llama: aten::diff), the same model with eager attention, then
    the dynamo exporter.  ``dynamo_only``: the dynamo exporter alone (the second exporter
    column: its graphs differ in form, e.g. ``allowzero`` reshapes and fused ops).  Returns
    which exporter wrote the file."""
    from tests.frontends.test_onnx import export
    errors = []
    if name.startswith("hf_"):
        model = _Positional(model)
    if dynamo_only:
        _export_dynamo(model, inputs, path)
        return "dynamo"
    try:
        export(model, inputs[0], path)
        return "torchscript"
    except Exception as exc:
        errors.append(f"torchscript: {_reason(exc)}")
    if name.startswith("hf_"):
        try:
            eager, _ = build(name, 0, attention="eager")
            eager.load_state_dict(model.model.state_dict())
            export(_Positional(eager), inputs[0], path)
            return "torchscript (eager attention)"
        except Exception as exc:
            errors.append(f"torchscript eager: {_reason(exc)}")
    try:
        _export_dynamo(model, inputs, path)
        return "dynamo"
    except Exception as exc:
        errors.append(f"dynamo: {_reason(exc)}")
    raise RuntimeError("no exporter: " + " | ".join(errors))


def _export_dynamo(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch, from weights as the TorchScript
    column exports them (no all-zero parameter: this exporter would share equal ones)."""
    from tests.frontends.test_onnx import no_zero_weights
    no_zero_weights(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, inputs, path, dynamo=True, input_names=["x"], external_data=True,
                      dynamic_shapes=({0: batch},), opset_version=18, verbose=False)


def _property_onnx(g: Any, inputs: tuple) -> str:
    """tests.frontends.test_onnx.check_onnx on an already traced graph, for any input
    names: the compact ModelProto passes onnx.checker, keeps the inputs and their dynamic
    batch, equals the zeroed full model on another batch size, and has fewer weights."""
    from graphprune.frontends.onnx_backend import run_onnx, with_outputs
    from graphprune.frontends.onnx_skeleton import check_model
    from graphprune.pre_activation import pre_activations
    from graphprune.rel_error import max_rel_error
    from tests.frontends.test_onnx import n_weights
    from tests.helpers import zero_random_half
    if not g.groups:
        return "no prunable group found"
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    check_model(compact)
    if [i.name for i in compact.graph.input] != [i.name for i in full.graph.input]:
        return "compact model's inputs differ"
    if compact.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        return "compact model lost the dynamic batch"
    names = [i.name for i in full.graph.input if i.name not in {t.name for t in full.graph.initializer}]
    feeds = {}
    for n, x in zip(names, inputs):
        bigger = torch.cat([x, x[:1]], 0)  # another batch size than traced
        feeds[n] = bigger.numpy()
    n_out = len(full.graph.output)
    logits = pre_activations(g.ir)  # a final sigmoid/softmax saturates: its inputs are compared too
    ref, out = run_onnx(with_outputs(full, logits), feeds), run_onnx(with_outputs(compact, logits), feeds)
    for a, b in zip(ref[:n_out], out[:n_out]):
        if a.shape != b.shape:
            return f"output shape {b.shape} != {a.shape}"
    err = max_rel_error(ref, out)
    if not err <= TOL:
        return f"compact model differs from the zeroed model: rel. error {err:.3e}"
    if not n_weights(compact) < n_weights(full):
        return "compact model is not smaller"
    return "ok"


def export_in_child(name: str, size: int, folder: str, dynamo_only: bool = False) -> tuple[str, tuple]:
    """(exporter, example inputs) of ``name`` exported to ``folder``/m.onnx by a child process.

    An exporter's memory is not graphprune's: torch.onnx.export of vit_l_16 (1.2 GB of
    weights) peaks at 5.9 GB, more than graphprune's trace and check of the file (3.3 GB),
    and in the cell's own process that peak, and the heap it leaves, would count against
    the cell's memory cap.  The child builds the model as :func:`build` does (same seed) and
    saves the example inputs beside the file; the driver's cap still watches it, as a child
    of the cell."""
    cmd = [sys.executable, __file__, "--export", name, "--size", str(size), "--out", folder] + \
        (["--dynamo"] if dynamo_only else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"export exited {done.returncode}"])[-1])
    return done.stdout.strip().splitlines()[-1], torch.load(f"{folder}/inputs.pt")


def export_worker(name: str, size: int, folder: str, dynamo_only: bool) -> None:
    """The child of :func:`export_in_child`: prints the exporter that wrote the file."""
    torch.set_num_threads(1)
    model, inputs = build(name, size)
    exporter = export_onnx_file(name, model, inputs, f"{folder}/m.onnx", dynamo_only)
    torch.save(inputs, f"{folder}/inputs.pt")
    print(exporter, flush=True)


def run_graphprune_onnx(name: str, size: int, repeat: int, dynamo_only: bool = False) -> dict:
    """The file is exported by a child process (:func:`export_in_child`) and traced as a user
    hands it over (``gp.trace(path)``, what the CLI does): its external weights are
    memory-mapped, and the analysis reads none.  ``dynamo_only``: exported by the dynamo
    exporter alone (see :func:`export_onnx_file`)."""
    import graphprune as gp
    with tempfile.TemporaryDirectory() as tmp:
        exporter, inputs = export_in_child(name, size, tmp, dynamo_only)
        if len(inputs) != 1:
            raise ValueError("the ONNX column exports single-input models only")
        path = f"{tmp}/m.onnx"
        file_mib = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name != "inputs.pt") / 2 ** 20
        g, secs, mib, runs = _timed(lambda: gp.trace(path, inputs, verify=False), repeat)
    row = {"exporter": exporter, "file_mib": file_mib, "groups": len(g.groups),
           "grouped": g.grouped_params / max(1, g.total_params), "seconds": secs, "runs": runs, "peak_mib": mib,
           "barriers": sorted({b.op for b in g.barriers})}
    row["verify"] = _verify_cell(g)
    try:
        row["property"] = _property_onnx(g, inputs)
    except Exception as exc:
        row["property"] = _reason(exc)
    return row


def run_codegen_x86(name: str, model: torch.nn.Module, inputs: tuple, repeat: int) -> dict:
    """What a user of ``gp.compile(..., codegen="x86")`` meets: the model pruned by
    :data:`CODEGEN_FLOPS` of its FLOPs, the compact model built by TVM with default
    schedules (no tuning) and checked against it, and timed beside onnxruntime."""
    import graphprune as gp
    t = time.perf_counter()
    report = gp.compile(model, inputs, method="l2", target=gp.Target(flops=CODEGEN_FLOPS), codegen="x86").report
    return {"seconds": time.perf_counter() - t, "flops_removed": report.flops_removed,
            "codegen_error": report.codegen_error, "latency_ratio": report.latency_ratio,
            "codegen_from": report.codegen_from}


#: the share of the FLOPs the codegen column prunes before building
CODEGEN_FLOPS = 0.3
#: the ONNX columns, by whether the dynamo exporter alone writes the file
ONNX_TOOLS = {"graphprune-onnx": False, "graphprune-onnx-dynamo": True}
#: the columns that analyse the module itself
TOOLS: dict[str, Callable[[str, torch.nn.Module, tuple, int], dict]] = {
    "graphprune": run_graphprune,
    "torch-pruning": run_torch_pruning,
    "oto": run_oto,
    "codegen-x86": run_codegen_x86,  # not a default column: a build per model (minutes for the large ones)
}
PEERS = ("torch-pruning", "oto")


# ---------------------------------------------------------------------------- driver
def worker(name: str, tool: str, size: int, repeat: int) -> None:
    """Run one (model, tool) cell and print its row as the last line of stdout."""
    torch.set_num_threads(1)
    try:
        if tool in ONNX_TOOLS:
            cell = run_graphprune_onnx(name, size, repeat, dynamo_only=ONNX_TOOLS[tool])
        else:
            cell = TOOLS[tool](name, *build(name, size), repeat)
        row = {"status": "ok", "memory_method": MEMORY_METHOD, **cell}
    except Exception as exc:
        row = {"status": "fail", "reason": _reason(exc), "trace": traceback.format_exc(limit=4)[-1200:]}
    print(json.dumps(row, default=str), flush=True)


def _rss_of(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (best effort)."""
    total = 0
    try:
        pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_cell(name: str, tool: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--tool", tool, "--size", str(args.size),
           "--repeat", str(args.repeat)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cap = int(args.mem_cap_gib * 2 ** 30)
    limit = args.peer_timeout if tool in PEERS else args.timeout
    start, peak, killed = time.monotonic(), 0, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env)
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            peak = max(peak, rss)
            if rss > cap:
                killed = f"killed: resident size passed the {args.mem_cap_gib:g} GiB cap of this run"
            elif time.monotonic() - start > limit:
                killed = f"timeout after {limit}s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.monotonic() - start
    extra = {"wall_s": round(wall, 1), "process_peak_mib": round(peak / 2 ** 20)}
    if killed:
        return {"status": "fail", "reason": killed, **extra}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "fail", "reason": f"crashed (exit {proc.returncode}): {tail[:240]}", **extra}
    return {**json.loads(lines[-1]), **extra}


def read_results(path: Path) -> dict[tuple[str, str], dict]:
    """The newest line of every (model, tool) cell; a torn (unparsable) line is ignored."""
    cells: dict[tuple[str, str], dict] = {}
    if not path.exists():
        return cells
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            cells[(row["model"], row["tool"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    return cells


def _commit() -> str:
    """The code a row was measured on (``+dirty`` with uncommitted changes): rows from
    different commits are not comparable, and ``--stale`` reruns the others."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "graphprune", "passes", "codegen"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def append_result(path: Path, row: dict) -> None:
    """One ``write`` of one whole line with O_APPEND: a kill leaves whole lines (or at
    worst a torn last line, which ``read_results`` skips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n" + json.dumps(row, default=str) + "\n").encode()  # leading newline ends a torn line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ok(r: dict) -> bool:
    return r.get("status") == "ok"


def _failed(row: dict) -> bool:
    """A cell to run again under ``--retry-failed``: it crashed, a graphprune check failed
    (verify, property, 2 GiB), or its memory was measured before the peak counter was reset."""
    if row.get("status") == "n/a":
        return False
    if row["tool"] in PEERS:  # their code does not change between runs: a failure is the finding
        return _ok(row) and row.get("memory_method") != MEMORY_METHOD
    return not _ok(row) or row.get("memory_method") != MEMORY_METHOD or (
        row["tool"].startswith("graphprune") and not (row.get("verify") == "ok" and row.get("property") == "ok"
                                                      and row.get("peak_mib", 0) < 2048))


def _cell(row: dict, key: str, fmt: str = "{}") -> str:
    if not row:
        return "."
    if not _ok(row):
        return row.get("status", "fail")
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def _flag(row: dict, key: str) -> str:
    if not row:
        return "."
    if not _ok(row):
        return row.get("status", "fail")
    return "ok" if row.get(key) == "ok" else "FAIL"


def _ordered(cells: dict[tuple[str, str], dict]) -> list[str]:
    seen = list(dict.fromkeys(m for m, _ in cells))
    return sorted(seen, key=lambda n: (_num_params(n), n))


def print_table(cells: dict[tuple[str, str], dict], tools: list[str]) -> None:
    print("memory (MiB): growth of the cell subprocess's peak resident size over its resident size just before "
          "the analysis (free heap trimmed, peak counter reset there), with the model already built (PyTorch) or "
          "exported to a file (ONNX, traced from its path): what trace + analysis allocate; '.' = not run yet")
    head = f"{'model':22}"
    for tool, short in (("graphprune", "gp"), ("graphprune-onnx", "onnx"), ("graphprune-onnx-dynamo", "dyn")):
        if tool in tools:
            head += f" | {short + ' grp':>8} {'in grp':>6} {'s':>6} {'def s':>6} {'MiB':>6} {'verify':>6} {'prop':>5}"
    if "torch-pruning" in tools:
        head += f" | {'tp grp':>6} {'s':>6} {'MiB':>6} {'runs':>5}"
    if "oto" in tools:
        head += f" | {'oto':>4}"
    if "codegen-x86" in tools:
        head += f" | {'x86 s':>6} {'x86 err':>7} {'tvm/ort':>7}"
    print(head)
    for name in _ordered(cells):
        line = f"{name[:22]:22}"
        for tool in ("graphprune", "graphprune-onnx", "graphprune-onnx-dynamo"):
            if tool in tools:
                r = cells.get((name, tool), {})
                line += (f" | {_cell(r, 'groups'):>8} {_cell(r, 'grouped', '{:.0%}'):>6} {_cell(r, 'seconds', '{:.2f}'):>6} "
                         f"{_cell(r, 'default_seconds', '{:.2f}'):>6} {_cell(r, 'peak_mib', '{:.0f}'):>6} {_flag(r, 'verify'):>6} {_flag(r, 'property'):>5}")
        if "torch-pruning" in tools:
            t = cells.get((name, "torch-pruning"), {})
            line += (f" | {_cell(t, 'groups'):>6} {_cell(t, 'seconds', '{:.2f}'):>6} {_cell(t, 'peak_mib', '{:.0f}'):>6} "
                     f"{_flag(t, 'pruned_runs'):>5}")
        if "oto" in tools:
            o = cells.get((name, "oto"), {})
            line += f" | {(_cell(o, 'groups') if _ok(o) else o.get('status', '.')):>4}"
        if "codegen-x86" in tools:
            c = cells.get((name, "codegen-x86"), {})
            line += (f" | {_cell(c, 'seconds', '{:.0f}'):>6} {_cell(c, 'codegen_error', '{:.0e}'):>7} "
                     f"{_cell(c, 'latency_ratio', '{:.2f}'):>7}")
        print(line)


def print_totals(cells: dict[tuple[str, str], dict], tools: list[str], names: list[str]) -> None:
    """Per suite and tool: cells run, analysed, memory, and for graphprune the share of
    models that are *covered* (traced, every group verified, compact == zeroed and
    smaller) and of those, the share with at least half their parameters in groups."""
    models = _ordered(cells)
    for suite in dict.fromkeys(suite_of(n) for n in names):
        expected = sum(suite_of(n) == suite for n in names)
        mine = [m for m in models if suite_of(m) == suite]
        print(f"\ntotals, {suite} ({len(mine)} models with results, {expected} expected)")
        for tool in tools:
            rows = [cells[(m, tool)] for m in mine if (m, tool) in cells]
            ok = [r for r in rows if _ok(r)]
            line = f"  {tool:16} cells {len(rows)}/{expected}, analysed {len(ok)}"
            if ok and all("peak_mib" in r for r in ok):  # the codegen column measures none
                line += f", max peak {max(r.get('peak_mib', 0.0) for r in ok):.0f} MiB" \
                        f" (under 2 GiB: {sum(r.get('peak_mib', 0.0) < 2048 for r in ok)})"
            if tool.startswith("graphprune") and ok:
                covered = [r for r in ok if r.get("verify") == "ok" and r.get("property") == "ok"]
                half = sum(r["grouped"] >= 0.5 for r in covered)
                line += (f", verify ok {sum(r.get('verify') == 'ok' for r in ok)}, "
                         f"property ok {sum(r.get('property') == 'ok' for r in ok)}, "
                         f"all three {len(covered)} ({len(covered) / expected:.1%} of {expected}), "
                         f">= 50% of params in groups {half} ({half / max(1, len(covered)):.1%} of those), "
                         f"mean share in groups {statistics.mean(r['grouped'] for r in ok):.1%}")
                timed = [r for r in ok if r.get("default_seconds") is not None]
                if timed:
                    slowest = max(timed, key=lambda r: r["default_seconds"])
                    line += (f", default gp.trace (verified) median "
                             f"{statistics.median(r['default_seconds'] for r in timed):.2f} s, max "
                             f"{slowest['default_seconds']:.2f} s ({slowest.get('model', '?')}) over {len(timed)}")
            elif tool == "codegen-x86" and ok:
                ratios = [r["latency_ratio"] for r in ok if r.get("latency_ratio") is not None]
                line += (f" (built, and matching the compact model within 1e-3: compile refuses a library that does "
                         f"not), built from the compact ONNX {sum(bool(r.get('codegen_from')) for r in ok)}"
                         + (f", untuned TVM / onnxruntime median {statistics.median(ratios):.2f}" if ratios else ""))
            elif ok:
                line += f", pruned model runs {sum(r.get('pruned_runs') == 'ok' for r in ok)}"
            na = [r for r in rows if r.get("status") == "n/a"]
            if na:
                line += f", n/a {len(na)} ({na[0].get('reason')})"
            print(line)
    print("\nfailures")
    for m in models:
        for tool in tools:
            r = cells.get((m, tool))
            if r is None or r.get("status") == "n/a":
                continue
            problems = [r.get("reason")] if not _ok(r) else \
                [f"{k}: {r[k]}" for k in ("verify", "property", "pruned_runs") if k in r and r[k] != "ok"]
            if _ok(r) and tool.startswith("graphprune") and r.get("peak_mib", 0) >= 2048:
                problems.append(f"memory: {r['peak_mib']:.0f} MiB >= 2 GiB")
            for p in problems:
                print(f"  {m:22} {tool:16} {p}")
    print("\ntrace+analysis vs Torch-Pruning build_dependency (median seconds)")
    for m in PERF_MODELS:
        g, t = cells.get((m, "graphprune"), {}), cells.get((m, "torch-pruning"), {})
        if _ok(g) and _ok(t):
            print(f"  {m:12} graphprune {g['seconds']:.2f}  torch-pruning {t['seconds']:.2f}  "
                  f"ratio {g['seconds'] / t['seconds']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: every torchvision classifier + hf_*)")
    ap.add_argument("--suite", default="all", choices=["all", "torchvision+hf", "timm", "zoo"],
                    help="which models (default: all); --models overrides")
    ap.add_argument("--first", help="comma-separated models to run (and with --retry-failed, retry) before the others")
    ap.add_argument("--tools", help=f"comma-separated, from {','.join([*TOOLS, *ONNX_TOOLS])} (default: all)")
    ap.add_argument("--skip-peers", action="store_true", help="graphprune columns only")
    ap.add_argument("--size", type=int, default=64, help="input side for models that take any size")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the median is reported")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per graphprune cell (build, export, "
                    "timed analysis, verify and property together)")
    ap.add_argument("--peer-timeout", type=int, default=300, help="seconds per peer cell")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0, help="kill a cell whose process passes this")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file of finished cells")
    ap.add_argument("--retry-failed", action="store_true",
                    help="run failed cells again (crashed, or a graphprune verify/property failure)")
    ap.add_argument("--stale", action="store_true",
                    help="run graphprune cells measured on another commit again (the peers' do not depend on it)")
    ap.add_argument("--report", action="store_true", help="only print the table from the results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tool", help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dynamo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.tool, args.size, args.repeat)
    if args.export:
        return export_worker(args.export, args.size, args.out, args.dynamo)
    names = args.models.split(",") if args.models else model_names(args.suite)
    if args.first:  # e.g. the architectures a change is about, before the long tail
        first = [n for n in args.first.split(",") if n in names]
        names = first + [n for n in names if n not in first]
    tools = args.tools.split(",") if args.tools else \
        ["graphprune", "graphprune-onnx"] + (["graphprune-onnx-dynamo"] if args.suite == "torchvision+hf" else []) \
        + ([] if args.skip_peers else list(PEERS))
    if not args.report:
        oto_error = None
        if "oto" in tools:  # one import attempt for the whole run
            probe = subprocess.run([sys.executable, "-c", "import only_train_once"], capture_output=True, text=True)
            if probe.returncode:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                oto_error = ("n/a: only_train_once is not installed" if "'only_train_once'" in last else
                             f"n/a: does not import on torch {torch.__version__.split('+')[0]}: {last[:200]}")
        # cells never run first (smallest models first), then, with --retry-failed, the failed ones
        passes = [False, True] if args.retry_failed else [False]
        first = set(args.first.split(",")) if args.first else set()
        for retry, name, tool in [(r, n, t) for r in passes for n in names for t in tools]:
            done = read_results(args.results).get((name, tool))
            # the checkout may move during a long run: a cell is stale against the code a new run would use
            stale = args.stale and tool not in PEERS and done and done.get("commit") != _commit()
            if done and not stale and not ((retry or (args.retry_failed and name in first)) and _failed(done)):
                continue
            if tool == "oto" and oto_error:
                r = {"status": "n/a", "reason": oto_error}
            else:
                r = run_cell(name, tool, args)
            r = {"model": name, "tool": tool, "side": side_for(name, args.size), **r,
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": _commit()}  # each cell imports anew
            append_result(args.results, r)
            print(f"[{name} / {tool}] {r.get('status')} {r.get('reason', '')}"
                  f"{'' if not _ok(r) else ' %.2fs' % r.get('seconds', 0)}"
                  f"{' %.0fMiB' % r['peak_mib'] if 'peak_mib' in r else ''}",
                  file=sys.stderr, flush=True)
    cells = {k: v for k, v in read_results(args.results).items() if k[0] in names and k[1] in tools}
    print_table(cells, tools)
    print_totals(cells, tools, names)


if __name__ == "__main__":
    main()
