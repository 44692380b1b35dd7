"""``gp.export_onnx``: write a (compact) PyTorch module as ONNX, atomically."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import onnx
import torch

from .atomic import atomic_path
from .errors import UnsupportedModelError


def export_onnx(module: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, opset: int = 17) -> onnx.ModelProto:
    """Export with the TorchScript exporter, inputs named ``input_0..``, outputs
    ``output_0..``, dim 0 dynamic unless ``dynamic_batch`` is False; the file appears only
    once complete and valid.  Where the TorchScript exporter fails (it needs sizes it cannot
    see: an adaptive pool or an unfold after a reshape of the batch, in timm's csatv2 and
    halonet), the dynamo exporter (onnxscript, opset 18 or later) writes the file instead."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        outs = module(*args)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    names_in = [f"input_{i}" for i in range(len(args))]
    names_out = [f"output_{i}" for i in range(n_out)]
    errors = []
    try:
        for exporter in (_torchscript, _dynamo):
            try:
                with atomic_path(path) as tmp:
                    exporter(module, args, str(tmp), names_in, names_out, dynamic_batch, opset)
                    proto = onnx.load(str(tmp))
                    onnx.checker.check_model(proto)
                return proto
            except Exception as exc:  # each exporter fails in its own exception types
                first_line = str(exc).partition("\n")[0]  # an exception may have no message at all
                errors.append(f"{exporter.__name__.strip('_')}: {type(exc).__name__}: {first_line[:240]}")
    finally:
        module.train(was_training)
    raise UnsupportedModelError(f"ONNX export failed: {'; '.join(errors)}", source=os.fspath(path),
                                hint="check that the module runs on the example inputs")


def _torchscript(module: torch.nn.Module, args: tuple, path: str, names_in: list[str], names_out: list[str],
                 dynamic_batch: bool, opset: int) -> None:
    axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
    with warnings.catch_warnings():
        # A compact module's shape assertions (torch._assert in torch's own code) hold for every
        # batch by construction; the tracer's warning about them says nothing to act on.
        # Conditions in the user's own code keep their warning: it names their module.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning,
                                module=r"torch$")
        torch.onnx.export(module, args, path, dynamo=False, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=opset)


def _dynamo(module: torch.nn.Module, args: tuple, path: str, names_in: list[str], names_out: list[str],
            dynamic_batch: bool, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = tuple({0: batch} for _ in args) if dynamic_batch else None
    if shapes is not None and _varargs(module):
        shapes = (shapes,)  # torch.export reads ``forward(*args)`` as one argument, the tuple
    torch.onnx.export(module, args, path, dynamo=True, input_names=names_in, output_names=names_out,
                      dynamic_shapes=shapes, opset_version=max(opset, 18), external_data=False, verbose=False)


def _varargs(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` takes its inputs as ``*args`` (a compact module does)."""
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    return bool(kinds) and kinds[0] is inspect.Parameter.VAR_POSITIONAL
