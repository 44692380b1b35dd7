"""Plot an optimizer's ``history``: how sparsity, reductions and loss moved over training.

A plain matplotlib figure (:mod:`graphprune.figures`): works headless, touches no pyplot state.

>>> from graphprune.optim.plots import plot_history
>>> plot_history(opt.history, "hesso.png")
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from graphprune.figures import figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_SERIES = (("group_sparsity", "units removed"), ("params_reduction", "params removed"),
           ("flops_reduction", "FLOPs removed"))


def plot_history(history: Sequence[dict[str, Any]], path: str | Path | None = None,
                 title: str | None = None) -> "Figure":
    """Reductions (left axis) and the recorded loss (right axis) against the step.

    Saves to ``path`` when given; returns the figure either way.
    """
    if not history:
        raise ValueError("empty history: nothing was logged yet (no pruning period has ended)")
    steps = [row["step"] for row in history]
    fig, ax = figure(7, 4)
    for key, label in _SERIES:
        ax.plot(steps, [row[key] for row in history], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction removed")
    ax.set_ylim(0, 1)
    losses = [(s, row["loss"]) for s, row in zip(steps, history) if row.get("loss") is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), color="black", linestyle="--", label="loss")
        twin.set_ylabel("loss")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
