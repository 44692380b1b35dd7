"""Matplotlib figures without pyplot: no backend is chosen and no global state is touched.

A :class:`matplotlib.figure.Figure` made directly draws and saves (PNG through Agg) on a
headless machine, and, unlike ``pyplot``, is not registered anywhere, so nothing needs
closing and a user's own backend choice stays theirs. matplotlib is imported on the first
figure, not when graphprune is imported.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def figure(width: float, height: float) -> tuple["Figure", "Axes"]:
    """A new figure of ``width`` x ``height`` inches with one set of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def png_bytes(fig: "Figure", dpi: int = 110) -> bytes:
    """The figure as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
