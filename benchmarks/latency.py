"""Inference latency: torch eager vs onnxruntime vs TVM (default schedules) vs TVM (tuned), and BSR.

Not run in CI (tuning takes minutes per model).  ``python benchmarks/latency.py
[--models resnet18,mobilenet_v2,vit,bert] [--threads 1] [--rounds 7] [--trials-per-task 16]
[--out runs/latency] [--bsr-only | --no-bsr]``

Each measurement runs in its own subprocess with one runtime and explicit thread counts
(OMP/MKL/torch/ORT/``TVM_NUM_THREADS``): two thread pools in one process distort the
numbers. Rounds are interleaved (round r runs every runtime once) and each cell is the
median over rounds of a per-process median, so a busy neighbour hits all runtimes alike.
TVM models are compiled once into shared libraries that the workers load. The BSR table
times a 512x512 linear layer at 80%/90% block sparsity, batch 1 and 128, against the dense
kernel graphprune builds (tuned with the same trials per task, or from ``--tuning-db``).
The whole-model BSR table builds an MLP 512-2048-512 with 80%/90% of its 16x1 weight blocks
zero, at batch 1 and 128, once dense (tuned) and once with ``sparse="auto"`` on the same
tuning records, so a layer BSR does not win keeps the tuned dense kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ["resnet18", "mobilenet_v2", "vit", "bert"]
RUNTIMES = ["torch", "onnxruntime", "tvm-default", "tvm-tuned"]


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
    raise ValueError(name)


def thread_env(threads: int) -> dict[str, str]:
    names = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"]
    return dict(os.environ, **{n: str(threads) for n in names})


# ----------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> None:
    """Time one runtime on one artefact; print {"ms": median} as the last line."""
    runs = []
    if args.worker == "torch":
        torch.set_num_threads(args.threads)
        model, inputs = make_model(args.model)
        with torch.no_grad():
            call = lambda: model(*inputs)  # noqa: E731
            call()
            runs = _time(call, args.number)
    elif args.worker == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(args.artifact, options, providers=["CPUExecutionProvider"])
        feeds = {i.name: _example(i.shape, i.type) for i in session.get_inputs()}
        session.run(None, feeds)
        runs = _time(lambda: session.run(None, feeds), args.number)
    else:
        import tvm
        from tvm import relax

        spec = json.loads(Path(args.artifact + ".json").read_text())
        vm = relax.VirtualMachine(tvm.runtime.load_module(args.artifact), tvm.cpu())
        inputs = [tvm.runtime.tensor(_example(s, d)) for s, d in zip(spec["shapes"], spec["dtypes"])]
        vm["main"](*inputs)
        runs = _time(lambda: vm["main"](*inputs), args.number)
    print(json.dumps({"ms": statistics.median(runs)}))


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
    from graphprune.codegen.sparse import choose_linear_kernel

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


# ----------------------------------------------------------------------------- driver
def prepare(name: str, out: Path, trials_per_task: int) -> dict[str, str]:
    """Export ONNX and TVM libraries for one model; returns runtime -> artefact path."""
    import graphprune.codegen as codegen

    made = make_model(name)
    if made is None:
        return {}
    model, inputs = made
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {"torch": ""}
    onnx_path = out / f"{name}.onnx"
    torch.onnx.export(model, inputs, str(onnx_path), dynamo=False, opset_version=17)
    artifacts["onnxruntime"] = str(onnx_path)
    variants = {"tvm-default": None}
    if trials_per_task > 0:
        report = codegen.tune(model, inputs, "x86", out / f"tuning-{name}", trials_per_task=trials_per_task)
        print(report.summary(), file=sys.stderr)
        variants["tvm-tuned"] = report.work_dir
    for runtime, database in variants.items():
        compiled = codegen.build(model, inputs, "x86", tuning_db=database)
        library = out / f"{name}-{runtime}.so"
        compiled.export(library)
        spec = {"shapes": compiled.program.input_shapes, "dtypes": compiled.program.input_dtypes}
        Path(str(library) + ".json").write_text(json.dumps(spec))
        artifacts[runtime] = str(library)
    return artifacts


def run_worker(extra: list[str], threads: int) -> dict | list:
    command = [sys.executable, __file__, "--threads", str(threads), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=thread_env(threads))
    if result.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=5, help="runs per worker process")
    parser.add_argument("--trials-per-task", type=int, default=16)
    parser.add_argument("--out", default="runs/latency")
    parser.add_argument("--tuning-db", default=None, help="BSR table: dense kernel from this database")
    parser.add_argument("--bsr-only", action="store_true")
    parser.add_argument("--no-bsr", action="store_true")
    parser.add_argument("--worker", choices=RUNTIMES + ["bsr", "bsr-model"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "bsr":
        return bsr_worker(args)
    if args.worker == "bsr-model":
        return bsr_model_worker(args)
    if args.worker:
        return worker(args)

    out, results, lines = Path(args.out), {}, []
    if not args.bsr_only:
        for name in args.models.split(","):
            artifacts = prepare(name, out, args.trials_per_task)
            if not artifacts:
                print(f"{name}: skipped (transformers not installed)", file=sys.stderr)
                continue
            samples: dict[str, list[float]] = {r: [] for r in artifacts}
            for _ in range(args.rounds):
                for runtime, artifact in artifacts.items():
                    extra = ["--worker", runtime, "--model", name, "--artifact", artifact, "--number", str(args.number)]
                    samples[runtime].append(run_worker(extra, args.threads)["ms"])
            results[name] = {r: statistics.median(v) for r, v in samples.items()}
            print(name, json.dumps(results[name]), file=sys.stderr)
        lines += [f"### Latency, {args.threads} thread(s), ms (median of {args.rounds} interleaved rounds)", "",
                  "| model | " + " | ".join(RUNTIMES) + " |", "|---|" + "---|" * len(RUNTIMES)]
        lines += [f"| {name} | " + " | ".join(f"{row[r]:.2f}" if r in row else "n/a" for r in RUNTIMES) + " |"
                  for name, row in results.items()]
    bsr_args = ["--worker", "bsr", "--out", str(out), "--trials-per-task", str(args.trials_per_task)]
    db_args = ["--tuning-db", args.tuning_db] if args.tuning_db else []
    bsr = [] if args.no_bsr else run_worker(bsr_args + db_args, args.threads)
    bsr_model = [] if args.no_bsr else run_worker(["--worker", "bsr-model"] + bsr_args[2:] + db_args, args.threads)
    if bsr:
        dense = "tuned dense" if args.trials_per_task > 0 or args.tuning_db else "default dense"
        lines += ["", f"### BSR 512x512 linear vs {dense}, {args.threads} thread(s), ms", "",
                  "| sparsity | block | batch | dense | BSR | form | chosen |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['sparsity']:.0%} | {r['block']} | {r['batch']} | {r['dense_ms']:.4f} | {r['bsr_ms']:.4f} "
                  f"| {r['form']} | {r['chosen']} |" for r in bsr]
    if bsr_model:
        dense = "tuned dense" if args.trials_per_task > 0 or args.tuning_db else "default dense"
        lines += ["", f"### BSR whole model: MLP 512-2048-512, 16x1 blocks, {dense} vs sparse=\"auto\", "
                      f"{args.threads} thread(s), ms", "",
                  "| sparsity | batch | dense | sparse build | BSR layers |", "|---|---|---|---|---|"]
        lines += [f"| {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} "
                  f"| {r['bsr_layers']} |" for r in bsr_model]
    # meta-schedule prints its task tables to stdout while tuning: the tables also go to a file
    print("\n" + "\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    from graphprune.atomic import atomic_write_text

    atomic_write_text(out / "latency.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "latency.json", json.dumps({"threads": args.threads, "models": results, "bsr": bsr,
                                                              "bsr_model": bsr_model}, indent=1))


if __name__ == "__main__":
    main()
