"""Stream a recording through a chunk kernel into a raw binary, in order, atomically, memory bounded.

A *chunk kernel* maps a raw :class:`~nwbflow.ephys.chunks.Window` (core plus
context) to its processed core, ``kernel(window, out=None) -> (core, finite)``
with ``core`` a (n, num_channels) float32 tensor and ``finite`` a 0-d bool
tensor saying the raw window held no NaN/Inf; it has ``margin`` (samples of
context it wants on each side) and ``fresh_copy()`` (the same constants, its
own work buffers). :func:`stream_to_binary` drives it over the recording and
writes the cores to a (num_samples, num_channels) C-order file of float32 or
float16 (half the bytes: on this project's 2-core machines writing 2.8 GB of
float32 into the page cache costs ~5.6 CPU-seconds per minute of 384-channel
recording, more than a third of the preprocessing).

Output cores land in a small pool of host buffers (:class:`HostBuffers`)
reused chunk after chunk: no ~16 MB array is allocated (and paged in) per
chunk, and the memory held is a fixed number of chunks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from nwbflow.atomic import atomic_path
from nwbflow.device import OomBackoff, describe
from nwbflow.ephys.chunks import (BackgroundWriter, ProgressFn, TraceSource, Window, WindowPrefetcher, chunk_ranges,
                                  read_window)
from nwbflow.errors import BadInputError

__all__ = ["ChunkKernel", "HostBuffers", "check_finite", "refuse_non_finite", "stream_to_binary"]

log = logging.getLogger(__name__)


class ChunkKernel(Protocol):
    margin: int
    device: torch.device

    def __call__(self, window: Window, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fresh_copy(self) -> ChunkKernel: ...


class HostBuffers:
    """A fixed pool of (max_rows, num_channels) host arrays; ``take`` blocks until one is free.

    Parameters
    ----------
    count : int
        Buffers in the pool: at least the chunks that can be in flight at once.
    max_rows, num_channels : int
        Shape of each buffer; a chunk uses the first ``n <= max_rows`` rows.
    dtype : {"float32", "float16"}
    """

    def __init__(self, count: int, max_rows: int, num_channels: int, dtype: str = "float32"):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty((max_rows, num_channels), dtype=np.dtype(dtype).newbyteorder("<")))

    def take(self, rows: int) -> np.ndarray:
        """A C-contiguous (rows, num_channels) view of a free buffer."""
        buffer = self._free.get()
        if rows > len(buffer):
            self._free.put(buffer)
            raise ValueError(f"a chunk of {rows} rows does not fit buffers of {len(buffer)}")
        return buffer[:rows]

    def give_back(self, view: np.ndarray) -> None:
        """Return a view obtained from :meth:`take` (its base buffer goes back to the pool)."""
        self._free.put(view if view.base is None else view.base)


def check_finite(traces: np.ndarray, first_sample: int) -> None:
    """Raise BadInputError naming the sample range when a raw window holds NaN/Inf."""
    finite = np.isfinite(traces)
    if finite.all():
        return
    row, channel = np.argwhere(~finite)[0]
    raise BadInputError(f"raw traces hold NaN/Inf in samples [{first_sample}, {first_sample + len(traces)}) "
                        f"(first at sample {first_sample + int(row)}, channel index {int(channel)})",
                        fix="repair or exclude that segment of the recording before processing")


def refuse_non_finite(finite: torch.Tensor, window: Window, start: int) -> None:
    """After the caller's sync: when the device flagged the window, find and name the bad sample on the host."""
    if not bool(finite):
        check_finite(np.asarray(window.traces), start - window.context_before)


def _core_into(kernel: ChunkKernel, window: Window, host: np.ndarray) -> torch.Tensor:
    """Run the kernel with its core landing in ``host``; returns the ``finite`` flag (synced)."""
    target = torch.from_numpy(host)
    if kernel.device.type == "cpu" and target.dtype == torch.float32:
        return kernel(window, out=target)[1]
    core, finite = kernel(window)
    target.copy_(core)  # to the storage type; from a device, the one sync per chunk
    return finite


def stream_to_binary(source: TraceSource, out_path: Path, kernel: ChunkKernel, backoff: OomBackoff,
                     progress: ProgressFn | None, *, streams: int = 1, dtype: str = "float32") -> None:
    """Write every chunk's core in order to ``out_path``, atomically (``nwbflow.atomic.atomic_path``).

    One stream (any device): while chunk ``k`` is computed, chunk ``k - 1`` is
    written and chunk ``k + 1`` read by background threads. Several streams
    (CPU): chunks are computed concurrently, one torch thread each (torch's
    intra-op threads scale poorly on these small ops), and written strictly in
    order. Chunks have ``backoff.chunk_samples``; an out-of-memory error is
    ``backoff``'s to judge (:meth:`~nwbflow.device.OomBackoff.recoverable`): the
    chunks before the failed one are kept, the stream goes on from its start at
    half its size. A chunk that fails is never handed to the writer. A progress
    callback that raises stops the stream and leaves no file. ``dtype``
    ("float32" or "float16") is how the values are stored.
    """
    buffers = HostBuffers(max(streams, 1) + 2, backoff.chunk_samples, source.num_channels, dtype)

    def step(start: int, end: int) -> None:
        window = reader.read(start, end)
        host = buffers.take(end - start)
        try:
            refuse_non_finite(_core_into(kernel, window, host), window, start)
        except BaseException:
            buffers.give_back(host)
            raise
        writer.write(host, written=buffers.give_back)
        if progress is not None:
            progress(int(end), source.num_samples)

    with atomic_path(out_path) as partial, open(partial, "wb", buffering=0) as handle:
        if streams > 1:
            _write_concurrently(source, handle, kernel, buffers, backoff, progress, streams)
        else:
            with WindowPrefetcher(source, kernel.margin) as reader, BackgroundWriter(handle) as writer:
                backoff.run(step, 0, source.num_samples)


def _write_concurrently(source: TraceSource, handle, kernel: ChunkKernel, buffers: HostBuffers, backoff: OomBackoff,
                        progress: ProgressFn | None, streams: int) -> None:
    """Compute chunks on ``streams`` threads (a kernel each, reads serialized), write them in order.

    At most ``streams + 1`` chunks are in flight, so memory stays bounded by
    the chunk. torch's thread count is set to 1 for the duration and restored.
    After a recoverable out-of-memory error the chunks computed before the
    failed one are written and the stream restarts from it with ``backoff``'s
    halved chunk.
    """
    kernels: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(streams):
        kernels.put(kernel.fresh_copy())
    read_lock = threading.Lock()

    def compute(start: int, end: int) -> np.ndarray:
        own, host = kernels.get(), buffers.take(end - start)
        try:
            with read_lock:
                window = read_window(source, start, end, own.margin)
            refuse_non_finite(_core_into(own, window, host), window, start)
            return host
        except BaseException:
            buffers.give_back(host)
            raise
        finally:
            kernels.put(own)

    threads, written = torch.get_num_threads(), 0
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=streams) as pool:
            while written < source.num_samples:
                failure = _stream_from(written, pool, compute, handle, buffers, backoff.chunk_samples, progress,
                                       source.num_samples, streams)
                if failure is None:
                    break
                written, end, exc = failure
                if not backoff.recoverable(exc, end - written):
                    raise exc
                backoff.halve(written, end, describe(exc))
    finally:
        torch.set_num_threads(threads)


def _stream_from(start: int, pool: ThreadPoolExecutor, compute, handle, buffers: HostBuffers, chunk_samples: int,
                 progress: ProgressFn | None, total: int,
                 streams: int) -> tuple[int, int, BaseException] | None:
    """Chunks of ``chunk_samples`` from ``start`` to the end, computed on the pool and written in order.

    Returns None when all are written, else ``(start, end, error)`` of the first chunk that failed (every
    chunk before it is written; those after it are dropped).
    """
    pending: deque = deque()
    try:
        for lo, hi in chunk_ranges(total - start, chunk_samples) + start:
            pending.append((int(lo), int(hi), pool.submit(compute, int(lo), int(hi))))
            while len(pending) > streams or (pending and hi == total):
                lo_done, hi_done, future = pending[0]
                try:
                    host = future.result()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, which asks the backoff
                    return lo_done, hi_done, exc
                pending.popleft()
                try:
                    host.tofile(handle)
                finally:
                    buffers.give_back(host)
                if progress is not None:
                    progress(hi_done, total)
        return None
    finally:
        _drop_pending(pending, buffers)


def _drop_pending(pending: deque, buffers: HostBuffers) -> None:
    """Wait for chunks still in flight and free the buffers of those that were computed (not written)."""
    for _, _, future in pending:
        if future.exception() is None:
            buffers.give_back(future.result())
    pending.clear()
