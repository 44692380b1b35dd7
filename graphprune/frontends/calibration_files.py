"""Calibration inputs for an ONNX model from files: ``.npz``, ``.npy`` or a folder of them.

A user pruning a pretrained ONNX file from the shell has some unlabeled inputs saved as
arrays: one ``.npy`` (a model with one input), an ``.npz`` keyed by input name (any model;
a single unnamed array ``arr_0`` is taken for a one-input model), or a folder of such files,
concatenated along the batch axis in file-name order; or, for an image model with one input,
a folder of images read with a :class:`Preprocess` (``size``, ``mean``, ``std`` as the model
was trained with).  Each input's arrays are checked
against the graph's declared inputs (names, rank, static dims, dtype) by
:func:`~graphprune.frontends.onnx_inputs.input_feeds`, so a wrong file fails here with the
input named, not inside a layer later.

The samples are cut into equal batches (the largest size up to ``batch`` that divides
their number): the traced graph runs in torch at the size it was traced at, so every
batch, and the example the model is traced with, has one shape.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
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


IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: resized to ``size`` (height, width), scaled to
    [0, 1], ``(x - mean) / std`` per channel, channels first.  One mean/std value means a
    grayscale model (one channel)."""

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def parse(cls, text: str) -> "Preprocess":
        """``"size=224x224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"`` (a value runs to the next ``key=``)."""
        fields: dict[str, list[str]] = {}
        key = None
        for token in (t.strip() for t in text.split(",")):
            if "=" in token:
                key, token = token.split("=", 1)
                if key not in ("size", "mean", "std") or key in fields:
                    raise ValueError(f"{text!r}: unknown or repeated key {key!r} (use size=HxW, mean=.., std=..)")
                fields[key] = []
            if key is None or not token:
                raise ValueError(f"{text!r}: write size=HxW,mean=M1,M2,M3,std=S1,S2,S3")
            fields[key].append(token)
        if "size" not in fields or len(fields["size"]) != 1:
            raise ValueError(f"{text!r}: give the input size as size=HxW")
        try:
            h, w = (int(d) for d in fields["size"][0].lower().split("x"))
            n = len(fields.get("mean") or fields.get("std") or "rgb")
            mean = tuple(float(v) for v in fields.get("mean", ["0"] * n))
            std = tuple(float(v) for v in fields.get("std", ["1"] * n))
        except ValueError:
            raise ValueError(f"{text!r}: size is HxW in pixels, mean and std are numbers") from None
        if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"{text!r}: mean and std need 1 (gray) or 3 (RGB) values each, std > 0")
        return cls((h, w), mean, std)

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if len(self.mean) == 1 else "RGB").resize(self.size[::-1], Image.BILINEAR)
            x = np.asarray(im, dtype=np.float32) / 255.0
        x = x[..., None] if x.ndim == 2 else x
        return ((x - np.float32(self.mean)) / np.float32(self.std)).transpose(2, 0, 1)


def _images(path: Path, names: list[str], preprocess: Preprocess | None) -> dict[str, np.ndarray] | None:
    """A folder of images as one input's array; None when the folder holds no images."""
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGES) if path.is_dir() else []
    if not found:
        return None
    if preprocess is None:
        raise BadOnnxError(f"the calibration folder {path} holds images, and no --preprocess says how to read them",
                           source=str(path), hint="--preprocess size=224x224,mean=0.485,0.456,0.406,"
                                                  "std=0.229,0.224,0.225 (as the model was trained)")
    if len(names) != 1:
        raise ShapeMismatchError(f"images feed a model with one input; this one has {len(names)} "
                                 f"({', '.join(names)})", source=str(path), hint="give an .npz keyed by input name")
    return {names[0]: np.stack([preprocess(p) for p in found])}


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
                     source: str = "<ModelProto>", preprocess: Preprocess | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration batches (dicts by input name, equal shapes) for ``model`` from ``path``."""
    names = [vi.name for vi in graph_inputs(model)]
    images = _images(Path(path), names, preprocess)
    parts = [images] if images is not None else [_read(p, names) for p in _files(Path(path))]
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
