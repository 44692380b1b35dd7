"""TVM code generation and tuning for compact models (installed as ``graphprune.codegen``).

``build`` compiles a PyTorch or ONNX model for "x86", "arm" or "cuda"; ``tune`` fills a
meta-schedule database that ``build(..., tuning_db=...)`` applies; ``bsr_linear`` and
``choose_linear_kernel`` are the block-sparse kernels. TVM is imported on first use of any
of these (2-4 s), not when graphprune is imported.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "build": "compile", "CompiledModel": "compiled",
    "tune": "tuning", "TuningReport": "tuning",
    "resolve_target": "targets", "CodegenTarget": "targets", "prune_multiple": "targets",
    "import_model": "frontend", "RelaxProgram": "frontend",
    "bsr_linear": "sparse", "choose_linear_kernel": "sparsify",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'graphprune.codegen' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
