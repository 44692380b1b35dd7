"""Giving freed heap memory back to the system during the analysis.

glibc serves blocks below its mmap threshold from its heap and keeps them there once
freed; the threshold rises to the largest block freed so far (up to 32 MiB), which after a
model's weights were read is nearly every label tensor of the analysis.  Interleaved
with small long-lived ones, those freed blocks are seldom reused: the rule pass over
vit_b_16's ONNX graph left 370 MiB of free but resident heap behind (nothing of it
live), more than the analysis itself holds.  ``malloc_trim`` returns such free pages.
Where the C library has no ``malloc_trim`` (not glibc) this is a no-op.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Any


def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident size (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> int:
    """Memory the system can give without swapping (``MemAvailable``; 0 where unknown)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def release() -> None:
    """Give the C heap's free pages back to the system now (a few ms)."""
    if _TRIM is not None:
        _TRIM(0)


class Trimmer:
    """``tick()`` after each step of a loop that allocates and frees many mid-sized
    tensors: every ``every`` ticks, if the resident size has grown by ``step`` bytes since the last
    release (or since its lowest point), the heap's free pages are given back.  Costs a
    read of ``/proc/self/statm`` per ``every`` ticks and a trim per ``step`` of growth."""

    def __init__(self, step: int = 64 << 20, every: int = 16) -> None:
        self.step, self.every, self.ticks = step, every, 0
        self.enabled = _TRIM is not None and resident_bytes() > 0
        self.mark = resident_bytes() if self.enabled else 0

    def tick(self) -> None:
        if not self.enabled:
            return
        self.ticks += 1
        if self.ticks % self.every:  # reading /proc at every op would cost 2% of a ResNet's analysis
            return
        rss = resident_bytes()
        if rss - self.mark > self.step:
            release()
            self.mark = resident_bytes()
        elif rss < self.mark:
            self.mark = rss
