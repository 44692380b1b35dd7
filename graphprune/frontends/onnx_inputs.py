"""The example inputs of an ONNX model: from the user's shapes or arrays, checked against
the graph's declared inputs, and a second set at other sizes of every dynamic axis.

An exported detector or OCR model declares its height and width dynamic; feeding it a 1
there makes onnxruntime fail deep inside a ``Resize`` with a message about tensors the
user never named.  So only the batch (axis 0) of a dynamic input gets a default (1);
any other dynamic dimension must be given (``--input-shape x=1x3x640x640``, an ``.npz``
of arrays, or example arrays from Python), and the error says which input and dimension.

The second set (:func:`second_feeds`) is what the importer captures again to tell which
intermediate dimensions follow the input's dynamic ones, and what verification checks
the compact model at, so the compact file is proven at two sizes of each dynamic axis.
A leaf module (nothing of graphprune's imported but errors), shared by the importer, the
backend and the command line.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import BadOnnxError, ShapeMismatchError

_SPEC = re.compile(r"^(?:(?P<name>.+)=)?(?P<dims>\d+(?:[xX,]\d+)*)$")
_AXIS_NAMES = {4: ("batch", "channels", "height", "width"), 5: ("batch", "channels", "depth", "height", "width")}


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``"x=1x3x640x640"`` -> ``("x", (1, 3, 640, 640))``; a bare ``"1x3x640x640"`` has no name
    (for a model with one input).  Raises ``ValueError`` saying what form is expected."""
    m = _SPEC.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a shape: write NAME=1x3x640x640, or 1x3x640x640 for a model with one input")
    dims = tuple(int(d) for d in re.split(r"[xX,]", m["dims"]))
    if any(d <= 0 for d in dims):
        raise ValueError(f"{text!r}: every dimension must be positive")
    return m["name"], dims


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (``np.savez(path, x=..., mask=...)``), by name."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise BadOnnxError(f"no such inputs file: {source}", source=source,
                           hint="write one with numpy.savez(path, NAME=array, ...)")
    try:
        with np.load(source, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except Exception as exc:
        raise BadOnnxError(f"cannot read the inputs file: {type(exc).__name__}: {str(exc)[:200]}", source=source,
                           hint="give an .npz written by numpy.savez(path, NAME=array, ...)") from exc


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (graph inputs that are not initializers), in order."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    """Declared dims: an int for a static one, its symbolic name (or ``"?"``) otherwise."""
    # some exporters write dim_value 0 for an unknown size: it is dynamic, like an unnamed dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim]


def dynamic_axes(vi: onnx.ValueInfoProto) -> dict[int, str]:
    """Axis -> symbolic name of every dynamic dimension of the input ``vi``."""
    return {k: d for k, d in enumerate(_dims(vi)) if isinstance(d, str)}


def _axis_name(rank: int, axis: int) -> str:
    names = _AXIS_NAMES.get(rank)
    return names[axis] if names else ("batch" if axis == 0 else f"dim {axis}")


def _hint_spec(vi: onnx.ValueInfoProto) -> str:
    dims = _dims(vi)
    parts = ["1" if k == 0 and isinstance(d, str) else f"<{_axis_name(len(dims), k)}>" if isinstance(d, str)
             else str(d) for k, d in enumerate(dims)]
    return f"{vi.name}={'x'.join(parts)}"


def _random(vi: onnx.ValueInfoProto, shape: Sequence[int], gen: np.random.Generator) -> np.ndarray:
    dt = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    if np.issubdtype(dt, np.floating):
        return gen.standard_normal(tuple(shape)).astype(dt)
    return np.zeros(tuple(shape), dtype=dt)  # ids, masks, indices: zeros are valid for every model


def _check_shape(vi: onnx.ValueInfoProto, shape: Sequence[int], source: str, how: str) -> None:
    """The shape given for ``vi`` has its rank and its static dims."""
    dims = _dims(vi)
    if not vi.type.tensor_type.HasField("shape"):
        return  # the graph declares no shape: anything goes
    if len(shape) != len(dims):
        raise ShapeMismatchError(f"input {vi.name!r} has rank {len(dims)} ({_show(dims)}), but {how} has rank "
                                 f"{len(shape)} ({_show(shape)})", node=vi.name, source=source,
                                 hint=f"give a shape such as {_hint_spec(vi)}")
    for k, (d, s) in enumerate(zip(dims, shape)):
        if isinstance(d, int) and d != s:
            raise ShapeMismatchError(f"input {vi.name!r} has a static {_axis_name(len(dims), k)} ({d}), but {how} "
                                     f"has {s} there ({_show(shape)})", node=vi.name, source=source,
                                     hint=f"keep the static dims: {_hint_spec(vi)}")


def _show(dims: Sequence[Any]) -> str:
    return "x".join(str(d) for d in dims)


def input_feeds(model: onnx.ModelProto, *, shapes: Mapping[str | None, Sequence[int]] | None = None,
                arrays: Mapping[str, np.ndarray] | None = None, source: str = "<ModelProto>",
                seed: int = 0, check_dtype: bool = True) -> dict[str, np.ndarray]:
    """One array per graph input: the user's ``arrays`` (by name), else random data of the
    user's ``shapes`` (by name; the key ``None`` for a model with one input), else of the
    declared shape with a dynamic batch (axis 0) set to 1.  Any other dynamic dimension
    without a given shape is an error naming the input and the dimension, as are unknown
    names, a rank or a static dimension that does not match, and dtypes that differ."""
    inputs = graph_inputs(model)
    by_name = {vi.name: vi for vi in inputs}
    shapes = dict(shapes or {})
    arrays = dict(arrays or {})
    if None in shapes:
        if len(inputs) != 1:
            names = ", ".join(by_name) or "none"
            raise ShapeMismatchError(f"a shape without a name is for a model with one input; this one has "
                                     f"{len(inputs)} ({names})", source=source,
                                     hint="name each input: --input-shape NAME=1x3x224x224")
        if inputs[0].name in shapes:
            raise ShapeMismatchError(f"input {inputs[0].name!r} is given a shape twice (with and without its name)",
                                     source=source, hint="give each input once")
        shapes[inputs[0].name] = shapes.pop(None)
    for name in [*shapes, *arrays]:
        if name not in by_name:
            raise ShapeMismatchError(f"the model has no input {name!r}", node=str(name), source=source,
                                     hint=f"its inputs are: {', '.join(by_name) or 'none'}")
    both = set(shapes) & set(arrays)
    if both:
        raise ShapeMismatchError(f"input {sorted(both)[0]!r} is given both as a shape and as an array", source=source,
                                 hint="give each input once")
    gen = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        if vi.name in arrays:
            arr = arrays[vi.name]
            _check_shape(vi, arr.shape, source, "the array given")
            want = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            if check_dtype and arr.dtype != want:
                raise ShapeMismatchError(f"input {vi.name!r} is {want}, but the array given is {arr.dtype}",
                                         node=vi.name, source=source, hint=f"save it as .astype('{want}')")
            feeds[vi.name] = arr
        elif vi.name in shapes:
            _check_shape(vi, shapes[vi.name], source, "the shape given")
            feeds[vi.name] = _random(vi, shapes[vi.name], gen)
        else:
            feeds[vi.name] = _random(vi, _default_shape(vi, source, given=bool(arrays)), gen)
    return feeds


def _default_shape(vi: onnx.ValueInfoProto, source: str, given: bool) -> list[int]:
    """The declared shape, a dynamic batch set to 1; another dynamic dim is an error."""
    dims = _dims(vi)
    for k, d in enumerate(dims):
        if isinstance(d, str) and k > 0:
            missing = "is not among the inputs given" if given else "has no shape given"
            raise ShapeMismatchError(
                f"input {vi.name!r} has a dynamic {_axis_name(len(dims), k)} {d!r} and {missing}",
                node=vi.name, source=source,
                hint=f"give --input-shape {_hint_spec(vi)} (or --inputs file.npz; from Python, example inputs: "
                     f"gp.trace(path, (array,)))")
    return [1 if isinstance(d, str) else d for d in dims]


def feeds_from_example(model: onnx.ModelProto, example: Sequence[Any] | Mapping[str, Any],
                       source: str = "<ModelProto>") -> dict[str, np.ndarray]:
    """The caller's example inputs (arrays or tensors, in graph-input order or by name) as
    feeds, checked like :func:`input_feeds` (dtypes aside: a caller's array goes to
    onnxruntime as it is); inputs not given get :func:`input_feeds`'s defaults."""
    if not isinstance(example, Mapping):
        inputs = graph_inputs(model)
        if example and len(example) != len(inputs):
            raise BadOnnxError(f"model has {len(inputs)} inputs, got {len(example)} example inputs", source=source,
                               hint="pass one example per graph input, in order")
        example = {vi.name: e for vi, e in zip(inputs, example)}
    arrays = {k: e.detach().cpu().numpy() if hasattr(e, "detach") else np.asarray(e) for k, e in example.items()}
    return input_feeds(model, arrays=arrays, source=source, check_dtype=False)


def _other_size(n: int) -> int:
    """Another size a strided model accepts if it accepts ``n``: ``n`` plus its largest
    power-of-two divisor (640 -> 768, 48 -> 64, 7 -> 8), so every power-of-two stride
    that divides ``n`` divides it too, and the model grows by at most 2x."""
    return n + (n & -n)


def second_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                 batch_only: bool = False) -> dict[str, np.ndarray] | None:
    """Feeds at other sizes of every dynamic axis the graph inputs declare (the batch one
    more, any other :func:`_other_size`); None when no input has a dynamic axis.
    ``batch_only`` varies axis 0 only."""
    shapes = {}
    for vi in graph_inputs(model):
        shape = list(np.shape(feeds[vi.name]))
        for k in dynamic_axes(vi):
            if k < len(shape) and (k == 0 or not batch_only):
                shape[k] = shape[k] + 1 if k == 0 else _other_size(shape[k])
        shapes[vi.name] = tuple(shape)
    if all(shapes[k] == np.shape(feeds[k]) for k in shapes):
        return None
    return feeds_at(feeds, shapes)


def feeds_at(feeds: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """``feeds`` with each input of ``shapes`` at that shape: float inputs random (seeded),
    integer ones (ids, masks) the given values tiled, since zeros could change what a mask
    selects.  The same call gives the same arrays."""
    gen = np.random.default_rng(1)
    out = {}
    for name, arr in feeds.items():
        arr = np.asarray(arr)
        shape = tuple(shapes.get(name, arr.shape))
        if shape == arr.shape:
            out[name] = arr
        elif np.issubdtype(arr.dtype, np.floating):
            out[name] = gen.standard_normal(shape).astype(arr.dtype)
        else:
            out[name] = np.resize(arr, shape) if arr.size else np.zeros(shape, arr.dtype)
    return out
