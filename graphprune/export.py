"""``gp.export_onnx``: write a (compact) PyTorch module as ONNX, atomically."""
from __future__ import annotations

import os
import warnings
from typing import Any

import onnx
import torch

from .atomic import atomic_path
from .errors import UnsupportedModelError


def export_onnx(module: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, opset: int = 17) -> onnx.ModelProto:
    """Export with the TorchScript exporter (the dynamo one needs onnxscript), inputs
    named ``input_0..``, outputs ``output_0..``, dim 0 dynamic unless ``dynamic_batch``
    is False; the file appears only once complete and valid."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        outs = module(*args)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    names_in = [f"input_{i}" for i in range(len(args))]
    names_out = [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # A compact module's shape assertions (torch._assert in torch's own code) hold for every
            # batch by construction; the tracer's warning about them says nothing to act on.
            # Conditions in the user's own code keep their warning: it names their module.
            warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning,
                                    module=r"torch$")
            torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=names_in, output_names=names_out,
                              dynamic_axes=axes, opset_version=opset)
            proto = onnx.load(str(tmp))
            onnx.checker.check_model(proto)
    except Exception as exc:
        raise UnsupportedModelError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}",
                                    source=os.fspath(path), hint="check that the module runs on the example inputs") from exc
    finally:
        module.train(was_training)
    return proto
