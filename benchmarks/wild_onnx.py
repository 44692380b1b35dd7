"""Real ONNX files from PyPI packages, pruned: what a user with an exporter's file gets.

Not run in CI, and the files are not committed.  Fetch the packages into a scratch
folder (never into a venv the project uses) and point this script at it::

    pip download --no-deps -d /tmp/wild rapidocr-onnxruntime
    cd /tmp/wild && unzip -o -q rapidocr_onnxruntime-*.whl -d rapidocr
    python benchmarks/wild_onnx.py /tmp/wild [--out benchmarks/results/wild_onnx.txt]

Every ``*.onnx`` under the folder is traced at a first size of its inputs (a synthetic page of text, :func:`page`; the logits before a final
Sigmoid/Softmax are an output too, :func:`with_logits`) (each dynamic
dim set from ``SIZES`` by the file's name, the batch 1), one-shot pruned (OBSPA, half
the FLOPs), and the compact model is compared with the full model whose pruned groups
are zeroed (and OBSPA's compensation applied) at that size and at a second one (another
batch and, where dynamic, other heights/widths), both run by onnxruntime.  The table
gives per file: where the weights are (initializers / Constant nodes), the groups, the
share of the parameters in them, the parameters and MACs after pruning, and the largest
relative error at each size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from graphprune.rel_error import max_rel_error

# (first size, second size) of the non-batch dims of one input, by a word in the file name:
# PP-OCR detection (sides multiple of 32), recognition (height 48) and direction classifier
SIZES = {"det": ((1, 3, 64, 96), (2, 3, 96, 128)), "rec": ((1, 3, 48, 160), (2, 3, 48, 320)),
         "cls": ((1, 3, 48, 192), (2, 3, 48, 96))}


def sizes_for(path: Path, model: onnx.ModelProto) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two input shapes for the file: from ``SIZES`` by its name, else the static dims
    with the batch 1 then 2 (a file with other dynamic dims needs an entry)."""
    for word, shapes in SIZES.items():
        if f"_{word}" in path.stem:
            return shapes
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if any(d.dim_value <= 0 for d in dims[1:]):
        sys.exit(f"{path}: dynamic dims beyond the batch and no SIZES entry for it")
    rest = tuple(d.dim_value for d in dims[1:])
    return (1, *rest), (2, *rest)


def page(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A synthetic page of text: rows of dark strokes on a light background, normalised to
    [-1, 1] as PP-OCR's preprocessing does.  On noise the detector outputs zeros almost
    everywhere (max 3e-6), which would hide any difference; on this, probabilities span 0-1."""
    b, c, h, w = shape
    img = np.ones((b, h, w), np.float32)
    for k in range(b):
        for r in range(4, h - 12, 16):
            col = 4
            while col < w - 8:
                cw = int(rng.integers(3, 8))
                img[k, r:r + 10, col:col + cw] = rng.uniform(0, 0.3) * (rng.random((10, cw)) < 0.7)
                col += cw + int(rng.integers(1, 4))
    return ((img[:, None].repeat(c, 1) - 0.5) / 0.5).astype(np.float32)


def with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the input of a final Sigmoid or Softmax as one more output: data-free
    pruning of a pretrained model without fine-tuning saturates its probabilities (the
    detector's are then 0 everywhere), which would hide any difference; the logits do not."""
    last = {o: n for n in model.graph.node for o in n.output}.get(model.graph.output[0].name)
    if last is not None and last.op_type in ("Sigmoid", "Softmax"):
        logits = model.graph.output.add()
        logits.CopyFrom(model.graph.output[0])  # both keep their input's shape and type
        logits.name = last.input[0]
    return model


def check(path: Path) -> dict[str, object]:
    """Trace, prune, and compare compact and zeroed at two sizes (see the module docstring)."""
    model = with_logits(onnx.load(path))
    inits = sum(1 for i in model.graph.initializer if len(i.dims))
    consts = sum(1 for n in model.graph.node if n.op_type == "Constant"
                 and any(a.name == "value" and len(a.t.dims) for a in n.attribute))
    first, second = sizes_for(path, model)
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    feeds = [{name: page(s, rng)} for s in (first, second)]
    start = time.perf_counter()
    g = gp.trace(model, (feeds[0][name],), verify=False)
    row: dict[str, object] = {"file": path.name, "weights": f"{inits}/{consts}", "groups": len(g.groups),
                              "in_groups": g.grouped_params / max(g.total_params, 1), "params": g.total_params}
    if not g.groups:
        return {**row, "note": g.summary().splitlines()[0]}
    gp.prune(g, "obspa", gp.Target(flops=0.5))
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    with tempfile.TemporaryDirectory() as work:  # the compact file as a user gets it, then read back
        out = os.path.join(work, "compact.onnx")
        onnx.save(compact, out)
        compact = onnx.load(out)
    n_after = sum(int(np.prod(i.dims)) for i in compact.graph.initializer) + sum(
        int(np.prod(a.t.dims)) for n in compact.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value")
    refs = [run_onnx(full, f) for f in feeds]
    errors = [max_rel_error(r, run_onnx(compact, f)) for r, f in zip(refs, feeds)]
    return {**row, "params_after": n_after, "err1": errors[0], "err2": errors[1],
            "spread": min(float(r[-1].std()) for r in refs),
            "sizes": f"{'x'.join(map(str, first))}, {'x'.join(map(str, second))}",
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder searched for *.onnx files")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    lines = [f"# python benchmarks/wild_onnx.py {args.folder}" + (f" --out {args.out}" if args.out else ""),
             "# weights = float initializers/Constant nodes; in groups = share of parameters in groups; "
             "err = max relative error compact vs zeroed at the two sizes (onnxruntime); out std = the smaller "
             "std of the zeroed model's last output (logits, see with_logits) at the two sizes: non-trivial",
             f"{'file':40} {'weights':>8} {'groups':>6} {'in groups':>9} {'params':>10} {'after':>10} "
             f"{'err size 1':>10} {'err size 2':>10} {'out std':>8}  sizes"]
    print("\n".join(lines), flush=True)
    for path in sorted(Path(args.folder).rglob("*.onnx")):
        try:
            r = check(path)
        except Exception as exc:  # a benchmark row, not a crash: the table says what failed
            lines.append(f"{path.name:40} FAILED {type(exc).__name__}: {str(exc)[:200]}")
            print(lines[-1], flush=True)
            continue
        if "note" in r:
            lines.append(f"{r['file']:40} {r['weights']:>8} {r['groups']:>6}  {r['note']}")
        else:
            lines.append(f"{r['file']:40} {r['weights']:>8} {r['groups']:>6} {r['in_groups']:>9.1%} "
                         f"{r['params']:>10,} {r['params_after']:>10,} {r['err1']:>10.1e} {r['err2']:>10.1e} {r['spread']:>8.3f}  "
                         f"{r['sizes']}")
        print(lines[-1], flush=True)
    if args.out:
        tmp = f"{args.out}.tmp"
        Path(tmp).write_text("\n".join(lines) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
