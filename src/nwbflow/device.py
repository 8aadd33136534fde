"""Resolve the compute device once, at the task boundary; the host allocator; out-of-memory helpers."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``count`` for the ``with`` block, then restored
    (the count: :meth:`nwbflow.params.ExecutionPolicy.cpu_threads`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: glibc ``mallopt`` settings of :func:`tune_host_allocator`: (option number, bytes).
HOST_ALLOCATOR_SETTINGS = {
    "M_TRIM_THRESHOLD": (-1, 256 << 20),  # free memory kept at the heap's top before it is given back
    "M_TOP_PAD": (-2, 64 << 20),  # extra memory taken from the OS whenever the heap grows
    "M_MMAP_THRESHOLD": (-3, 1 << 30),  # only blocks this large get their own mapping
}


@functools.cache
def tune_host_allocator() -> bool:
    """Let glibc's malloc reuse freed tensor memory instead of mapping fresh pages for every tensor.

    With glibc's defaults, blocks above its mapping threshold (a few MiB to
    32 MiB: activations, a chunk's snippets and scores) are mapped on
    allocation and unmapped on free, so torch ops on them start with
    thousands of page faults. Measured on the 2-core VM: MEDiCINe's fit runs
    at 14.2 ms per step with the defaults and 10.5 ms with these settings;
    ``sort_traces`` on the 300 s benchmark recording takes 15.4 s instead of
    30.1 s (10.4 million minor page faults -> 0.1 million; peak RSS 697 ->
    670 MB). Freed memory stays in the process up to ``M_TRIM_THRESHOLD``
    (256 MiB) at the heap's top; peak memory is unchanged.

    The settings govern the main thread's heap, where the flow runs its stages
    (Prefect calls them there); a worker thread's heap maps its blocks above
    64 MiB whatever the settings (measured: no gain for ``sort_traces`` in a
    thread). Process-wide and idempotent; does nothing (returns False) off
    glibc or where the user set malloc tunables in the environment
    (``GLIBC_TUNABLES`` or ``MALLOC_*_``), which then stay in charge.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        log.info("host allocator: malloc tunables set in the environment, left as they are")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    refused = [name for name, (option, value) in HOST_ALLOCATOR_SETTINGS.items() if mallopt(option, value) != 1]
    if refused:
        log.warning("host allocator: glibc refused %s", ", ".join(refused))
    return not refused


#: Least time (s) between two calls of ``malloc_trim`` by :func:`release_freed_host_memory` from chunk loops.
HOST_TRIM_INTERVAL_S = 30.0
_last_trim_s = [float("-inf")]


def release_freed_host_memory(min_interval_s: float = 0.0) -> bool:
    """Give the pages of freed heap blocks back to the OS (glibc's ``malloc_trim(0)``); True when called.

    :func:`tune_host_allocator` keeps tensors off fresh mappings, so a freed block returns to the heap, not
    to the OS, and only its top is trimmed. A stage's chunk loop leaves small long-lived arrays (the spikes
    found so far) between freed chunk-sized blocks: on the 300 s, 384-channel session the sorting stage's
    RSS reached 3.5 GB where its live data never exceeded ~1.5 GB, and it grew with the recording's length.
    ``malloc_trim(0)`` releases every free page inside the heap too; the pages fault back in when reused,
    so chunk loops call it at most every ``min_interval_s`` (:data:`HOST_TRIM_INTERVAL_S`; :class:`OomBackoff`
    does after a step) and a stage once when it ends. Does nothing off glibc.
    """
    now = time.monotonic()
    trim = _malloc_trim()
    if trim is None or now - _last_trim_s[0] < min_interval_s:
        return False
    _last_trim_s[0] = now
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, None elsewhere (looked up once: ``platform.libc_ver`` reads the executable)."""
    return ctypes.CDLL(None).malloc_trim if platform.libc_ver()[0] == "glibc" else None


#: What torch's CPU allocator says when the host has no memory left (it raises a plain RuntimeError).
HOST_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device (CUDA) or host out-of-memory error."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and HOST_ALLOCATION_FAILED in str(exc)


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
            except BaseException as exc:  # re-raised unless it is an OOM we can cure
                if not self.recoverable(exc, hi - lo):
                    raise
                failed = describe(exc)
            else:
                lo = hi
                release_freed_host_memory(HOST_TRIM_INTERVAL_S)
                continue
            # Outside the except block: the exception and the frames holding the chunk's tensors are gone.
            self.halve(lo, hi, failed)

    def recoverable(self, exc: BaseException, window_samples: int) -> bool:
        """Whether a step over ``window_samples`` that raised ``exc`` is retried at half the size: an
        out-of-memory error, and half the window is not below ``min_chunk_samples``."""
        return is_out_of_memory(exc) and window_samples // 2 >= self.min_chunk_samples

    def halve(self, lo: int, hi: int, failed: str) -> None:
        """After an out-of-memory error (``failed``: :func:`describe`) on ``[lo, hi)``: the chunk becomes
        half that window (kept for later calls), the device cache is freed, a warning is logged.

        :meth:`run` calls it; so does a loop that keeps several chunks in flight (the CPU streams of
        ``nwbflow.ephys.chunk_stream``), going on from ``lo`` after it.
        """
        self.chunk_samples = (hi - lo) // 2
        free_cached_memory(self.device)
        log.warning("out of memory on %s at a chunk of %d samples (%s); retrying from sample %d "
                    "with %d samples", self.device, hi - lo, failed, lo, self.chunk_samples)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, for logs."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
