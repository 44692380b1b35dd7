"""ONNX models whose weights live elsewhere: stubs, skeletons, fed sessions.

The importer keeps a model's structure with its big float weights as *stubs* (name,
type, dims, no data): the IR's tensors are the one copy of them.  Everything that
needs a whole model (the checker, shape inference, onnxruntime) works on its
*skeleton* instead, the weights moved out and fed at run time, so no weight is ever
serialised or copied a second time, and models over protobuf's 2 GiB limit work the
same way.  A leaf module (nothing of graphprune's imported), so the importer, the
backend and the lowering can all use it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PROTOBUF_LIMIT = (1 << 31) - (1 << 26)  # a serialised ModelProto cannot pass 2 GiB (some room for the graph)
_FEED_MIN = 1024  # float initializers with at least this many elements are fed, not embedded, by ``skeleton``
# weights over this many bytes make onnxruntime run a model as its ``skeleton`` with the weights
# fed (used as they are): a session of the serialised model took three times its weights more
# (the bytes, onnxruntime's parse of them and its own tensors: +3.4 GB on vit_l_16)
_FEED_BYTES = 1 << 28
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers, from their dims (reading ``raw_data`` would copy it)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        try:
            total += n * elem_dtype(t.data_type).itemsize
        except Exception:  # strings
            total += n * 8
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model (weights in memory) is too big to serialise: onnx.checker,
    shape inference and onnxruntime then only see its ``skeleton``."""
    return data_bytes(model) > PROTOBUF_LIMIT


def is_fed(t: onnx.TensorProto) -> bool:
    """Whether ``skeleton`` moves the initializer out: a float weight of at least
    ``_FEED_MIN`` elements (read from its dims, not its data)."""
    return t.data_type in FLOAT_TYPES and (int(np.prod(t.dims)) if len(t.dims) else 1) >= _FEED_MIN


def runs_fed(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs ``model`` as its ``skeleton`` with the weights fed (see
    :func:`session`): it cannot be serialised, or its weights are big enough that an
    embedded copy would cost several more of them."""
    return is_large(model) or data_bytes(model) >= _FEED_BYTES


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Every set field of the message ``src`` but ``skip`` into ``dst`` (nothing of ``skip``
    is read, so a graph's weights are not copied)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        field = getattr(dst, fd.name)
        if hasattr(field, "extend"):
            field.extend(value)
        elif hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (metadata, functions, graph fields) with no initializer."""
    out = onnx.ModelProto()
    _copy_fields(model, out, "graph")
    _copy_fields(model.graph, out.graph, "initializer")
    return out


def stub(t: onnx.TensorProto, out: onnx.TensorProto | None = None) -> onnx.TensorProto:
    """The initializer without its data: name, type, dims (and doc and metadata) only.  A
    model holds its fed weights (:func:`is_fed`) as stubs wherever the data lives elsewhere
    (the IR's tensors): ``skeleton`` moves them out, so the checker, shape inference and
    onnxruntime never see a stub, and nothing reads the data they lack."""
    out = onnx.TensorProto() if out is None else out
    out.name, out.data_type, out.doc_string = t.name, t.data_type, t.doc_string
    out.dims.extend(t.dims)
    if hasattr(t, "metadata_props"):
        out.metadata_props.extend(t.metadata_props)
    return out


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose fed weights (:func:`is_fed`) are stubs: the structure the
    importer keeps (the weights themselves become the IR's tensors), without a second copy
    of every weight.  ``model`` is not changed."""
    out = _without_initializers(model)
    for t in model.graph.initializer:
        if is_fed(t):
            stub(t, out.graph.initializer.add())
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out


def put_weight(init: onnx.TensorProto, name: str, arr: np.ndarray, fed: dict[str, np.ndarray]) -> None:
    """Make ``init`` the initializer ``name`` of ``arr``'s type and shape: a fed one
    (:func:`is_fed`) stays a stub and ``arr`` goes into ``fed`` (for :func:`fill` or to be
    fed to onnxruntime as it is); any other holds ``arr``."""
    init.Clear()
    init.name, init.data_type = name, helper.np_dtype_to_tensor_dtype(arr.dtype)
    init.dims.extend(arr.shape)
    if is_fed(init):
        fed[name] = arr
    else:
        init.CopyFrom(numpy_helper.from_array(np.require(arr, requirements="C"), name))


def fill(model: onnx.ModelProto, fed: dict[str, np.ndarray]) -> None:
    """Write each array of ``fed`` into its stub in ``model`` (those still there)."""
    for init in model.graph.initializer:
        arr = fed.get(init.name)
        if arr is not None:
            init.CopyFrom(numpy_helper.from_array(np.require(arr, requirements="C"), init.name))


def skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """The model without its float weight initializers, which become graph inputs of the
    same type and shape (fed at run time), and those initializers by name.  Small
    initializers (shape constants, scales) stay, so shape inference still sees them.
    Nothing big is copied: the skeleton of a 2.5 GB model is a few hundred kB."""
    g = model.graph
    sk = _without_initializers(model)
    sg = sk.graph
    declared = {i.name for i in g.input}
    moved: dict[str, onnx.TensorProto] = {}
    for t in g.initializer:
        if is_fed(t):
            moved[t.name] = t
            if t.name not in declared:
                sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            sg.initializer.append(t)
    return sk, moved


def check_model(model: Any) -> None:
    """``onnx.checker.check_model`` for a path (external data included) or a ModelProto of
    any size, checked as its ``skeleton``: serialising the weights for the checker cost
    twice their size (2.3 GB on vit_l_16) and fails past 2 GiB.  The fed weights' data is
    validated where it is read (:func:`load_onnx` converts every initializer)."""
    if isinstance(model, (str, os.PathLike)):
        onnx.checker.check_model(os.fspath(model))
    else:
        onnx.checker.check_model(skeleton(model)[0])


def infer_shapes(model: onnx.ModelProto, *, inplace: bool = False, **kwargs: Any) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` run on the ``skeleton`` (no weights are
    serialised, so any size works and nothing big is copied); the inferred value_info and
    outputs are written into ``model`` (``inplace``) or into a copy of it."""
    sk, moved = skeleton(model)
    inferred = onnx.shape_inference.infer_shapes(sk, **kwargs)
    out = model
    if not inplace:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in moved)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def session(model: onnx.ModelProto, options: Any = None,
            weights: dict[str, np.ndarray] | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """An onnxruntime CPU session of ``model`` and the weight feeds it needs.  A model that
    :func:`runs_fed` (over 2 GiB it cannot even be serialised), or one given ``weights``
    (arrays for the stubs of an emitted model, see :func:`stub`), runs as its ``skeleton``
    with the weights fed: onnxruntime uses a fed array's memory as it is."""
    import onnxruntime as ort

    feeds: dict[str, np.ndarray] = {}
    if weights is not None or runs_fed(model):
        model, moved = skeleton(model)
        given = weights or {}
        feeds = {k: np.require(given[k], requirements="C") if k in given else numpy_helper.to_array(t)
                 for k, t in moved.items()}
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), feeds


def elem_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
             weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """One onnxruntime run on the CPU.  A big model runs with its weights fed (see
    :func:`session`); ``weights`` are the arrays of an emitted model's stubs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess, fed = session(model, opts, weights)
    return sess.run(None, {**feeds, **fed})
