"""graphprune: a graph-based compiler for automatic structured pruning.

trace -> analyse (op registry, zero-invariant groups) -> optimise/score -> rewrite -> emit
(compact PyTorch / ONNX) -> compile (TVM).  See README.md for the architecture.
"""
from .analysis.groups import Group, Slice
from .errors import GraphPruneError
from .compile import CompileResult, compile
from .export import export_onnx
from .prunable import PrunableGraph
from .pretrained import load_pretrained
from . import optim
from .optim import DHSPG, H2SPG, HESSO, HESSO_CRIC, HESSOCRIC
from .optim.oneshot import PruneReport, finetune, prune
from .optim.recovery import Recovery, recover
from .target import Target, achieved, select_units
from .trace import trace

__all__ = ["trace", "compile", "CompileResult", "export_onnx", "PrunableGraph", "Group", "Slice", "GraphPruneError", "optim", "Target", "select_units",
            "achieved", "load_pretrained", "HESSO", "DHSPG", "H2SPG", "HESSO_CRIC", "HESSOCRIC", "prune", "finetune",
           "PruneReport", "recover", "Recovery"]
__version__ = "0.1.0"
