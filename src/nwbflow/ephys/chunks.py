"""Chunked, margin-aware access to traces: the source protocol and the chunk grid.

Every streaming stage reads ``[start, end)`` windows of a :class:`TraceSource`
plus the margin it needs on each side, computes, and keeps only the core. The
helpers here hold the arithmetic (grid, sampled chunks, clipped windows) so the
stages (``preprocess``, ``peaks``) and their later torch ports share it.

Examples
--------
>>> import numpy as np
>>> chunk_ranges(10, 4).tolist()
[[0, 4], [4, 8], [8, 10]]
>>> source = ArraySource(np.zeros((10, 2), dtype=np.float32), sampling_rate_hz=1000.0)
>>> window = read_window(source, 4, 8, margin_samples=3)
>>> window.traces.shape, window.context_before, window.context_after
((9, 2), 3, 2)
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from nwbflow.errors import BadInputError

#: Called after each chunk with (samples done, total samples); it may raise to stop the stage
#: (the task layer uses it for progress bars, progress artifacts and stage timeouts).
ProgressFn = Callable[[int, int], None]

#: Storage types of scratch binaries; every reader returns float32.
BINARY_DTYPES = ("float32", "float16")


@runtime_checkable
class TraceSource(Protocol):
    """Anything that serves windows of a multi-channel recording in microvolts.

    Attributes
    ----------
    num_samples : int
        Samples per channel in the recording.
    num_channels : int
        Channels (columns of every window).
    sampling_rate_hz : float
        Sampling rate (Hz).
    """

    num_samples: int
    num_channels: int
    sampling_rate_hz: float

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        """Return traces : (end_sample - start_sample, num_channels) float32, µV."""
        ...


class ArraySource:
    """A :class:`TraceSource` over an in-memory or memory-mapped array.

    Parameters
    ----------
    traces : (num_samples, num_channels) array, µV
        Kept by reference (a ``np.memmap`` stays on disk).
    sampling_rate_hz : float
        Sampling rate (Hz).
    """

    def __init__(self, traces: np.ndarray, sampling_rate_hz: float):
        if traces.ndim != 2:
            raise BadInputError(f"traces must be 2-D (num_samples, num_channels), got shape {traces.shape}")
        self._traces = traces
        self.num_samples = int(traces.shape[0])
        self.num_channels = int(traces.shape[1])
        self.sampling_rate_hz = float(sampling_rate_hz)

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        """Return a float32 copy of rows ``[start_sample, end_sample)``, µV."""
        return np.array(self._traces[start_sample:end_sample], dtype=np.float32)


class BinaryFileSource:
    """A (num_samples, num_channels) float32 or float16 raw binary read with explicit reads, not mmap.

    Pages of a memory map stay resident after they are read, so a mapped
    binary makes the process's RSS grow with the recording's length; explicit
    reads keep it at one chunk. Traces come back as float32 either way.
    """

    def __init__(self, path: Path, num_channels: int, num_samples: int, sampling_rate_hz: float,
                 dtype: str = "float32"):
        self.path, self.num_channels, self.num_samples = path, int(num_channels), int(num_samples)
        self.sampling_rate_hz = sampling_rate_hz
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._fd = os.open(path, os.O_RDONLY)

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        """(end - start, num_channels) float32 rows of the binary."""
        start, end = max(int(start_sample), 0), min(int(end_sample), self.num_samples)
        stored = np.empty((max(end - start, 0), self.num_channels), dtype=self.dtype)
        if stored.size:
            offset = start * self.num_channels * self.dtype.itemsize
            got = os.preadv(self._fd, [memoryview(stored).cast("B")], offset)
            if got != stored.nbytes:
                raise OSError(f"{self.path}: short read ({got} of {stored.nbytes} bytes)")
        if self.dtype == np.float32:
            return stored
        traces = np.empty(stored.shape, dtype=np.float32)
        torch.from_numpy(traces).copy_(torch.from_numpy(stored))  # vectorized (F16C); numpy's cast is 14x slower
        return traces

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def open_binary(path: str | Path, num_channels: int, sampling_rate_hz: float = float("nan"),
                dtype: str = "float32") -> ArraySource | BinaryFileSource:
    """Open a (num_samples, num_channels) C-order raw binary read-only as a float32 source.

    Parameters
    ----------
    path : path of the binary.
    num_channels : int
        Channels per sample (columns).
    sampling_rate_hz : float
        Sampling rate (Hz); NaN (unknown) for callers that do not need it.
    dtype : {"float32", "float16"}
        How the values are stored (little-endian).

    Raises
    ------
    BadInputError
        When the file size is not a whole number of rows, or ``dtype`` is not a binary type.
    """
    path = Path(path)
    if dtype not in BINARY_DTYPES:
        raise BadInputError(f"scratch binaries are stored as one of {BINARY_DTYPES}, not {dtype!r}", path=path)
    row_bytes = np.dtype(dtype).itemsize * int(num_channels)
    size = path.stat().st_size
    if num_channels < 1 or size % row_bytes:
        raise BadInputError(f"file of {size} bytes is not a whole number of {dtype} rows of "
                            f"{num_channels} channels", path=path,
                            fix="pass the num_channels and dtype the binary was written with")
    num_samples = size // row_bytes
    if num_samples == 0:
        return ArraySource(np.zeros((0, num_channels), dtype=np.float32), sampling_rate_hz)
    return BinaryFileSource(path, num_channels, num_samples, sampling_rate_hz, dtype)


def chunk_ranges(num_samples: int, chunk_samples: int) -> np.ndarray:
    """The chunk grid: consecutive ``[start, end)`` ranges covering the recording.

    Parameters
    ----------
    num_samples : int
        Samples in the recording.
    chunk_samples : int
        Samples per chunk (the last chunk may be shorter).

    Returns
    -------
    ranges : (num_chunks, 2) int64, samples
    """
    if chunk_samples < 1:
        raise BadInputError(f"chunk_samples must be >= 1, got {chunk_samples}")
    starts = np.arange(0, num_samples, chunk_samples, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + chunk_samples, num_samples)], axis=1)


def sample_chunk_ranges(num_samples: int, chunk_samples: int, num_chunks: int, seed: int) -> np.ndarray:
    """A seeded random subset of the chunk grid, without replacement, in time order.

    Parameters
    ----------
    num_samples, chunk_samples : int
        As :func:`chunk_ranges`.
    num_chunks : int
        Chunks wanted; all of the grid when it has fewer.
    seed : int
        Seed of ``np.random.default_rng``.

    Returns
    -------
    ranges : (min(num_chunks, grid size), 2) int64, samples
    """
    grid = chunk_ranges(num_samples, chunk_samples)
    if num_chunks >= len(grid):
        return grid
    chosen = np.random.default_rng(seed).choice(len(grid), size=num_chunks, replace=False)
    return grid[np.sort(chosen)]


class Window(NamedTuple):
    """A window read around a core ``[start, end)``, clipped to the recording.

    Attributes
    ----------
    traces : (context_before + end - start + context_after, num_channels) float32
    context_before, context_after : int
        Real samples read before and after the core (less than the margin
        asked for at the recording's ends).
    first_sample : int
        Index in the recording of ``traces[0]`` (the core starts at
        ``first_sample + context_before``); 0 for windows not read from a recording.
    """

    traces: np.ndarray
    context_before: int
    context_after: int
    first_sample: int = 0


def read_window(source: TraceSource, start: int, end: int, margin_samples: int) -> Window:
    """Read ``[start - margin, end + margin)`` clipped to ``[0, num_samples)``.

    Parameters
    ----------
    source : TraceSource
    start, end : int
        The core range (samples).
    margin_samples : int
        Context wanted on each side (samples).

    Returns
    -------
    Window
        The caller pads ``margin_samples - context_*`` samples itself where
        the recording ends (how depends on the stage).
    """
    lo = max(0, start - margin_samples)
    hi = min(source.num_samples, end + margin_samples)
    traces = source.get_traces(lo, hi)
    if traces.shape != (hi - lo, source.num_channels):
        raise BadInputError(f"source returned shape {traces.shape} for samples [{lo}, {hi}), "
                            f"expected {(hi - lo, source.num_channels)}")
    return Window(traces, start - lo, hi - end, lo)


class WindowPrefetcher:
    """:func:`read_window` that reads the next window on a background thread while the caller computes.

    After ``read(start, end)``, the next window is read in the background:
    ``[end, 2 end - start)`` clipped to the planned range holding
    ``[start, end)``, or the next planned range once that one is done (the
    plan defaults to the whole recording). A next call for exactly that range
    gets it without waiting; any other call waits for the read in flight,
    drops it and reads synchronously, so the source never serves two reads at
    once. An error of a read ahead is raised by the ``read`` that asks for it.

    Parameters
    ----------
    source : TraceSource
    margin_samples : int
        As :func:`read_window`.
    plan : (k, 2) int, optional
        The ranges the caller will read, in order (e.g. sampled chunks).
    """

    def __init__(self, source: TraceSource, margin_samples: int, plan: np.ndarray | None = None):
        self._source, self._margin = source, int(margin_samples)
        self._plan = None if plan is None else [(int(a), int(b)) for a, b in plan]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nwbflow-reader")
        self._ahead: tuple[int, int, Future] | None = None

    def read(self, start: int, end: int) -> Window:
        """The window around ``[start, end)``, as :func:`read_window`."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, end):
            window = ahead[2].result()
        else:
            _settle(ahead)
            window = read_window(self._source, start, end, self._margin)
        following = self._following(start, end)
        if following is not None:
            self._ahead = (*following, self._executor.submit(read_window, self._source, *following, self._margin))
        return window

    def _following(self, start: int, end: int) -> tuple[int, int] | None:
        """The next window of the same length inside the planned range holding ``[start, end)``, else the next range."""
        plan = self._plan if self._plan is not None else [(0, self._source.num_samples)]
        for position, (first, last) in enumerate(plan):
            if first <= start and end <= last:
                if end < last:
                    return end, min(2 * end - start, last)
                return plan[position + 1] if position + 1 < len(plan) else None
        return None

    def close(self) -> None:
        """Wait for (and drop) the read in flight; stop the thread."""
        ahead, self._ahead = self._ahead, None
        _settle(ahead)
        self._executor.shutdown(wait=True)

    def __enter__(self) -> WindowPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _settle(ahead: tuple[int, int, Future] | None) -> None:
    """Wait for a read ahead that will not be used; its result or error is dropped."""
    if ahead is not None and not ahead[2].cancel():
        ahead[2].exception()


class BackgroundWriter:
    """Append arrays' bytes to a binary file from one background thread, so writing overlaps computing.

    ``write(array)`` hands a C-contiguous array over (keep it unchanged
    until its ``written`` callback, if any, has been called) and returns at
    once unless ``depth`` writes are already pending, which bounds the memory
    held to ``depth + 1`` arrays. A write
    error is raised by the next ``write`` or by leaving the ``with`` block;
    leaving it because of another exception drops what is pending.

    Parameters
    ----------
    handle : binary file opened for writing (best unbuffered: ``open(path, "wb", buffering=0)``).
    depth : int
        Arrays that may wait while one is being written.

    Examples
    --------
    >>> import io
    >>> sink = io.BytesIO()
    >>> with BackgroundWriter(sink) as writer:
    ...     writer.write(np.arange(3, dtype="<i2"))
    >>> sink.getvalue()
    b'\\x00\\x00\\x01\\x00\\x02\\x00'
    """

    def __init__(self, handle: BinaryIO, depth: int = 1):
        self._handle = handle
        self._pending: queue.Queue = queue.Queue(maxsize=max(int(depth), 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="nwbflow-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._pending.get()) is not None:
            array, written = item
            if self._error is None:  # after an error, keep emptying the queue so that the producer never blocks
                try:
                    view = memoryview(array).cast("B")
                    while view:  # raw files may write less than asked
                        view = view[self._handle.write(view):]
                except BaseException as exc:  # noqa: BLE001 - handed to the producer
                    self._error = exc
            if written is not None:
                written(array)

    def write(self, array: np.ndarray, written: Callable[[np.ndarray], None] | None = None) -> None:
        """Queue ``array``'s bytes (C order) for writing; raises an earlier write's error.

        ``written(array)`` is called from the writer thread once the array is
        no longer needed (written, or dropped after an error).
        """
        if self._error is not None:
            raise self._error
        if not array.flags.c_contiguous:
            raise ValueError("BackgroundWriter needs C-contiguous arrays")
        self._pending.put((array, written))

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._error = self._error or exc  # the thread skips what is still queued
        self._pending.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
