"""The package's exceptions: one base class and the few kinds a caller acts on.

``BadInputError`` means the input (file, object, parameter) is wrong: fail at
once, exit code 2, never retried. ``TransientError`` wraps failures that a
retry may fix (I/O hiccups, device out of memory).
"""

from __future__ import annotations

from pathlib import Path


class NwbflowError(Exception):
    """Base class of every error nwbflow raises on purpose."""


class BadInputError(NwbflowError):
    """The input cannot be processed as given; says where and how to fix it.

    Parameters
    ----------
    message : what is wrong, in one sentence.
    path : the file concerned, if any.
    obj : the NWB object path inside the file (e.g. "acquisition/ElectricalSeries").
    fix : what the user should do about it.
    """

    def __init__(self, message: str, *, path: str | Path | None = None,
                 obj: str | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.obj = obj
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The error as one line: ``file: object: message. Fix: ...``."""
        where = ": ".join(part for part in (self.path, self.obj) if part)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text


class TransientError(NwbflowError):
    """A failure that may pass on retry (I/O, out of device memory)."""


class StageTimeoutError(NwbflowError):
    """A stage ran past its ``stage_timeout_s``; not retried (a retry would take as long)."""
