"""Inference latency, dense and pruned: torch eager vs onnxruntime vs TVM (default schedules) vs TVM (tuned), and BSR.

Not run in CI (tuning takes minutes per model).  ``python benchmarks/latency.py
[--models resnet18,mobilenet_v2,vit,bert] [--runtimes torch,onnxruntime,tvm-default,tvm-tuned]
[--flops 0.5] [--multiple LANES] [--criterion l2] [--threads 1,2] [--rounds 7] [--number 5]
[--trials-per-task 16 | --tune-minutes 10] [--reuse-model deit_tiny] [--reuse-trials 16]
[--out runs/latency] [--results benchmarks/results/latency.txt] [--bsr-only | --no-bsr]``

With ``--tune-minutes M`` the budget is the issue's: at most M minutes of tuning per model
(the dense form ``--dense-share`` of it, half by default, the pruned form the rest), every
model tuning into one database that starts empty and is shared across the run, as a user's
per-machine database is. One library per form, tuned for the largest thread count, is
timed at every ``--threads`` count.
``--reuse-model`` then compiles a model of another family twice with the same trials per
task, into a copy of that database and into an empty one, and tables the tuning time saved.

Every model is timed in two forms: dense, and pruned by graphprune's one-shot API
(``gp.prune(g, criterion, Target(flops=...))`` on its random weights, then
``g.construct_subnet()``; latency depends on the widths, not on the weights).  Both forms take
the same path to every runtime: the ``torch.export`` program run eagerly for torch (so the
torch speedup is pruning's alone, not nn.Module against exported graph), the ONNX that
``gp.export_onnx`` writes for onnxruntime, and ``graphprune.codegen.build`` of that same
ONNX file for TVM (the issue's comparison: the same compact ONNX), tuned per form with the
same trials per task, measured at the thread count every runtime is timed with; the pruned
form's tuning starts from a copy of the dense form's database (incremental re-tuning).  MACs are ``gp.trace(...).total_flops`` of the model
and of the compact model: the FLOPs ratio is measured, not the target.  Per model the table
has a dense row, a pruned row and a row of pruned speedup / FLOPs ratio per runtime (1.0:
latency fell exactly with FLOPs), and a tuned TVM / onnxruntime column; below it the issue's
two checks.  The tables go to stdout and, atomically, to ``--results`` with the command line
and the tuning budget in the header; the numbers also go to ``<out>/latency.json``.

Each measurement runs in its own subprocess with one runtime and explicit thread counts
(OMP/MKL/torch/ORT/``TVM_NUM_THREADS``): two thread pools in one process distort the
numbers. Rounds are interleaved (round r runs every runtime on both forms once) and each cell
is the median over rounds of a per-process median, so a busy neighbour hits all cells alike.
TVM models are compiled once into shared libraries that the workers load. The BSR table
times a 512x512 linear layer at 80%/90% block sparsity, batch 1 and 128, against the dense
kernel graphprune builds (tuned with the same trials per task, or from ``--tuning-db``).
The whole-model BSR table builds an MLP 512-2048-512 with 80%/90% of its 16x1 weight blocks
zero, at batch 1 and 128, once dense (tuned) and once with ``sparse="auto"`` on the same
tuning records, so a layer BSR does not win keeps the tuned dense kernel.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

MODELS = ["resnet18", "mobilenet_v2", "vit", "bert"]
RUNTIMES = ["torch", "onnxruntime", "tvm-default", "tvm-tuned"]
RESULTS = Path(__file__).resolve().parent / "results" / "latency.txt"
SPEEDUP_FLOOR = 0.8   # done when: pruned speedup >= 0.8 x the FLOPs ratio
EARLIER_LIGHT_RULE = "tasks under 1% of the FLOPs (task_budgets before b656b26)"  # rows saved without the field


@dataclass
class Variant:
    """One form of one model, ready to time: its MACs, its example inputs and one artefact per runtime."""

    model: str
    form: str                      # "dense" or "pruned"
    macs: float                    # multiply-accumulates at the example shape (gp.trace's count)
    inputs: str                    # JSON {"shapes", "dtypes"}: every worker builds the same inputs from it
    artifacts: dict[str, str] = field(default_factory=dict)   # runtime -> file its worker loads
    tuning: dict[str, int | str] | None = None                # tvm-tuned's budget: tasks, trials, light rule
    pruning: str | None = None                                # the PruneReport, for the record
    ms: dict[str, dict[str, float]] = field(default_factory=dict)  # threads -> runtime -> median latency


def make_model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]] | None:
    """The benchmark models (random weights: latency does not depend on them); None if unavailable."""
    import torchvision

    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18().eval(), (torch.randn(1, 3, 224, 224),)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 224, 224),)
    if name == "vit":  # ViT-Tiny-like: 96x96 images, 6 layers of width 192
        model = torchvision.models.VisionTransformer(image_size=96, patch_size=16, num_layers=6, num_heads=3,
                                                     hidden_dim=192, mlp_dim=768, num_classes=100)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises it: outputs all 0
        return model.eval(), (torch.randn(1, 3, 96, 96),)
    if name == "bert":
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            return None
        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            vocab_size=30522, max_position_embeddings=128, attn_implementation="eager")

        class Bert(torch.nn.Module):  # a tensor in, a tensor out: the same signature for every runtime
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(config)

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.bert(input_ids=ids).last_hidden_state

        return Bert().eval(), (torch.randint(0, 30522, (1, 128)),)
    if name == "deit_tiny":  # timm's DeiT-Tiny at the ViT's 96x96: another library's ViT, for the reuse table
        try:
            import timm
        except ImportError:
            return None
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=96, num_classes=100)
        return model.eval(), (torch.randn(1, 3, 96, 96),)
    raise ValueError(name)


def thread_env(threads: int) -> dict[str, str]:
    """A worker's environment: every runtime's pool at ``threads``, and the TVM runtime's
    settings a compiled model runs with in graphprune (:data:`graphprune.codegen.compiled.RUNTIME_ENV`)."""
    from graphprune.codegen.compiled import runtime_env

    names = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"]
    return runtime_env(dict(os.environ, **{n: str(threads) for n in names}))


# ----------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> None:
    """Time one runtime on one artefact; print {"ms": median} as the last line."""
    spec = json.loads(Path(args.inputs).read_text())
    arrays = [_example(s, d) for s, d in zip(spec["shapes"], spec["dtypes"])]
    call = LOADERS[args.worker](args.artifact, arrays, int(args.threads))
    call()  # warm-up: lazy initialisation and first allocations stay out of the numbers
    print(json.dumps({"ms": statistics.median(_time(call, args.number))}))


def _load_torch(artifact: str, arrays: list[np.ndarray], threads: int) -> Callable[[], object]:
    """The saved ``torch.export`` program, run eagerly (ATen op by op, nothing compiled)."""
    torch.set_num_threads(threads)
    module = torch.export.load(artifact).module()
    inputs = [torch.from_numpy(a) for a in arrays]

    def call() -> object:
        with torch.no_grad():
            return module(*inputs)

    return call


def _load_onnxruntime(artifact: str, arrays: list[np.ndarray], threads: int) -> Callable[[], object]:
    """An onnxruntime CPU session with ``threads`` intra-op threads and no inter-op pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a for i, a in zip(session.get_inputs(), arrays)}
    return lambda: session.run(None, feeds)


def _load_tvm(artifact: str, arrays: list[np.ndarray], threads: int) -> Callable[[], object]:
    """A compiled library in the Relax VM; its pool size comes from ``TVM_NUM_THREADS`` (:func:`thread_env`)."""
    import tvm
    from tvm import relax

    main = relax.VirtualMachine(tvm.runtime.load_module(artifact), tvm.cpu())["main"]
    inputs = [tvm.runtime.tensor(a) for a in arrays]
    return lambda: main(*inputs)


LOADERS = {"torch": _load_torch, "onnxruntime": _load_onnxruntime, "tvm-default": _load_tvm, "tvm-tuned": _load_tvm}


def _example(shape, dtype) -> np.ndarray:
    shape = [d if isinstance(d, int) else 1 for d in shape]
    return np.zeros(shape, "int64") if "int" in str(dtype) else np.random.default_rng(0).standard_normal(shape).astype("float32")


def _time(call, number: int) -> list[float]:
    times = []
    for _ in range(number):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bsr_worker(args: argparse.Namespace) -> None:
    """One process: the BSR table rows (TVM only, so one thread pool)."""
    from graphprune.codegen.sparsify import choose_linear_kernel

    import graphprune.codegen as codegen

    rng = np.random.default_rng(0)
    rows, databases = [], {}
    for batch in (1, 128):  # the dense kernel's tasks do not depend on the weights: tune once per batch
        databases[batch] = args.tuning_db
        if args.trials_per_task > 0 and args.tuning_db is None:
            report = codegen.tune(torch.nn.Linear(512, 512), (torch.zeros(batch, 512),), "x86",
                                  Path(args.out) / f"tuning-linear512-b{batch}", trials_per_task=args.trials_per_task)
            databases[batch] = report.work_dir
    for sparsity in (0.8, 0.9):
        for block in ((16, 1), (1, 16), (4, 4)):
            weight = rng.standard_normal((512, 512)).astype("float32")
            mask = rng.random((512 // block[0], 512 // block[1])) >= sparsity
            layer = torch.nn.Linear(512, 512)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(weight * np.kron(mask, np.ones(block, "float32"))))
            for batch in (1, 128):
                choice = choose_linear_kernel(layer, batch, block, tuning_db=databases[batch])
                rows.append({"sparsity": sparsity, "block": f"{block[0]}x{block[1]}", "batch": batch,
                             "dense_ms": choice.dense_ms, "bsr_ms": choice.bsr_ms, "form": choice.form,
                             "chosen": choice.kernel})
    print(json.dumps(rows))


def bsr_model_worker(args: argparse.Namespace) -> None:
    """One process: the whole-model BSR rows, dense build vs ``sparse="auto"`` build of one MLP."""
    import graphprune.codegen as codegen

    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 128):
        x = torch.randn(batch, 512)
        database = args.tuning_db
        if args.trials_per_task > 0 and database is None:
            dense_mlp = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512))
            database = codegen.tune(dense_mlp, (x,), "x86", Path(args.out) / f"tuning-mlp512-b{batch}",
                                    trials_per_task=args.trials_per_task).work_dir
        for sparsity in (0.8, 0.9):
            model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)).eval()
            for layer in (model[0], model[2]):
                n, k = layer.weight.shape
                keep = rng.random((n // 16, k)) >= sparsity
                with torch.no_grad():
                    layer.weight.mul_(torch.from_numpy(np.kron(keep, np.ones((16, 1), "float32"))))
            dense = codegen.build(model, (x,), "x86", tuning_db=database)
            sparse = codegen.build(model, (x,), "x86", tuning_db=database, sparse="auto", block=(16, 1))
            rows.append({"sparsity": sparsity, "batch": batch, "dense_ms": dense.benchmark()["median_ms"],
                         "sparse_ms": sparse.benchmark()["median_ms"],
                         "bsr_layers": f"{len(sparse.bsr_layers)}/{len(sparse.kernel_choices)}"})
    print(json.dumps(rows))


# ----------------------------------------------------------------------------- preparation
def prepare(name: str, out: Path, runtimes: list[str], trials_per_task: int | None, flops: float,
            criterion: str, multiple: int, threads: int, minutes: float | None = None,
            dense_share: float = 0.5) -> list[Variant]:
    """Both forms of one model, with their artefacts built; [] when the model is unavailable.

    The pruned form is what a user gets from graphprune's one-shot API; its MACs come from
    tracing the compact model again, so the FLOPs ratio in the table is exact. Its tuning
    starts from a copy of the dense form's database, as a user re-tunes after pruning: the
    tasks whose shapes pruning left alone are reused (the header says how many trials that saved).
    """
    import graphprune as gp

    made = make_model(name)
    if made is None:
        return []
    model, inputs = made
    out.mkdir(parents=True, exist_ok=True)
    spec = write_input_spec(out / f"{name}.inputs.json", inputs)
    g = gp.trace(copy.deepcopy(model), inputs)  # prune zeroes the traced model's weights: `model` stays dense
    dense = Variant(name, "dense", g.total_flops, spec)
    report = gp.prune(g, criterion, gp.Target(flops=flops, multiple=multiple))
    compact = g.construct_subnet()
    pruned = Variant(name, "pruned", gp.trace(compact, inputs, verify=False).total_flops, spec, pruning=repr(report))
    print(f"{name}: {report!r}; MMACs {dense.macs / 1e6:,.1f} -> {pruned.macs / 1e6:,.1f}", file=sys.stderr)
    seed, left = None, minutes
    for variant, module in ((dense, model), (pruned, compact)):
        stem = f"{name}-{variant.form}"
        # a time budget is the model's: the dense form gets its share, the pruned form what is left
        budget = None if minutes is None else max(0.1, left * dense_share if variant.form == "dense" else left)
        variant.artifacts, variant.tuning = build_artifacts(stem, module, inputs, out, runtimes, trials_per_task,
                                                            threads, seed, budget)
        if budget is not None and variant.tuning:
            left -= variant.tuning["seconds"] / 60
        seed = tuning_folder(out, stem, shared=minutes is not None)
    return [dense, pruned]


def tuning_folder(out: Path, stem: str, shared: bool = False) -> Path:
    """The tuning database of one form of one model; ``shared`` (a time-budgeted run): the one
    database every model of the run tunes into, as ``codegen.tune``'s per-machine database is."""
    return out / "tuning-shared" if shared else out / f"tuning-{stem}"


def write_input_spec(path: Path, inputs: tuple[torch.Tensor, ...]) -> str:
    """The example inputs' shapes and dtypes, so every worker feeds its runtime the same arrays."""
    from graphprune.atomic import atomic_write_text

    spec = {"shapes": [list(x.shape) for x in inputs], "dtypes": [str(x.dtype).removeprefix("torch.") for x in inputs]}
    return str(atomic_write_text(path, json.dumps(spec)))


def build_artifacts(stem: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: Path,
                    runtimes: list[str], trials_per_task: int | None, threads: int,
                    seed_db: Path | None = None, minutes: float | None = None
                    ) -> tuple[dict[str, str], dict[str, int | str] | None]:
    """One artefact per runtime for ``module``; returns runtime -> path and tvm-tuned's tuning budget.

    TVM tunes and compiles for this CPU with ``threads`` cores, the largest thread count the
    runtimes are timed with (one library serves every count: its pool size is set at run time).
    """
    from graphprune.codegen.targets import host_cpu_target

    target = host_cpu_target(threads)
    artifacts: dict[str, str] = {}
    if "torch" in runtimes:
        artifacts["torch"] = save_program(module, inputs, out / f"{stem}.pt2")
    onnx_path = out / f"{stem}.onnx"
    if {"onnxruntime", "tvm-default", "tvm-tuned"} & set(runtimes):
        import graphprune as gp

        # static shapes, as TVM compiles them: neither runtime gets a symbolic batch dimension
        gp.export_onnx(module, inputs, onnx_path, dynamic_batch=False)
    if "onnxruntime" in runtimes:
        artifacts["onnxruntime"] = str(onnx_path)
    databases: dict[str, str | None] = {"tvm-default": None}
    tuning = None
    if "tvm-tuned" in runtimes:
        work_dir = tuning_folder(out, stem, shared=minutes is not None)
        if seed_db is not None and seed_db.is_dir() and not work_dir.exists():
            from graphprune.codegen.tuning import DATABASE_FILES

            work_dir.mkdir(parents=True)
            for table in DATABASE_FILES:
                shutil.copy(seed_db / table, work_dir / table)
        databases["tvm-tuned"], tuning = tune(onnx_path, work_dir, trials_per_task, target, minutes)
    for runtime, database in databases.items():
        if runtime in runtimes:
            artifacts[runtime] = build_library(onnx_path, database, target, out / f"{stem}-{runtime}.so")
    return artifacts, tuning


def save_program(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> str:
    """``torch.export`` the module to ``path``: the compact model cannot be pickled, and the dense
    one goes the same way so both are timed as the same kind of graph."""
    from graphprune.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.export.save(torch.export.export(module, inputs), tmp)
    return str(path)


def tune(onnx_path: Path, work_dir: Path, trials_per_task: int | None, target: object,
         minutes: float | None = None) -> tuple[str, dict[str, int | str]]:
    """Tune into ``work_dir`` (a rerun resumes it), for ``minutes`` when given (then
    ``trials_per_task`` only caps a task); returns the database and the budget for the header."""
    import graphprune.codegen as codegen
    from graphprune.codegen.tuning import LIGHT_RULE

    report = codegen.tune(onnx_path, None, target, work_dir, trials_per_task=trials_per_task, minutes=minutes)
    print(report.summary(), file=sys.stderr)
    return report.work_dir, {"tasks": report.tasks_total, "trials_per_task": report.trials_per_task,
                             "trials_budget": report.trials_budget, "trials_run": report.trials_run,
                             "tasks_reused": len(report.tasks_reused), "trials_saved": report.trials_saved,
                             "seconds": round(report.seconds), "light": LIGHT_RULE,
                             "tasks_seeded": len(report.tasks_seeded), "trials_transferred": report.trials_transferred,
                             "minutes": minutes}  # recorded with the row


def build_library(onnx_path: Path, database: str | None, target: object, library: Path) -> str:
    """Compile with TVM (tuning records first, default schedules for the rest) into a shared library."""
    import graphprune.codegen as codegen

    codegen.build(onnx_path, None, target, tuning_db=database).export(library)
    return str(library)


# ----------------------------------------------------------------------------- timing
def run_worker(extra: list[str], threads: int) -> dict | list:
    command = [sys.executable, __file__, "--threads", str(threads), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=thread_env(threads))
    if result.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_interleaved(variants: list[Variant], rounds: int, number: int, thread_counts: list[int]) -> None:
    """Fill each variant's ``ms``.  Round r runs every (thread count, form, runtime) once, each in
    a fresh process, so drift on a shared machine hits every cell alike; a cell is the median over rounds."""
    samples: dict[tuple[int, str, str, str], list[float]] = defaultdict(list)
    for _ in range(rounds):
        for threads in thread_counts:
            for v in variants:
                for runtime, artifact in v.artifacts.items():
                    extra = ["--worker", runtime, "--artifact", artifact, "--inputs", v.inputs, "--number", str(number)]
                    samples[(threads, v.model, v.form, runtime)].append(run_worker(extra, threads)["ms"])
    for v in variants:
        v.ms = {str(t): {r: statistics.median(samples[(t, v.model, v.form, r)]) for r in v.artifacts}
                for t in thread_counts}


# ----------------------------------------------------------------------------- tables
def speedup_per_flops(dense: Variant, pruned: Variant, runtime: str, threads: int) -> float | None:
    """Pruned speedup over dense divided by the FLOPs ratio: 1.0 when latency fell exactly with
    FLOPs, below when overheads that pruning does not shrink dominate; None if not timed."""
    d, p = dense.ms.get(str(threads), {}), pruned.ms.get(str(threads), {})
    if runtime not in d or runtime not in p:
        return None
    return (d[runtime] / p[runtime]) / (dense.macs / pruned.macs)


def tuned_over_ort(v: Variant, threads: int) -> float | None:
    """Tuned TVM latency / onnxruntime latency on the same form (<= 1: TVM at least as fast)."""
    ms = v.ms.get(str(threads), {})
    if "tvm-tuned" not in ms or "onnxruntime" not in ms:
        return None
    return ms["tvm-tuned"] / ms["onnxruntime"]


def _cell(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def model_rows(dense: Variant, pruned: Variant, runtimes: list[str], threads: int) -> list[str]:
    """Three rows for one model: dense ms, pruned ms, and pruned speedup / FLOPs ratio per runtime."""
    rows = [f"| {v.model} | {v.form} | {v.macs / 1e6:,.1f} | "
            + " | ".join(_cell(v.ms.get(str(threads), {}).get(r)) for r in runtimes)
            + f" | {_cell(tuned_over_ort(v, threads))} |" for v in (dense, pruned)]
    ratio = dense.macs / pruned.macs
    rows.append(f"| {dense.model} | speedup / FLOPs ratio ({ratio:.2f}x) | | "
                + " | ".join(_cell(speedup_per_flops(dense, pruned, r, threads)) for r in runtimes) + " | |")
    return rows


def latency_table(pairs: list[tuple[Variant, Variant]], runtimes: list[str], threads: int, rounds: int) -> list[str]:
    """The dense/pruned table for every model at one thread count, then the issue's checks."""
    lines = ["", f"### Latency, dense and pruned, {threads} thread(s), ms (median of {rounds} interleaved rounds)", "",
             "| model | form | MMACs | " + " | ".join(runtimes) + " | tvm-tuned / onnxruntime |",
             "|---|---|---|" + "---|" * (len(runtimes) + 1)]
    for dense, pruned in pairs:
        lines += model_rows(dense, pruned, runtimes, threads)
    return lines + ["", *done_when(pairs, runtimes, threads)]


def done_when(pairs: list[tuple[Variant, Variant]], runtimes: list[str], threads: int) -> list[str]:
    """The issue's criteria against these numbers: (a) tuned TVM at least as fast as onnxruntime on
    the pruned form of every model, (b) pruned speedup >= 0.8 x the FLOPs ratio (per runtime)."""
    def models(ok: Callable[[Variant, Variant], bool]) -> str:
        hits = [d.model for d, p in pairs if ok(d, p)]
        return f"{len(hits)} of {len(pairs)} models ({', '.join(hits) or 'none'})"

    lines = []
    if "tvm-tuned" in runtimes and "onnxruntime" in runtimes:
        lines.append(f"- (a) pruned, tuned TVM <= onnxruntime: "
                     f"{models(lambda d, p: (tuned_over_ort(p, threads) or float('inf')) <= 1.0)}")
    for r in runtimes:
        lines.append(f"- (b) {r}: speedup >= {SPEEDUP_FLOOR} x FLOPs ratio on "
                     f"{models(lambda d, p: (speedup_per_flops(d, p, r, threads) or 0.0) >= SPEEDUP_FLOOR)}")
    return lines


def header(args: argparse.Namespace, variants: list[Variant]) -> list[str]:
    """The results file's header: the command line, the machine, and how every number was made."""
    from graphprune.codegen.tuning import LIGHT_TRIALS

    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "onnxruntime", "apache-tvm"))
    lines = [f"# {shlex.join(['python', *sys.argv])}",
             f"# {_cpu_name()}, {args.threads} thread(s) per runtime, one runtime per process; {versions}"]
    if args.retime:
        lines.append("# --retime: built and tuned by this command without --retime (the budget lines below), "
                     "timed again by this one")
    if variants:
        lines += [f"# cells: median over {args.rounds} interleaved rounds of a per-process median of "
                  f"{args.number} runs",
                  f"# pruned: gp.prune(g, {args.criterion!r}, Target(flops={args.flops}, multiple={args.multiple})) "
                  "on random weights, "
                  "then construct_subnet(); MMACs: gp.trace(...).total_flops",
                  "# torch: the torch.export program run eagerly; onnxruntime: gp.export_onnx (static shapes); "
                  "TVM: graphprune.codegen.build of that same ONNX file for this CPU"]
        cores = max(args.thread_counts)
        if not any(v.tuning for v in variants):
            tuned = "not run (--trials-per-task 0 or not in --runtimes)"
        elif args.tune_minutes:
            tuned = (f"meta-schedule for at most {args.tune_minutes:g} minutes per model (dense form "
                     f"{args.dense_share:.0%}, pruned form the rest), every model tuning into one database shared "
                     "across the run and empty at "
                     f"its start; tuned for {cores} core(s), one library timed at every thread count")
        else:
            tuned = (f"meta-schedule, {args.trials_per_task} trials per task in this run (each budget line gives "
                     f"its row's; at most {LIGHT_TRIALS} for light tasks), tuned for {cores} core(s); "
                     "pruned starts from a copy of the dense database")
        lines.append(f"# tvm-tuned: {tuned}")
        lines += [f"# tvm-tuned budget, {v.model} {v.form}: {_budget(t)}" for v in variants if (t := v.tuning)]
    return lines


def _budget(t: dict) -> str:
    """One tuning run's budget and what it spent, for the header."""
    if t.get("minutes"):
        spent = f"{t['trials_run']} trials in {t['seconds']} s of a {t['minutes'] * 60:.0f} s budget"
    else:
        spent = (f"{t['trials_per_task']} trials per task, {t['trials_budget']} in all ({t['trials_run']} run in "
                 f"{t['seconds']} s)")
    carried = (f"; {t['tasks_seeded']} tasks seeded with {t['trials_transferred']} schedules carried over from "
               f"tuned functions of other extents (measured, besides the trials run)" if "tasks_seeded" in t else "")
    return (f"{t['tasks']} tasks, {spent}; {t['tasks_reused']} tasks reused, {t['trials_saved']} trials taken from "
            f"the database{carried}; light: {t.get('light', EARLIER_LIGHT_RULE)}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bsr_tables(args: argparse.Namespace, out: Path) -> tuple[list[str], list[dict], list[dict]]:
    """The two BSR tables (each from one TVM-only process) and their rows."""
    trials = args.trials_per_task or 16  # a timed run's tables tune their one layer by trials
    bsr_args = ["--worker", "bsr", "--out", str(out), "--trials-per-task", str(trials)]
    db_args = ["--tuning-db", args.tuning_db] if args.tuning_db else []
    threads = args.thread_counts[0]
    bsr = run_worker(bsr_args + db_args, threads)
    bsr_model = run_worker(["--worker", "bsr-model"] + bsr_args[2:] + db_args, threads)
    dense = "tuned dense" if trials > 0 or args.tuning_db else "default dense"
    lines = ["", f"### BSR 512x512 linear vs {dense}, {threads} thread(s), ms", "",
             "| sparsity | block | batch | dense | BSR | form | chosen |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['block']} | {r['batch']} | {r['dense_ms']:.4f} | {r['bsr_ms']:.4f} "
              f"| {r['form']} | {r['chosen']} |" for r in bsr]
    lines += ["", f"### BSR whole model: MLP 512-2048-512, 16x1 blocks, {dense} vs sparse=\"auto\", "
                  f"{threads} thread(s), ms", "",
              "| sparsity | batch | dense | sparse build | BSR layers |", "|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} "
              f"| {r['bsr_layers']} |" for r in bsr_model]
    return lines, bsr, bsr_model


def reuse_table(args: argparse.Namespace, out: Path) -> tuple[list[str], list[dict]]:
    """The second model, of another family, compiled after the table's models: tuned twice with
    the same trials per task, once into a copy of the run's shared database and once into an
    empty one, so the time the shared database saves is measured, not estimated; both builds
    and onnxruntime are then timed like the table's cells."""
    import graphprune as gp
    from graphprune.codegen.targets import host_cpu_target
    from graphprune.codegen.tuning import DATABASE_FILES

    name = args.reuse_model
    made = make_model(name)
    if made is None:
        return [f"# reuse: {name} skipped (its library is not installed)"], []
    model, inputs = made
    spec = write_input_spec(out / f"{name}.inputs.json", inputs)
    onnx_path = out / f"{name}-reuse.onnx"
    gp.export_onnx(model, inputs, onnx_path, dynamic_batch=False)
    target = host_cpu_target(max(args.thread_counts))
    shared = tuning_folder(out, "", shared=True)
    variants = []
    for kind in ("shared", "empty"):
        work_dir = out / f"tuning-{name}-{kind}"
        shutil.rmtree(work_dir, ignore_errors=True)
        if kind == "shared":
            work_dir.mkdir(parents=True)
            for table in DATABASE_FILES:
                shutil.copy(shared / table, work_dir / table)
        database, tuning = tune(onnx_path, work_dir, args.reuse_trials, target)
        library = build_library(onnx_path, database, target, out / f"{name}-{kind}-tvm-tuned.so")
        artifacts = {"tvm-tuned": library, **({"onnxruntime": str(onnx_path)} if kind == "shared" else {})}
        variants.append(Variant(name, f"{kind} database", 0.0, spec, artifacts, tuning))
    time_interleaved(variants, args.rounds, args.number, args.thread_counts)
    return reuse_lines(args, variants), [asdict(v) for v in variants]


def reuse_lines(args: argparse.Namespace, variants: list[Variant]) -> list[str]:
    """The reuse table: the shared-database build, then the empty-database one."""
    name, counts, rows = variants[0].model, args.thread_counts, [v.tuning for v in variants]
    lines = ["", f"### Reuse: {name} (timm) compiled after {args.models.replace(',', ', ')}, "
                 f"{args.reuse_trials} trials per task, ms (median of {args.rounds} interleaved rounds)", "",
             "| database | tasks | reused | trials run | tuning s | "
             + " | ".join(f"tvm-tuned {t} thr | onnxruntime {t} thr" for t in counts) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(counts)]
    ort = {t: variants[0].ms[str(t)].get("onnxruntime") for t in counts}
    for v in variants:
        t = v.tuning
        lines.append(f"| {v.form} | {t['tasks']} | {t['tasks_reused']} | {t['trials_run']} | {t['seconds']} | "
                     + " | ".join(f"{_cell(v.ms[str(n)]['tvm-tuned'])} | {_cell(ort[n])}" for n in counts) + " |")
    saved, empty = rows[1]["seconds"] - rows[0]["seconds"], rows[1]["seconds"]
    lines += ["", f"- shared database: {rows[0]['tasks_reused']} of {rows[0]['tasks']} tasks reused, tuning "
                  f"{rows[0]['seconds']} s instead of {empty} s: {saved} s saved ({saved / max(empty, 1):.0%})"]
    return lines


def retime(args: argparse.Namespace, out: Path, runtimes: list[str]) -> str:
    """``--retime``: time the artefacts an earlier run of the same command built (``<out>/latency.json``)
    again, every model and the reuse table's builds interleaved in each round, and rewrite the tables:
    building and tuning need no quiet machine, timing does."""
    saved = json.loads((out / "latency.json").read_text())
    variants = [Variant(**v) for v in saved["models"]]
    reused = [Variant(**v) for v in saved.get("reuse", [])]
    time_interleaved(variants + reused, args.rounds, args.number, args.thread_counts)
    pairs = in_model_order(list(zip(variants[::2], variants[1::2])))
    return write_results(args, out, pairs, runtimes, reuse_lines=reuse_lines(args, reused) if reused else (),
                         reuse=[asdict(v) for v in reused])


# ----------------------------------------------------------------------------- driver
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated subset of " + ",".join(RUNTIMES))
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of FLOPs the pruned form removes")
    parser.add_argument("--multiple", type=int, default=None,
                        help="kept widths rounded to this multiple (default: this CPU's float32 vector "
                             "lanes, 16 with AVX-512; 1: any width)")
    parser.add_argument("--criterion", default="l2", help="gp.prune criterion (data-free: l1, l2, obspa)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each timed")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=5, help="runs per worker process")
    parser.add_argument("--trials-per-task", type=int, default=None,
                        help="default 16; 0: no tuning, no tvm-tuned column; with --tune-minutes: a per-task cap "
                             "(default none)")
    parser.add_argument("--tune-minutes", type=float, default=None,
                        help="tuning budget per model in minutes (see --dense-share), "
                             "every model tuning into one database shared across the run; --trials-per-task "
                             "then caps a task")
    parser.add_argument("--dense-share", type=float, default=0.5,
                        help="with --tune-minutes: the dense form's share of a model's budget (the pruned form, "
                             "what users run, gets the rest and the dense form's schedules carried over)")
    parser.add_argument("--out", default="runs/latency", help="artefacts, tuning databases and latency.json")
    parser.add_argument("--results", default=str(RESULTS), help="the tables, with the command in the header")
    parser.add_argument("--tuning-db", default=None, help="BSR table: dense kernel from this database")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of <out>/latency.json for models not in --models (the header "
                             "names the run each row is from)")
    parser.add_argument("--reuse-model", default=None,
                        help="after the models, a model of another family (deit_tiny) tuned with --reuse-trials "
                             "per task into a copy of the run's shared database and into an empty one")
    parser.add_argument("--reuse-trials", type=int, default=16)
    parser.add_argument("--retime", action="store_true",
                        help="time again what an earlier run of this command built in --out, without building")
    parser.add_argument("--bsr-only", action="store_true")
    parser.add_argument("--no-bsr", action="store_true")
    parser.add_argument("--worker", choices=RUNTIMES + ["bsr", "bsr-model"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    if args.trials_per_task is None and not args.tune_minutes:
        args.trials_per_task = 16
    if args.multiple is None:
        from graphprune.codegen.targets import host_cpu_target, vector_lanes

        args.multiple = vector_lanes(host_cpu_target(max(args.thread_counts)))
    unknown = set(args.runtimes.split(",")) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUNTIMES)}")
    return args


def selected_runtimes(args: argparse.Namespace) -> list[str]:
    """The runtimes asked for, in table order; tvm-tuned only with a tuning budget."""
    asked = set(args.runtimes.split(","))
    if "tvm-tuned" in asked and args.trials_per_task is not None and args.trials_per_task <= 0:
        print("--trials-per-task 0: no tvm-tuned column", file=sys.stderr)
        asked.discard("tvm-tuned")
    return [r for r in RUNTIMES if r in asked]


def measure_models(args: argparse.Namespace, out: Path, runtimes: list[str],
                   kept: Sequence[tuple[Variant, Variant]] = (), runs: Sequence[dict] = ()
                   ) -> list[tuple[Variant, Variant]]:
    """(dense, pruned) for every model, artefacts built and timed, after the ``kept`` rows of an
    earlier run (``--merge``); the tables so far are written after each model, so a run stopped
    half-way keeps what it measured."""
    pairs = list(kept)
    for name in args.models.split(","):
        variants = prepare(name, out, runtimes, args.trials_per_task, args.flops, args.criterion, args.multiple,
                           max(args.thread_counts), args.tune_minutes, args.dense_share)
        if not variants:
            print(f"{name}: skipped (transformers not installed)", file=sys.stderr)
            continue
        time_interleaved(variants, args.rounds, args.number, args.thread_counts)
        print(name, json.dumps({v.form: v.ms for v in variants}), file=sys.stderr)
        pairs.append((variants[0], variants[1]))
        write_results(args, out, in_model_order(pairs), runtimes, runs=runs)
    return in_model_order(pairs)


def in_model_order(pairs: list[tuple[Variant, Variant]]) -> list[tuple[Variant, Variant]]:
    order = {name: i for i, name in enumerate(MODELS)}
    return sorted(pairs, key=lambda pair: order.get(pair[0].model, len(order)))


def earlier_rows(out: Path, remeasured: set[str]) -> tuple[list[tuple[Variant, Variant]], list[dict]]:
    """``--merge``: the rows of ``<out>/latency.json`` for models this run does not re-measure,
    and the runs (command, models) that measured them, so the header says where each row is from."""
    path = out / "latency.json"
    if not path.exists():
        return [], []
    saved = json.loads(path.read_text())
    variants = [Variant(**v) for v in saved["models"] if v["model"] not in remeasured]
    if isinstance(saved.get("threads", 1), int):  # written before runs timed several thread counts
        for v in variants:
            v.ms = {str(saved.get("threads", 1)): v.ms}
    command = saved["command"]  # sys.argv in files written before runs were recorded
    command = command if isinstance(command, str) else shlex.join(["python", *command])
    runs = saved.get("runs") or [{"command": command, "models": sorted({v["model"] for v in saved["models"]})}]
    runs = [{"command": r["command"], "models": [m for m in r["models"] if m not in remeasured]} for r in runs]
    return list(zip(variants[::2], variants[1::2])), [r for r in runs if r["models"]]


def write_results(args: argparse.Namespace, out: Path, pairs: list[tuple[Variant, Variant]], runtimes: list[str],
                  bsr_lines: Sequence[str] = (), bsr: Sequence[dict] = (), bsr_model: Sequence[dict] = (),
                  runs: Sequence[dict] = (), reuse_lines: Sequence[str] = (), reuse: Sequence[dict] = ()) -> str:
    """The tables to ``--results`` and the numbers to ``<out>/latency.json``, each atomically;
    ``runs``: the earlier runs whose rows ``--merge`` kept."""
    from graphprune.atomic import atomic_write_text

    lines = [line for t in args.thread_counts for line in latency_table(pairs, runtimes, t, args.rounds)] if pairs else []
    variants = [v for pair in pairs for v in pair]
    this_run = {"command": shlex.join(["python", *sys.argv]), "models": args.models.split(",")}
    runs = [*runs, this_run]
    provenance = [f"# rows for {', '.join(r['models'])} from an earlier run: {r['command']}" for r in runs[:-1]]
    text = "\n".join(header(args, variants) + provenance + lines + list(reuse_lines) + list(bsr_lines)) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, text)
    atomic_write_text(out / "latency.json", json.dumps({"command": sys.argv, "runs": runs, "threads": args.thread_counts,
                                                         "models": [asdict(v) for v in variants], "bsr": list(bsr),
                                                         "bsr_model": list(bsr_model), "reuse": list(reuse)},
                                                        indent=1))
    return text


def main() -> None:
    args = parse_args()
    if args.worker == "bsr":
        return bsr_worker(args)
    if args.worker == "bsr-model":
        return bsr_model_worker(args)
    if args.worker:
        return worker(args)

    # tuning measures in this process's children: at the largest thread count, the one it tunes for
    os.environ["TVM_NUM_THREADS"] = str(max(args.thread_counts))
    out, runtimes = Path(args.out), selected_runtimes(args)
    if args.retime:
        return print("\n" + retime(args, out, runtimes))
    kept, runs = earlier_rows(out, set(args.models.split(","))) if args.merge else ([], [])
    pairs = [] if args.bsr_only else measure_models(args, out, runtimes, kept, runs)
    reuse_lines, reuse = reuse_table(args, out) if args.reuse_model and not args.bsr_only else ([], [])
    bsr_lines, bsr, bsr_model = ([], [], []) if args.no_bsr else bsr_tables(args, out)
    text = write_results(args, out, pairs, runtimes, bsr_lines, bsr, bsr_model, runs, reuse_lines, reuse)
    # meta-schedule prints its task tables to stdout while tuning: the tables also go to a file
    print("\n" + text)


if __name__ == "__main__":
    main()
