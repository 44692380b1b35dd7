"""Zeroing groups' units in the weights themselves for a check, and putting them back.

A copy of the weights a check zeroes is a second model when the groups span every
weight (a transformer's hidden-column group slices every matrix): Phi-3-mini's check
needed 2.7 times its 7 GiB of bf16 weights that way.  Zeroing in place keeps only the
values it overwrote, and writes them to a temporary folder once they pass
``spill_above`` bytes (written with ``write``, they sit in the page cache, not in the
process), so a check needs the weights plus the compact model it builds.

Restoring undoes the writes in reverse order: tensors that share storage (a tied
embedding and LM head, both sliced by one group) get every value back exactly, whichever
name zeroed it first.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from types import TracebackType
from typing import Iterable

import torch

from .analysis.groups import Group, Slice


@dataclass
class _Undo:
    """What one slice of one group overwrote: ``saved`` (or the file holding it) goes back
    to ``units``' elements of ``param``."""

    param: str
    slice: Slice
    units: torch.Tensor
    saved: torch.Tensor | None
    path: str | None = None


class ZeroedInPlace:
    """``with ZeroedInPlace(params, masks) as tensors:`` -- ``params`` with each group's
    masked units zeroed; on leaving (also on an error) every value is put back, bit for
    bit.  ``tensors`` is ``params`` itself: nothing else may read those weights meanwhile."""

    def __init__(self, params: dict[str, torch.Tensor], masks: Iterable[tuple[Group, torch.Tensor]],
                 spill_above: int = 1 << 30) -> None:
        self.params = params
        self.masks = [(g, m) for g, m in masks if m.any()]
        self.spill_above = spill_above
        self._undo: list[_Undo] = []
        self._kept = 0
        self._folder: tempfile.TemporaryDirectory | None = None

    @property
    def spilled(self) -> bool:
        """Whether some overwritten values went to disk (over ``spill_above``)."""
        return self._folder is not None

    def __enter__(self) -> dict[str, torch.Tensor]:
        try:
            with torch.no_grad():
                for g, m in self.masks:
                    units = m.nonzero().flatten().cpu()
                    for s in g.slices:
                        self._zero(s, units)
        except BaseException:
            self._restore()
            raise
        return self.params

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _zero(self, s: Slice, units: torch.Tensor) -> None:
        p = self.params[s.param]
        if s.is_block:
            saved = s.gather_block(p, units)
        else:
            saved = p.index_select(s.dim, s.index[units].reshape(-1).to(p.device))
        undo = _Undo(s.param, s, units, saved)
        self._undo.append(undo)  # before the write: an interrupted write is still undone
        nbytes = saved.numel() * saved.element_size()
        if self._kept + nbytes > self.spill_above:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="graphprune-verify-")
            undo.path = os.path.join(self._folder.name, f"{len(self._undo)}.pt")
            torch.save(saved.cpu(), undo.path)
            undo.saved = None
        else:
            self._kept += nbytes
        if s.is_block:
            s.put_block_(p, units, 0.0)
        else:
            p.index_fill_(s.dim, s.index[units].reshape(-1).to(p.device), 0.0)

    def _restore(self) -> None:
        try:
            with torch.no_grad():
                while self._undo:
                    u = self._undo.pop()
                    p = self.params[u.param]
                    saved = u.saved if u.path is None else torch.load(u.path).to(p.device)
                    if u.slice.is_block:
                        u.slice.put_block_(p, u.units, saved)
                    else:
                        p.index_copy_(u.slice.dim, u.slice.index[u.units].reshape(-1).to(p.device), saved)
        finally:
            if self._folder is not None:
                self._folder.cleanup()
                self._folder = None
            self._kept = 0
