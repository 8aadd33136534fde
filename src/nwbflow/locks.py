"""Exclusive locks on hidden lock files, so that two runs never write one output or one stage at once.

A lock is ``flock(LOCK_EX)`` on a small lock file. The holder removes the
file when it lets go (still holding the lock, so a run waiting on the removed
file notices, and locks the path's new file instead), so no lock file stays
behind a run that ended. A killed run's file stays, but its lock does not: the
kernel drops it with the process (SIGKILL included), so the next run takes it
at once and removes it in its turn. The file holds the holder's pid, host and
start time (UTC), for the busy message only.

Taking a lock the same thread already holds nests (the nightly flow claims a
session's output, then runs ``process_session``, which takes the same lock);
other threads and other processes are excluded. POSIX only, like
``nwbflow.atomic``; on NFS, Linux maps ``flock`` to byte-range locks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from nwbflow.errors import OutputBusyError

log = logging.getLogger(__name__)

#: Locks this process holds: (lock file, thread id) -> nesting depth.
_held: dict[tuple[str, int], int] = {}


@contextmanager
def exclusive_lock(lock_file: str | Path, *, blocking: bool = True,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_file`` for the ``with`` block; the file is removed at the end.

    Parameters
    ----------
    lock_file : the lock file; created when missing. Its folder must exist.
    blocking : wait until the lock is free; when False a held lock raises ``BlockingIOError`` at once.
    on_wait : called with the holder's note ("pid 123 on host since ...") before waiting on a held lock.
    """
    path = Path(lock_file).absolute()
    key = (str(path), threading.get_ident())
    if key in _held:  # nested in this thread: already ours
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    fd = _acquire(path, blocking, on_wait)
    _held[key] = 1
    try:
        _write_note(fd)
        yield path
    finally:
        del _held[key]
        try:
            path.unlink(missing_ok=True)  # before unlocking: whoever waits on this file sees it is gone
        except OSError as exc:
            log.warning("could not remove the lock file %s (%s); it does not block the next run", path, exc)
        os.close(fd)  # releases the lock


def _acquire(path: Path, blocking: bool, on_wait: Callable[[str], None] | None) -> int:
    """An open descriptor of the file at ``path``, holding its lock."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    raise
                if on_wait is not None and not waited:
                    on_wait(holder_note(path))
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_at(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed this file on letting go: lock the one now at the path


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed, not replaced)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)


def _write_note(fd: int) -> None:
    note = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)


def holder_note(lock_file: str | Path) -> str:
    """Who holds (or last held) a lock, as its holder wrote it; "" when unknown."""
    try:
        return Path(lock_file).read_text().strip()
    except OSError:
        return ""


def output_lock_file(out_path: str | Path) -> Path:
    """The lock file of an output: ``.<name>.nwbflow.lock`` beside it (hidden)."""
    out = Path(out_path).absolute()
    return out.with_name(f".{out.name}.nwbflow.lock")


@contextmanager
def output_lock(out_path: str | Path) -> Iterator[Path]:
    """Claim an output for the ``with`` block, without waiting.

    Raises ``OutputBusyError`` (naming the output, the lock file and its
    holder) when another run holds it. The output's folder must exist.
    """
    lock_file = output_lock_file(out_path)
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(lock_file, blocking=False))
        except BlockingIOError as exc:
            raise OutputBusyError(Path(out_path).absolute(), lock_file, holder_note(lock_file)) from exc
        yield lock_file


def directory_lock_file(directory: str | Path) -> Path:
    """The lock file of a work directory: ``.<name>.lock`` beside it (hidden)."""
    directory = Path(directory).absolute()
    return directory.with_name(f".{directory.name}.lock")


@contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Be alone on a work directory for the ``with`` block, waiting (with a warning) while another run is."""

    def waiting(holder: str) -> None:
        log.warning("waiting for another run writing %s (%s)", directory, holder or "holder unknown")

    with exclusive_lock(directory_lock_file(directory), on_wait=waiting) as lock_file:
        yield lock_file
