"""Crash-safe file writes: a hidden temporary beside the target, fsynced, then renamed into place.

A process killed at any instant leaves the target as it was (absent or the
previous version) or complete; never half written. Used for processed NWB
files, work-directory artifacts and synthetic sessions alike. The temporary's
name carries the writer's host and process id, so the next write of the same
target removes what a killed writer on this host left behind.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = "partial"


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The temporary is hidden (``.NAME.<host>.<pid>.<random>.partial<suffix>``)
    and sits in the target's directory, so the rename is atomic. ``suffix`` is
    for writers that want an extension (pynwb warns without ``.nwb``). The file
    and then the directory are fsynced around the rename. Temporaries of the
    same target left by dead processes of this host are removed first.
    """
    path = Path(path)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{PARTIAL}{suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` whose writer (on this host) is no longer running; returns them.

    A temporary of another host, or of a live process, is left alone: it may be
    a write in progress.
    """
    removed = []
    for candidate in path.parent.glob(f".{_glob_escape(path.name)}.*.{PARTIAL}*"):
        fields = candidate.name[len(path.name) + 2:].split(".")
        if len(fields) < 4 or fields[0] != _host() or not fields[1].isdigit() or _alive(int(fields[1])):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    """This machine's name with dots replaced (the temporary's fields are dot-separated)."""
    return socket.gethostname().replace(".", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
