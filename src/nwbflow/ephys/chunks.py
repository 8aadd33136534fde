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

from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from nwbflow.errors import BadInputError

#: Called after each chunk with (samples done, total samples); it may raise to stop the stage
#: (the task layer uses it for progress bars, progress artifacts and stage timeouts).
ProgressFn = Callable[[int, int], None]

BYTES_PER_SAMPLE = 4  # float32 scratch binaries


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


def open_binary(path: str | Path, num_channels: int, sampling_rate_hz: float = float("nan")) -> ArraySource:
    """Open a (num_samples, num_channels) float32 C-order raw binary read-only as a source.

    Parameters
    ----------
    path : path of the binary.
    num_channels : int
        Channels per sample (columns).
    sampling_rate_hz : float
        Sampling rate (Hz); NaN (unknown) for callers that do not need it.

    Raises
    ------
    BadInputError
        When the file size is not a whole number of float32 samples.
    """
    path = Path(path)
    row_bytes = BYTES_PER_SAMPLE * int(num_channels)
    size = path.stat().st_size
    if num_channels < 1 or size % row_bytes:
        raise BadInputError(f"file of {size} bytes is not a whole number of float32 rows of "
                            f"{num_channels} channels", path=path,
                            fix="pass the num_channels the binary was written with")
    num_samples = size // row_bytes
    if num_samples == 0:
        return ArraySource(np.zeros((0, num_channels), dtype=np.float32), sampling_rate_hz)
    traces = np.memmap(path, dtype=np.float32, mode="r", shape=(num_samples, num_channels))
    return ArraySource(traces, sampling_rate_hz)


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
    """

    traces: np.ndarray
    context_before: int
    context_after: int


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
    return Window(traces, start - lo, hi - end)
