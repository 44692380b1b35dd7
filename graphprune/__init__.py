"""graphprune: a graph-based compiler for automatic structured pruning.

trace -> analyse (op registry, zero-invariant groups) -> optimise/score -> rewrite -> emit
(compact PyTorch / ONNX) -> compile (TVM).  See README.md for the architecture.
"""
from .analysis.groups import Group, Slice
from .errors import GraphPruneError
from .prunable import PrunableGraph
from .trace import trace

__all__ = ["trace", "PrunableGraph", "Group", "Slice", "GraphPruneError"]
__version__ = "0.1.0"
