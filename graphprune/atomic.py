"""Atomic file writes: a reader, or a crash half-way, never sees a half-written artefact.

Every file graphprune hands to a user (compact models, reports, plots) is written to a
temporary file in the destination folder and moved into place with ``os.replace``, which
is atomic on POSIX and Windows within one file system.  A failed write leaves the old
file (or no file) behind, never a truncated one.

>>> atomic_write_text("out/report.md", text)
>>> with atomic_path("out/model.onnx") as tmp:
...     onnx.save(proto, tmp)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path``.

    For writers that insist on a file name (``onnx.save``, ``savefig``, ``export_library``).
    The temporary name is hidden (leading dot) and keeps the suffix, since some writers
    pick the format from it.  The parent folder must exist: creating folders is the
    caller's decision.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared artefacts from other users
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
