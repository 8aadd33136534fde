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

    def __reduce__(self):  # raised in a child process (the NWB export), re-raised whole in the parent
        return _rebuild_bad_input, (self.message, self.path, self.obj, self.fix)

    def one_line(self) -> str:
        """The error as one line: ``file: object: message. Fix: ...``."""
        where = ": ".join(part for part in (self.path, self.obj) if part)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text


def _rebuild_bad_input(message: str, path: str | None, obj: str | None, fix: str | None) -> BadInputError:
    return BadInputError(message, path=path, obj=obj, fix=fix)


class TransientError(NwbflowError):
    """A failure that may pass on retry (I/O, out of device memory)."""


class StageTimeoutError(NwbflowError):
    """A stage ran past its ``stage_timeout_s``; not retried (a retry would take as long)."""


class OutputWriteError(NwbflowError):
    """Writing an output failed (disk full, quota, I/O error); nothing partial was left, the input is unchanged."""


class PartialResultsError(NwbflowError):
    """Some series of a session failed and the others did not: the processed file was written with what
    succeeded, a provenance row per failed series says why (CLI exit code 5; nightly retries the session
    only when its file or parameters change).

    Parameters
    ----------
    summary : the run's summary (``process_session``'s), with ``failed``: series, stage and error of each.
    """

    def __init__(self, summary: dict):
        self.summary = summary
        failed = "; ".join(f"{f['series']} ({f['stage']}: {f['error']})" for f in summary["failed"])
        super().__init__(f"{len(summary['failed'])} series failed: {failed}; {summary['output']} holds the "
                         "others' results")

    def __reduce__(self):
        return (type(self), (self.summary,))


class OutputBusyError(NwbflowError):
    """Another nwbflow run holds the output's lock: nothing was done; not retried (CLI exit code 4).

    Parameters
    ----------
    output : the output file asked for.
    lock_file : its lock file (``.<name>.nwbflow.lock`` beside it).
    holder : the holder's note ("pid 123 on host since ..."), "" when unknown.
    """

    def __init__(self, output: str | Path, lock_file: str | Path, holder: str = ""):
        self.output, self.lock_file, self.holder = str(output), str(lock_file), holder
        held_by = f", held by {holder}" if holder else ""
        super().__init__(f"another nwbflow run is writing {output} (lock file {lock_file}{held_by}); "
                         "wait for it or choose another output")
