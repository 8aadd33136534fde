"""Peaks: noise levels, locally exclusive threshold detection, center-of-mass localization.

Detection works on the preprocessed (usually whitened) traces. Each value is
expressed in units of its channel's threshold, ``z = s * x / (threshold_mad *
noise)`` with ``s = -1`` for negative peaks, ``+1`` for positive ones, and
``|x|`` for both. A sample ``(t, c)`` is a peak when

* ``z[t, c] >= 1`` (it crosses the threshold on its channel), and
* no sample ``(t', c')`` with ``|t' - t| <= sweep`` and ``c'`` within
  ``exclusion_radius_um`` of ``c`` has a larger ``z``, and
* no other such maximum (necessarily of equal ``z``) in that neighbourhood
  comes first in (sample, channel) order — ties go to the earliest sample,
  then the lowest channel index.

``sweep`` is ``round(sweep_ms * rate / 1000)`` samples, at least 1, so a peak
is always a local extremum in time on its own channel. Streaming over a binary
(:func:`iter_peaks`) reads ``2 * sweep + 1`` samples of margin on each side:
whether a core sample is a peak depends on maxima up to ``sweep`` away, whose
own status depends on samples another ``sweep`` away, so chunk boundaries
neither lose nor duplicate peaks.

Examples
--------
>>> import numpy as np
>>> from nwbflow.params import PeakParams
>>> traces = np.zeros((20, 2), dtype=np.float32)
>>> traces[10] = [-8.0, -6.0]
>>> found = detect_peaks(traces, np.array([[0.0, 0.0], [0.0, 20.0]]), 30000.0,
...                      PeakParams(threshold_mad=5.0), noise_levels=np.ones(2))
>>> found["sample_index"].tolist(), found["channel_index"].tolist(), found["amplitude"].tolist()
([10], [0], [-8.0])
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from nwbflow.ephys.chunks import chunk_ranges, open_binary, read_window, sample_chunk_ranges
from nwbflow.errors import BadInputError
from nwbflow.params import PeakParams

log = logging.getLogger(__name__)

MAD_TO_STD = 0.6744897501960817  # MAD of a standard normal distribution
_GATHER_BLOCK_ELEMENTS = 1 << 22  # bound on temporary (peaks x neighbours x channels) gathers


def noise_mad(binary_path: str | Path, num_channels: int, *, chunk_samples: int, num_chunks: int = 20,
              seed: int = 0) -> np.ndarray:
    """Per-channel noise level, ``MAD / 0.6745``, from sampled chunks of a float32 binary.

    Parameters
    ----------
    binary_path : path
        (num_samples, num_channels) float32 C-order raw binary.
    num_channels : int
    chunk_samples : int
        Samples per sampled chunk.
    num_chunks : int
        Chunks sampled (seeded, without replacement; all when fewer exist).
    seed : int

    Returns
    -------
    noise_levels : (num_channels,) float64
        In the binary's units; the median over chunks of each chunk's robust
        standard deviation (memory of one chunk).
    """
    source = open_binary(binary_path, num_channels)
    ranges = sample_chunk_ranges(source.num_samples, chunk_samples, num_chunks, seed)
    if len(ranges) == 0:
        raise BadInputError("cannot estimate noise of an empty binary", path=binary_path)
    levels = np.empty((len(ranges), num_channels))
    for i, (start, end) in enumerate(ranges):
        traces = source.get_traces(int(start), int(end))
        levels[i] = np.median(np.abs(traces - np.median(traces, axis=0)), axis=0) / MAD_TO_STD
    return np.median(levels, axis=0)


def sweep_samples(params: PeakParams, sampling_rate_hz: float) -> int:
    """Half-width of the temporal exclusion window (samples, at least 1)."""
    return max(int(round(params.sweep_ms * sampling_rate_hz / 1000.0)), 1)


def neighbour_table(channel_positions_um: np.ndarray, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Channels within ``radius_um`` of each channel, as a padded index table.

    Parameters
    ----------
    channel_positions_um : (num_channels, 2+) float, µm
        x, y in the first two columns.
    radius_um : float

    Returns
    -------
    neighbours : (num_channels, max_neighbours) int64
        Row ``c`` lists the neighbours of ``c`` (itself included); padded with ``c``.
    valid : (num_channels, max_neighbours) bool
        False on padding.
    """
    within = _neighbour_mask(channel_positions_um, radius_um)
    counts = within.sum(axis=1)
    valid = np.arange(counts.max())[None, :] < counts[:, None]
    neighbours = np.repeat(np.arange(len(within))[:, None], counts.max(), axis=1)
    neighbours[valid] = np.nonzero(within)[1]  # row-major: each row's neighbours in order
    return neighbours, valid


def detect_peaks(traces: np.ndarray, channel_positions_um: np.ndarray, sampling_rate_hz: float,
                 params: PeakParams, noise_levels: np.ndarray) -> dict[str, np.ndarray]:
    """Locally exclusive threshold detection on one chunk (rules in the module docstring).

    Parameters
    ----------
    traces : (num_samples, num_channels) float32
        Preprocessed traces (e.g. whitened units). Samples outside the array
        count as absent, so peaks within ``sweep`` of its ends lack context.
    channel_positions_um : (num_channels, 2+) float, µm
    sampling_rate_hz : float
    params : PeakParams
        threshold_mad, peak_sign, exclusion_radius_um, sweep_ms are used.
    noise_levels : (num_channels,) float
        Per-channel noise (same units as ``traces``), e.g. :func:`noise_mad`.

    Returns
    -------
    peaks : dict of (num_peaks,) arrays, in (sample, channel) order
        ``sample_index`` int64 (row of ``traces``), ``channel_index`` int32,
        ``amplitude`` float32 (signed value at the peak, units of ``traces``).
    """
    noise = np.asarray(noise_levels, dtype=np.float64)
    if noise.shape != (traces.shape[1],) or not np.all(np.isfinite(noise) & (noise > 0)):
        raise BadInputError(f"noise_levels must be {traces.shape[1]} positive finite values")
    half = sweep_samples(params, sampling_rate_hz)
    scale = (1.0 / (params.threshold_mad * noise)).astype(np.float32)
    z = _oriented(traces, params.peak_sign) * scale
    window_max = ndimage.maximum_filter1d(z, size=2 * half + 1, axis=0, mode="constant", cval=-np.inf)
    samples, channels = np.nonzero((z >= 1.0) & (z >= window_max))
    within = _neighbour_mask(channel_positions_um, params.exclusion_radius_um)
    neighbours, _ = neighbour_table(channel_positions_um, params.exclusion_radius_um)
    is_max = z[samples, channels] >= window_max[samples[:, None], neighbours[channels]].max(axis=1, initial=-np.inf)
    samples, channels = samples[is_max], channels[is_max]
    keep = ~_later_ties(samples, channels, half, within)
    samples, channels = samples[keep].astype(np.int64), channels[keep].astype(np.int32)
    return {"sample_index": samples, "channel_index": channels,
            "amplitude": traces[samples, channels].astype(np.float32)}


def _oriented(traces: np.ndarray, peak_sign: str) -> np.ndarray:
    """Traces turned so that the wanted polarity is positive (float32)."""
    x = np.asarray(traces, dtype=np.float32)
    if peak_sign == "neg":
        return -x
    if peak_sign == "pos":
        return x.copy()
    return np.abs(x)


def _neighbour_mask(channel_positions_um: np.ndarray, radius_um: float) -> np.ndarray:
    """(num_channels, num_channels) bool: pairs within ``radius_um``."""
    positions = np.asarray(channel_positions_um, dtype=np.float64)[:, :2]
    return np.linalg.norm(positions[:, None] - positions[None], axis=2) <= radius_um


def _later_ties(samples: np.ndarray, channels: np.ndarray, half: int, neighbour_mask: np.ndarray) -> np.ndarray:
    """True for each local maximum preceded, within its neighbourhood, by another one.

    ``samples, channels`` are in (sample, channel) order. Two local maxima in
    each other's neighbourhood have equal values, so this breaks ties. The loop
    runs over lags (at most the number of maxima within ``half`` samples), each
    step vectorized over all maxima.
    """
    later = np.zeros(samples.size, dtype=bool)
    if samples.size < 2:
        return later
    first_in_reach = np.searchsorted(samples, samples - half, side="left")
    for lag in range(1, int(np.max(np.arange(samples.size) - first_in_reach)) + 1):
        i = np.arange(lag, samples.size)
        in_reach = first_in_reach[i] <= i - lag
        later[i] |= in_reach & neighbour_mask[channels[i], channels[i - lag]]
    return later


def localize_center_of_mass(traces: np.ndarray, sample_index: np.ndarray, channel_index: np.ndarray,
                            channel_positions_um: np.ndarray, radius_um: float, *,
                            whitening_inverse: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude-weighted mean position of the channels around each peak.

    Parameters
    ----------
    traces : (num_samples, num_channels) float32
        The traces the peaks were detected on (whitened or filtered).
    sample_index : (num_peaks,) int
        Rows of ``traces``.
    channel_index : (num_peaks,) int
        Peak channels.
    channel_positions_um : (num_channels, 2+) float, µm
    radius_um : float
        Channels within this distance of the peak channel weigh in.
    whitening_inverse : (num_channels, num_channels) float or None
        When given, the values at the peak sample are first mapped back to
        the filtered scale, ``x = W^-1 @ x_white``, for the neighbourhood
        channels only, so whitening does not distort the locations.

    Returns
    -------
    x_um, y_um : (num_peaks,) float32, µm
        Weights are ``|x|`` at the peak sample on each neighbourhood channel.
    """
    positions = np.asarray(channel_positions_um, dtype=np.float64)[:, :2]
    neighbours, valid = neighbour_table(positions, radius_um)
    weights = np.empty((sample_index.size, neighbours.shape[1]))
    block = max(_GATHER_BLOCK_ELEMENTS // max(neighbours.size, 1), 1)
    for lo in range(0, sample_index.size, block):  # bounded memory; each block vectorized
        rows = np.asarray(traces[sample_index[lo:lo + block]], dtype=np.float64)
        idx = neighbours[channel_index[lo:lo + block]]
        if whitening_inverse is None:
            values = np.take_along_axis(rows, idx, axis=1)
        else:
            values = np.matmul(np.asarray(whitening_inverse)[idx], rows[:, :, None])[:, :, 0]
        weights[lo:lo + block] = np.abs(values) * valid[channel_index[lo:lo + block]]
    total = weights.sum(axis=1, keepdims=True)
    own = positions[channel_index]
    com = np.where(total > 0, np.einsum("pk,pkd->pd", weights, positions[neighbours[channel_index]])
                   / np.where(total > 0, total, 1.0), own)
    return com[:, 0].astype(np.float32), com[:, 1].astype(np.float32)


def iter_peaks(binary_path: str | Path, num_channels: int, channel_positions_um: np.ndarray,
               sampling_rate_hz: float, params: PeakParams, *, whitening_inverse: np.ndarray | None = None,
               noise_levels: np.ndarray | None = None, chunk_samples: int | None = None,
               seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Detect and localize peaks over a preprocessed float32 binary, one chunk at a time.

    Parameters
    ----------
    binary_path : path
        (num_samples, num_channels) float32 C-order raw binary (memory-mapped).
    num_channels : int
    channel_positions_um : (num_channels, 2+) float, µm
    sampling_rate_hz : float
    params : PeakParams
    whitening_inverse : (num_channels, num_channels) float or None
        ``PreprocessResult.whitening_inverse``, for localization on the filtered scale.
    noise_levels : (num_channels,) float or None
        Default: :func:`noise_mad` over 20 sampled chunks (``seed``).
    chunk_samples : int or None
        Core samples per chunk; default one second.
    seed : int

    Yields
    ------
    batch : dict of (n,) arrays, one per chunk (possibly empty), in time order
        ``sample_index`` int64 (absolute), ``channel_index`` int32,
        ``amplitude`` float32 (binary's units), ``x_um``, ``y_um`` float32.
    """
    chunk_samples = int(chunk_samples or max(int(round(sampling_rate_hz)), 1))
    source = open_binary(binary_path, num_channels, sampling_rate_hz)
    positions = np.asarray(channel_positions_um, dtype=np.float64)
    if positions.shape[0] != num_channels or positions.ndim != 2 or positions.shape[1] < 2:
        raise BadInputError(f"channel_positions_um has shape {positions.shape}, expected ({num_channels}, 2)")
    if whitening_inverse is not None and np.shape(whitening_inverse) != (num_channels, num_channels):
        raise BadInputError(f"whitening_inverse has shape {np.shape(whitening_inverse)}, "
                            f"expected ({num_channels}, {num_channels})")
    if noise_levels is None:
        noise_levels = noise_mad(binary_path, num_channels, chunk_samples=chunk_samples, seed=seed)
    margin = 2 * sweep_samples(params, sampling_rate_hz) + 1
    total = 0
    for start, end in chunk_ranges(source.num_samples, chunk_samples):
        window = read_window(source, int(start), int(end), margin)
        found = detect_peaks(window.traces, positions, sampling_rate_hz, params, noise_levels)
        rows = found["sample_index"]
        core = (rows >= window.context_before) & (rows < window.context_before + (end - start))
        rows, channels = rows[core], found["channel_index"][core]
        x_um, y_um = localize_center_of_mass(window.traces, rows, channels, positions,
                                             params.localization_radius_um, whitening_inverse=whitening_inverse)
        total += rows.size
        yield {"sample_index": rows + (start - window.context_before), "channel_index": channels,
               "amplitude": found["amplitude"][core], "x_um": x_um, "y_um": y_um}
    log.info("detected %d peaks in %d samples x %d channels", total, source.num_samples, num_channels)
