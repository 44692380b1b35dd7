"""Import a PyTorch module or an ONNX model into a Relax IRModule whose weights stay parameters.

Keeping weights as named parameters (rather than constants folded into the graph) lets the
caller see and replace them, e.g. the sparse-kernel chooser reads a layer's weight to decide
on a block-sparse kernel. :meth:`RelaxProgram.bound` binds them as constants when a build or
a tuning run needs them folded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import tvm
from tvm import relax

from graphprune.errors import BadOnnxError, UnsupportedModelError

from .static_shapes import bind_input_shapes


@dataclass
class RelaxProgram:
    """A Relax module whose ``main`` takes the model inputs followed by the weights.

    ``params`` are in the order of ``main``'s trailing parameters, ``input_names`` and
    ``input_shapes`` describe the leading ones. ``name`` identifies the model in tuning databases.
    """

    mod: tvm.IRModule
    params: list[np.ndarray]
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    name: str
    param_names: list[str] = field(default_factory=list)

    def bound(self) -> tvm.IRModule:
        """``mod`` with every weight bound as a constant: ``main`` then takes only the inputs."""
        main = self.mod["main"]
        weights = main.params[len(self.input_names):]
        bindings = {var: tvm.runtime.tensor(value) for var, value in zip(weights, self.params)}
        return relax.transform.BindParams("main", bindings)(self.mod)

    def summary(self) -> str:
        """One line per input and a weight count: what the compiled model will expect."""
        rows = [f"{n}: {d}{list(s)}" for n, s, d in zip(self.input_names, self.input_shapes, self.input_dtypes)]
        size = sum(p.size for p in self.params)
        return f"RelaxProgram {self.name}\n  inputs: " + ", ".join(rows) + \
            f"\n  weights: {len(self.params)} tensors, {size:,} values"

    def __repr__(self) -> str:
        return f"RelaxProgram({self.name}, inputs={self.input_names}, weights={len(self.params)})"


def _struct_info_shape(var: relax.Var) -> tuple[tuple[int, ...], str]:
    ty = var.ty  # relax.TensorType (called struct_info before TVM 0.27)
    return tuple(int(d) for d in ty.shape), str(ty.dtype)


def _program(mod: tvm.IRModule, n_inputs: int, name: str) -> RelaxProgram:
    mod, params = relax.frontend.detach_params(mod)
    main = mod["main"]
    inputs = list(main.params[:n_inputs])
    shapes, dtypes = zip(*(_struct_info_shape(v) for v in inputs)) if inputs else ((), ())
    return RelaxProgram(
        mod=mod,
        params=[p.numpy() for p in params.get("main", [])],
        input_names=[v.name for v in inputs],
        input_shapes=list(shapes),
        input_dtypes=list(dtypes),
        name=name,
        param_names=[v.name for v in main.params[n_inputs:]],
    )


def from_torch(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
               name: str | None = None) -> RelaxProgram:
    """Export ``model`` with ``torch.export`` (in eval mode, shapes fixed by ``example_inputs``)."""
    from tvm.relax.frontend.torch import from_exported_program

    inputs = _as_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, inputs)
        mod = from_exported_program(exported, keep_params_as_input=True)
    except Exception as exc:  # torch.export and the importer raise many unrelated types
        raise UnsupportedModelError(f"cannot import {type(model).__name__} into TVM Relax: {exc}",
                                    hint="check that torch.export.export(model, inputs) works; "
                                         "or export the model to ONNX and build from that") from exc
    finally:
        model.train(was_training)
    return _program(mod, len(inputs), name or type(model).__name__)


def from_onnx(model: onnx.ModelProto | str | os.PathLike, shapes: dict[str, Sequence[int]] | None = None,
              name: str | None = None, example_inputs: Sequence[Any] | None = None) -> RelaxProgram:
    """Import an ONNX model. Input shapes come from the graph, from ``example_inputs`` (in graph
    input order) or from ``shapes`` (by name); dynamic axes need one of the latter two.  The
    shapes are bound and the shape arithmetic folded before TVM sees the model
    (:mod:`.static_shapes`): the program is built for exactly these input shapes."""
    if not isinstance(model, onnx.ModelProto):
        path = os.fspath(model)
        try:
            model = onnx.load(path)
        except Exception as exc:
            raise BadOnnxError(f"cannot read ONNX file: {exc}", source=path) from exc
        name = name or os.path.splitext(os.path.basename(path))[0]
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    given = dict(zip((v.name for v in graph_inputs), (list(x.shape) for x in _as_tuple(example_inputs))))
    given.update(shapes or {})
    shape_dict: dict[str, list[int]] = {}
    for value in graph_inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if value.name not in given and None in dims:
            raise BadOnnxError(f"input {value.name!r} has dynamic dimensions {dims}", node=value.name,
                               hint="pass example_inputs or shapes={name: [...]} to fix them for compilation")
        shape_dict[value.name] = list(given.get(value.name, dims))
    dtype_dict = {v.name: str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
                  for v in graph_inputs}
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx

    try:
        model = bind_input_shapes(model, shape_dict)
    except Exception as exc:  # onnxruntime and shape inference raise many types
        raise BadOnnxError(f"cannot fix the input shapes {shape_dict} of the ONNX model: {type(exc).__name__}: "
                           f"{str(exc)[:300]}", hint="check that onnxruntime runs the model at these shapes") from exc
    try:
        mod = relax_from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=True)
    except Exception as exc:
        raise BadOnnxError(f"TVM's ONNX importer failed: {exc}",
                           hint="check the model with onnx.checker; opsets 11-18 are known to import") from exc
    return _program(mod, len(graph_inputs), name or (model.graph.name or "onnx_model"))


def _as_tuple(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return (inputs,) if hasattr(inputs, "shape") else tuple(inputs)


def import_model(model: torch.nn.Module | onnx.ModelProto | str | os.PathLike | RelaxProgram,
                 example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                 name: str | None = None) -> RelaxProgram:
    """Dispatch on the model's kind: an ``nn.Module`` needs ``example_inputs``, ONNX does not,
    an already imported :class:`RelaxProgram` is returned as it is."""
    if isinstance(model, RelaxProgram):
        return model
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise UnsupportedModelError("a PyTorch model needs example_inputs to be exported",
                                        hint="pass example_inputs=(torch.randn(1, 3, 224, 224),)")
        return from_torch(model, example_inputs, name)
    return from_onnx(model, name=name, example_inputs=example_inputs)
