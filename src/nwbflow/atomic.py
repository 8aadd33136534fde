"""Crash-safe file writes: a hidden temporary beside the target, fsynced, then renamed into place.

A process killed at any instant leaves the target as it was (absent or the
previous version) or complete; never half written. Used for processed NWB
files, work-directory artifacts and synthetic sessions alike.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The temporary is hidden (``.NAME.<random>.partial<suffix>``) and sits in
    the target's directory, so the rename is atomic. ``suffix`` is for
    writers that want an extension (pynwb warns without ``.nwb``). The file
    and then the directory are fsynced around the rename.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial{suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
