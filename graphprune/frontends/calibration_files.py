"""Calibration inputs for an ONNX model from files: ``.npz``, ``.npy`` or a folder of them.

A user pruning a pretrained ONNX file from the shell has some unlabeled inputs saved as
arrays: one ``.npy`` (a model with one input), an ``.npz`` keyed by input name (any model;
a single unnamed array ``arr_0`` is taken for a one-input model), or a folder of such files,
concatenated along the batch axis in file-name order.  Each input's arrays are checked
against the graph's declared inputs (names, rank, static dims, dtype) by
:func:`~graphprune.frontends.onnx_inputs.input_feeds`, so a wrong file fails here with the
input named, not inside a layer later.

The samples are cut into equal batches (the largest size up to ``batch`` that divides
their number): the traced graph runs in torch at the size it was traced at, so every
batch, and the example the model is traced with, has one shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..errors import BadOnnxError, ShapeMismatchError
from .onnx_inputs import graph_inputs, input_feeds, load_npz


def _read(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        if len(names) != 1:
            raise ShapeMismatchError(f"{path.name} holds one array, but the model has {len(names)} inputs "
                                     f"({', '.join(names)})", source=str(path),
                                     hint="save an .npz keyed by input name: numpy.savez(path, NAME=array, ...)")
        try:
            return {names[0]: np.load(path, allow_pickle=False)}
        except Exception as exc:
            raise BadOnnxError(f"cannot read the calibration file: {type(exc).__name__}: {str(exc)[:200]}",
                               source=str(path), hint="give an array written by numpy.save") from exc
    arrays = load_npz(path)
    if len(names) == 1 and names[0] not in arrays and list(arrays) == ["arr_0"]:
        return {names[0]: arrays["arr_0"]}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise ShapeMismatchError(f"{path.name} has an array {unknown[0]!r}, but the model has no such input",
                                 node=unknown[0], source=str(path), hint=f"its inputs are: {', '.join(names)}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ShapeMismatchError(f"{path.name} has no array for input {missing[0]!r}", node=missing[0],
                                 source=str(path), hint=f"key the arrays by input name: {', '.join(names)}")
    return arrays


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not found:
            raise BadOnnxError(f"no .npz or .npy files in the calibration folder {path}", source=str(path),
                               hint="save the inputs with numpy.save / numpy.savez")
        return found
    if not path.is_file():
        raise BadOnnxError(f"no such calibration file or folder: {path}", source=str(path),
                           hint="give an .npz/.npy of model inputs or a folder of them")
    if path.suffix not in (".npz", ".npy"):
        raise BadOnnxError(f"calibration inputs must be .npz or .npy files, not {path.suffix or 'no suffix'}",
                           source=str(path), hint="save the inputs with numpy.save / numpy.savez")
    return [path]


def _batch_size(n: int, most: int) -> int:
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto, *, batch: int = 32,
                     source: str = "<ModelProto>") -> list[dict[str, np.ndarray]]:
    """Calibration batches (dicts by input name, equal shapes) for ``model`` from ``path``."""
    names = [vi.name for vi in graph_inputs(model)]
    parts = [_read(p, names) for p in _files(Path(path))]
    arrays = {}
    for n in names:
        pieces = [p[n] for p in parts]
        if any(a.ndim == 0 for a in pieces):
            raise ShapeMismatchError(f"the calibration array for input {n!r} is a scalar", node=n, source=str(path),
                                     hint="give arrays with the batch as axis 0")
        try:
            arrays[n] = np.concatenate(pieces, axis=0)
        except ValueError as exc:
            raise ShapeMismatchError(f"the calibration files disagree on the shape of input {n!r}: "
                                     + ", ".join("x".join(map(str, a.shape)) for a in pieces),
                                     node=n, source=str(path), hint="give every sample the same shape") from exc
    counts = {n: a.shape[0] for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ShapeMismatchError("the calibration inputs have different numbers of samples: "
                                 + ", ".join(f"{n} {c}" for n, c in counts.items()), source=str(path),
                                 hint="give the same number of samples (axis 0) for every input")
    total = next(iter(counts.values()))
    if total == 0:
        raise ShapeMismatchError("the calibration inputs hold no samples", source=str(path))
    size = _batch_size(total, batch)
    batches = [{n: a[i:i + size] for n, a in arrays.items()} for i in range(0, total, size)]
    input_feeds(model, arrays=batches[0], source=f"{source} (calibration {path})")  # names, ranks, static dims, dtypes
    return batches
