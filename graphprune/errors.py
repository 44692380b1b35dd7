"""One exception hierarchy for everything graphprune reports to a user.

Every error carries where it happened (node, op, source file) so the message can say
what to fix; callers catch :class:`GraphPruneError` to handle any of them.
"""
from __future__ import annotations


class GraphPruneError(Exception):
    """Base class: ``node``, ``op`` and ``source`` locate the problem, ``hint`` says what to do."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None,
                 source: str | None = None, hint: str | None = None) -> None:
        self.node, self.op, self.source, self.hint = node, op, source, hint
        where = ", ".join(f"{k}={v}" for k, v in (("node", node), ("op", op), ("file", source)) if v)
        text = message + (f" [{where}]" if where else "") + (f"\n  hint: {hint}" if hint else "")
        super().__init__(text)


class UnsupportedModelError(GraphPruneError):
    """The model cannot be traced into the IR (torch.export failed, unsupported construct)."""


class BadOnnxError(GraphPruneError):
    """The ONNX file is unreadable, invalid, or inconsistent (dangling inputs, cycles, bad dtypes)."""


class ShapeMismatchError(GraphPruneError):
    """Inputs or intermediate shapes do not match what the graph expects."""


class UnprunableTargetError(GraphPruneError):
    """A pruning target cannot be met without breaking the network (e.g. a layer would die)."""


class RuleError(GraphPruneError):
    """An op's registry rule raised while analysing a node: a bug in that rule (an input
    form it does not handle must be declared with ``lab.barrier`` and a reason), not a
    property of the model, so it is never turned into a barrier."""


class VerificationError(GraphPruneError):
    """Building or running a compact model to check groups raised: a bug in a rewrite or an
    emitter, distinct from a group that fails the numeric check (which is withdrawn)."""


class NotInPlace(GraphPruneError):
    """The compact model cannot be the user's own module shrunk in place
    (``construct_subnet(mode="module")``); the message says why, and the exported-graph
    form (``mode="graph"`` or ``"auto"``) still can be built."""


class ZeroInvarianceError(GraphPruneError):
    """A compact model does not reproduce the zeroed full model: a bug, reported loudly."""


class TuningError(GraphPruneError):
    """Code generation or autotuning failed."""


class NumericalError(GraphPruneError):
    """NaN/Inf met in weights or gradients during optimisation."""


class RecorderMismatchWarning(UserWarning):
    """The fast recorder and torch.export analysed a model differently; export's groups
    were taken.  The test suite turns this into an error: every traced model is a check
    that the recorder sees what export sees."""


class TimeBudgetError(GraphPruneError):
    """A phase of the analysis ran past its time budget (:mod:`graphprune.analysis.budget`):
    a pathological graph or rule, reported with the node it was at and the slowest one
    instead of running for minutes."""
