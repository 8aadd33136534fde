"""Resolve the compute device once, at the task boundary; out-of-memory helpers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)


def resolve_device(requested: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda[:N]" into a torch.device, checking it exists."""
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInputError("device 'cuda' was asked for but no CUDA device is available",
                                fix="use --device cpu or auto")
    log.info("compute device: %s", device)
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device (CUDA) or host out-of-memory error."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))


def free_cached_memory(device: torch.device | str) -> None:
    """Return the caching allocator's unused blocks on a CUDA ``device`` to the driver; no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class OomBackoff:
    """Cover sample ranges with consecutive chunks, halving the chunk on out-of-memory errors.

    ``run(step, start, stop)`` calls ``step(lo, hi)`` on consecutive windows of
    at most ``chunk_samples`` covering ``[start, stop)``. When a step raises an
    out-of-memory error (:func:`is_out_of_memory`), the device cache is freed,
    the chunk becomes half the failed window, and the same ``lo`` is tried
    again; below ``min_chunk_samples`` the error is raised. A step must
    therefore leave no trace when it fails (write its output last, at a
    position given by ``lo``). The reduced size is kept for later ``run``
    calls, so a second pass over the recording starts at a size that fits.

    Parameters
    ----------
    chunk_samples : int
        Samples per step to start with (>= 1).
    min_chunk_samples : int
        Smallest chunk worth running (e.g. twice a filter margin); a step that
        fails at a size whose half is below it re-raises its error.
    device : torch.device or str
        Whose cache to free after an out-of-memory error.

    Examples
    --------
    >>> seen = []
    >>> def step(lo, hi):
    ...     if hi - lo > 4:
    ...         raise torch.cuda.OutOfMemoryError("fake")
    ...     seen.append((lo, hi))
    >>> backoff = OomBackoff(10, min_chunk_samples=2)
    >>> backoff.run(step, 0, 12)
    >>> seen, backoff.chunk_samples
    ([(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)], 2)
    """

    def __init__(self, chunk_samples: int, *, min_chunk_samples: int = 1, device: torch.device | str = "cpu"):
        if chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
        self.chunk_samples = int(chunk_samples)
        self.min_chunk_samples = max(int(min_chunk_samples), 1)
        self.device = torch.device(device)

    def run(self, step: Callable[[int, int], None], start: int, stop: int) -> None:
        """Call ``step(lo, hi)`` over ``[start, stop)`` in order, adapting the chunk on OOM."""
        lo = int(start)
        while lo < stop:
            hi = min(lo + self.chunk_samples, int(stop))
            try:
                step(lo, hi)
            except BaseException as exc:  # noqa: BLE001 - re-raised unless it is an OOM we can cure
                if not is_out_of_memory(exc) or (hi - lo) // 2 < self.min_chunk_samples:
                    raise
                failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                lo = hi
                continue
            # Outside the except block: the exception and the frames holding the chunk's tensors are gone.
            self.chunk_samples = (hi - lo) // 2
            free_cached_memory(self.device)
            log.warning("out of memory on %s at a chunk of %d samples (%s); retrying from sample %d "
                        "with %d samples", self.device, hi - lo, failed, lo, self.chunk_samples)
