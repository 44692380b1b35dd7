"""What a frontend provides once a model is analysed: emitting and checking compact models.

A :class:`PrunableGraph` holds one backend and reaches its frontend only through this
protocol; :class:`.torch_backend.TorchBackend` emits ``nn.Module`` s,
:class:`.onnx_backend.OnnxBackend` ``onnx.ModelProto`` s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import torch

if TYPE_CHECKING:
    import onnx

    from ..prunable import PrunableGraph

#: what a backend emits: a PyTorch module or an ONNX model
CompactModel = Union[torch.nn.Module, "onnx.ModelProto"]


class NotConclusive(RuntimeError):
    """A compact model checked on a :class:`CheckExample` would not speak for the
    model's example (its plan rewrites a node whose sizes the cheaper example changes)."""


@dataclass(frozen=True)
class CheckExample:
    """A cheaper example that verification may pass groups on (never withdraw them:
    :meth:`PrunableGraph.verify`): ``args`` and ``kwargs`` as the model takes them;
    ``program``, what its compact models are lowered from where the backend's own program
    cannot take it (None: the backend's own); ``varying``, the nodes whose integer
    arguments differ from the example's, which a compact plan checked here must not
    rewrite (:mod:`.small_check`)."""

    args: tuple
    kwargs: dict
    program: Any = None
    varying: frozenset[str] = frozenset()


@runtime_checkable
class Backend(Protocol):
    def emit(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
             removed: torch.Tensor | None = None) -> CompactModel:
        """The compact model with ``tensors`` as weights; ``removed`` overrides which units
        go (default: every all-zero unit)."""
        ...

    def full(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor]) -> CompactModel:
        """The full model with ``tensors`` as weights (nothing removed)."""
        ...

    def compare(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
                removed: torch.Tensor | None = None, example: CheckExample | None = None) -> float:
        """Max relative error between the compact model (``removed`` as for :meth:`emit`)
        and the zeroed full model on ``example`` (default: the model's example)."""
        ...

    def check_examples(self, pg: PrunableGraph) -> list[CheckExample]:
        """Cheaper examples than the model's to verify on, cheapest first (maybe none)."""
        ...
