"""Peaks in torch: noise levels, locally exclusive threshold detection, streaming with localization.

Detection works on the preprocessed (usually whitened) traces. Each value is
expressed in units of its channel's threshold, ``z = s * x / (threshold_mad *
noise)`` with ``s = -1`` for negative peaks, ``+1`` for positive ones, and
``|x|`` for both. A sample ``(t, c)`` is a peak when

* ``z[t, c] >= 1`` (it crosses the threshold on its channel), and
* no sample ``(t', c')`` with ``|t' - t| <= sweep`` and ``c'`` within
  ``exclusion_radius_um`` of ``c`` has a larger ``z`` (it is a *neighbourhood
  maximum*), and
* no other neighbourhood maximum (necessarily of equal ``z``) in that
  neighbourhood comes first in (sample, channel) order — ties go to the
  earliest sample, then the lowest channel index.

``sweep`` is ``round(sweep_ms * rate / 1000)`` samples, at least 1, so a peak
is always a local extremum in time on its own channel. Samples outside the
traces count as absent.

The kernel never builds (time × channels × neighbours) tensors, nor even a
dense ``z``. Crossings are found on the traces against a per-channel onset
(the least value whose ``z`` rounds to ``>= 1``, so the test is exactly
``z >= 1``) with one ``nonzero``; they are few. Each crossing is compared with
its own channel over ``± sweep`` (a (crossings × window) gather), the
survivors with every neighbour channel over ``± sweep`` (a (candidates ×
neighbours × window) gather), and ties are settled on a boolean (channels ×
samples) map of the neighbourhood maxima. ``z`` is computed only at gathered
samples, with the same float32 arithmetic as a dense ``z`` would use.

Streaming over a recording (:func:`iter_peaks`) reads ``2 * sweep + 1`` samples
of margin on each side: whether a core sample is a peak depends on maxima up
to ``sweep`` away, whose own status depends on samples another ``sweep`` away,
so chunk boundaries neither lose nor duplicate peaks. Peaks are then located
(:mod:`nwbflow.ephys.localize`) on the same device.

Everything runs on the ``device`` passed in; tensors are created there. Per
chunk the host waits on the device only to size the three sparse sets
(crossings, own-channel maxima, neighbourhood maxima) and to fetch the batch.

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
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.device import OomBackoff
from nwbflow.ephys.chunks import TraceSource, chunk_ranges, read_window
from nwbflow.ephys.localize import (LocalizationTables, localize_center_of_mass,
                                    localize_monopolar_triangulation, localize_peaks, neighbour_table)
from nwbflow.ephys.noise import noise_levels as measured_noise_levels
from nwbflow.errors import BadInputError
from nwbflow.params import DEFAULT_CHUNKS, PeakParams

__all__ = ["DetectionTables", "detect_peaks", "iter_peaks", "localize_center_of_mass",
           "localize_monopolar_triangulation", "localize_peaks", "neighbour_table", "sweep_samples"]

log = logging.getLogger(__name__)

def sweep_samples(sweep_ms: float, sampling_rate_hz: float) -> int:
    """Half-width of the temporal exclusion window (samples, at least 1)."""
    return max(int(round(sweep_ms * sampling_rate_hz / 1000.0)), 1)


@dataclass(frozen=True)
class DetectionTables:
    """Device-resident constants of detection for one run (see :meth:`build`, :meth:`for_peaks`).

    Attributes
    ----------
    scale : (num_channels,) float32 tensor
        ``1 / (threshold_mad * noise)``: ``z = oriented traces * scale``.
    onset : (num_channels,) float32 tensor
        The least oriented value whose ``z`` (rounded to float32) is ``>= 1``,
        so crossings are found on the traces without computing ``z``.
    neighbours : (num_channels, K) int64 tensor
        :func:`neighbour_table` at ``exclusion_radius_um`` (padding repeats the channel).
    half : int
        :func:`sweep_samples`.
    peak_sign : str
    """

    scale: torch.Tensor
    onset: torch.Tensor
    neighbours: torch.Tensor
    half: int
    peak_sign: str

    @classmethod
    def build(cls, channel_positions_um: np.ndarray, sampling_rate_hz: float, *, threshold: float, peak_sign: str,
              exclusion_radius_um: float, sweep_ms: float, noise_levels: np.ndarray,
              device: torch.device) -> DetectionTables:
        """Tables for a threshold (in noise levels), polarity, exclusion radius (µm) and half-sweep (ms)."""
        positions = np.asarray(channel_positions_um, dtype=np.float64)
        noise = np.asarray(noise_levels, dtype=np.float64)
        if noise.shape != (len(positions),) or not np.all(np.isfinite(noise) & (noise > 0)):
            raise BadInputError(f"noise_levels must be {len(positions)} positive finite values, "
                                f"got shape {noise.shape}")
        scale = (1.0 / (threshold * noise)).astype(np.float32)
        neighbours, _ = neighbour_table(positions, exclusion_radius_um)
        return cls(torch.as_tensor(scale, device=device), torch.as_tensor(_onset(scale), device=device),
                   torch.as_tensor(neighbours, device=device), sweep_samples(sweep_ms, sampling_rate_hz), peak_sign)

    @classmethod
    def for_peaks(cls, channel_positions_um: np.ndarray, sampling_rate_hz: float, params: PeakParams,
                  noise_levels: np.ndarray, device: torch.device) -> DetectionTables:
        """Tables of the peaks stage: threshold, polarity, exclusion and sweep of ``params``."""
        return cls.build(channel_positions_um, sampling_rate_hz, threshold=params.threshold_mad,
                         peak_sign=params.peak_sign, exclusion_radius_um=params.exclusion_radius_um,
                         sweep_ms=params.sweep_ms, noise_levels=noise_levels, device=device)


def _onset(scale: np.ndarray) -> np.ndarray:
    """Per channel, the least float32 ``v`` with ``float32(v * scale) >= 1`` (exact, as the kernels round)."""
    onset = (1.0 / scale).astype(np.float32)
    for _ in range(8):  # 1 / scale is within an ulp or two of the answer
        onset = np.where(onset * scale < 1, np.nextafter(onset, np.float32(np.inf)), onset)
        below = np.nextafter(onset, np.float32(-np.inf))
        onset = np.where(below * scale >= 1, below, onset)
    return onset


def neighbourhood_maxima(traces: torch.Tensor, tables: DetectionTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold crossings that are maxima of their neighbourhood (rules 1-2 of the module docstring).

    Parameters
    ----------
    traces : (num_samples, num_channels) float32 tensor
    tables : DetectionTables (on the traces' device)

    Returns
    -------
    sample_index, channel_index : (num_maxima,) int64 tensors, in (sample, channel) order
    """
    traces = traces.contiguous()
    if tables.peak_sign == "neg":
        crossing = traces <= -tables.onset
    else:
        crossing = (traces.abs() if tables.peak_sign == "both" else traces) >= tables.onset
    samples, channels = torch.nonzero(crossing, as_tuple=True)  # the few crossings, in (sample, channel) order
    offsets = torch.arange(-tables.half, tables.half + 1, device=traces.device)
    # Own channel first (a cheap filter: most crossings are flanks of a maximum), then the neighbourhood.
    peak = threshold_units(traces[samples, channels], tables.scale[channels], tables.peak_sign)
    keep = peak >= _window_z(traces, samples, channels.view(-1, 1), offsets, tables).amax(dim=(1, 2))
    samples, channels, peak = samples[keep], channels[keep], peak[keep]
    around = _window_z(traces, samples, tables.neighbours[channels], offsets, tables)  # (P, K, 2 * half + 1)
    is_max = peak >= around.amax(dim=(1, 2))
    return samples[is_max], channels[is_max]


def threshold_units(values: torch.Tensor, scale: torch.Tensor, peak_sign: str) -> torch.Tensor:
    """``z``: values oriented to the wanted polarity, times their channel's ``scale`` (float32)."""
    if peak_sign == "neg":
        return values * -scale  # exactly -(values * scale): IEEE negation commutes with rounding
    return (values.abs() if peak_sign == "both" else values) * scale


def _window_z(traces: torch.Tensor, samples: torch.Tensor, channels: torch.Tensor, offsets: torch.Tensor,
              tables: DetectionTables) -> torch.Tensor:
    """``z[samples + offset, channel]`` for (P, K) channels and W offsets -> (P, K, W); -inf outside."""
    rows = samples.view(-1, 1, 1) + offsets.view(1, 1, -1)
    inside = (rows >= 0) & (rows < traces.shape[0])
    columns = channels.unsqueeze(2)
    values = traces.view(-1)[rows.clamp(0, traces.shape[0] - 1) * traces.shape[1] + columns]
    return threshold_units(values, tables.scale[columns], tables.peak_sign).masked_fill(~inside, -torch.inf)


def first_of_ties(samples: torch.Tensor, channels: torch.Tensor, num_samples: int,
                  tables: DetectionTables) -> torch.Tensor:
    """True for each neighbourhood maximum that no other one in its neighbourhood precedes (rule 3).

    Parameters
    ----------
    samples, channels : (num_maxima,) int64 tensors
        From :func:`neighbourhood_maxima` on traces of ``num_samples`` rows.
    num_samples : int
    tables : DetectionTables

    Returns
    -------
    first : (num_maxima,) bool tensor
    """
    half = tables.half
    maxima = torch.zeros((tables.scale.shape[0], num_samples + half), dtype=torch.bool, device=samples.device)
    maxima[channels, samples + half] = True  # column t + half holds sample t; the first half columns are empty
    around = tables.neighbours[channels]  # (num_maxima, K)
    column = (samples + half).unsqueeze(1)
    preceded = (maxima[around, column] & (around < channels.unsqueeze(1))).any(dim=1)
    for lag in range(1, half + 1):
        preceded |= maxima[around, column - lag].any(dim=1)
    return ~preceded


def detect_peaks(traces: np.ndarray | torch.Tensor, channel_positions_um: np.ndarray, sampling_rate_hz: float,
                 params: PeakParams, noise_levels: np.ndarray, *,
                 device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Locally exclusive threshold detection on one chunk (rules in the module docstring).

    Parameters
    ----------
    traces : (num_samples, num_channels) float32 array or tensor
        Preprocessed traces (e.g. whitened units). Samples outside the array
        count as absent, so peaks within ``sweep`` of its ends lack context.
    channel_positions_um : (num_channels, 2+) float, µm
    sampling_rate_hz : float
    params : PeakParams
        threshold_mad, peak_sign, exclusion_radius_um, sweep_ms are used.
    noise_levels : (num_channels,) float
        Per-channel noise (same units as ``traces``), e.g. :func:`nwbflow.ephys.noise.noise_levels`.
    device : torch.device or str

    Returns
    -------
    peaks : dict of (num_peaks,) arrays, in (sample, channel) order
        ``sample_index`` int64 (row of ``traces``), ``channel_index`` int32,
        ``amplitude`` float32 (signed value at the peak, units of ``traces``).
    """
    device = torch.device(device)
    traces = torch.as_tensor(traces, dtype=torch.float32).to(device)
    if traces.ndim != 2 or traces.shape[1] != len(channel_positions_um):
        raise BadInputError(f"traces have shape {tuple(traces.shape)}, expected (num_samples, "
                            f"{len(channel_positions_um)}) to match channel_positions_um")
    tables = DetectionTables.for_peaks(channel_positions_um, sampling_rate_hz, params, noise_levels, device)
    samples, channels = neighbourhood_maxima(traces, tables)
    first = first_of_ties(samples, channels, traces.shape[0], tables)
    samples, channels = samples[first], channels[first]
    return {"sample_index": samples.cpu().numpy(), "channel_index": channels.to(torch.int32).cpu().numpy(),
            "amplitude": traces[samples, channels].cpu().numpy()}


def iter_peaks(source: TraceSource, channel_positions_um: np.ndarray, params: PeakParams, *,
               whitening_inverse: np.ndarray | None = None, noise_levels: np.ndarray | None = None,
               chunk_samples: int | None = None, seed: int = 0,
               device: torch.device | str = "cpu") -> Iterator[dict[str, np.ndarray]]:
    """Detect and localize peaks over a preprocessed recording, one chunk at a time.

    Parameters
    ----------
    source : TraceSource
        (num_samples, num_channels) preprocessed traces, e.g. ``PreprocessedRecording.open()``.
    channel_positions_um : (num_channels, 2+) float, µm
    params : PeakParams
        ``localization`` picks the method (:data:`nwbflow.ephys.localize.LOCALIZATION_METHODS`),
        over channels within ``localization_radius_um``.
    whitening_inverse : (num_channels, num_channels) float or None
        ``PreprocessedRecording.whitening_inverse``, for localization on the filtered scale.
    noise_levels : (num_channels,) float or None
        Default: :func:`nwbflow.ephys.noise.noise_levels` over ``params.noise_sample_chunks`` sampled
        chunks of ``params.noise_sample_duration_s`` (``seed``).
    chunk_samples : int or None
        Core samples per chunk (one batch each); default ``ChunkSizes.peaks_s`` of the execution
        policy. When the device runs out of memory the chunk is computed in halves (and later ones
        at the reduced size, :class:`nwbflow.device.OomBackoff`), from the same sample, so batches
        keep their ranges.
    seed : int
    device : torch.device or str
        Where the kernels run; resolve ``"auto"`` before calling.

    Yields
    ------
    batch : dict of (n,) numpy arrays, one per chunk (possibly empty), in time order
        ``sample_index`` int64 (absolute), ``channel_index`` int32,
        ``amplitude`` float32 (source units), ``x_um``, ``y_um`` float32.
    """
    device = torch.device(device)
    rate_hz = float(source.sampling_rate_hz)
    chunk_samples = int(chunk_samples or max(int(round(DEFAULT_CHUNKS.peaks_s * rate_hz)), 1))
    positions = np.asarray(channel_positions_um, dtype=np.float64)
    if positions.shape[0] != source.num_channels or positions.ndim != 2 or positions.shape[1] < 2:
        raise BadInputError(f"channel_positions_um has shape {positions.shape}, expected "
                            f"({source.num_channels}, 2)")
    if noise_levels is None:
        # An odd window: each median is then one order statistic (one kthvalue, not three passes).
        noise_window = max(int(round(params.noise_sample_duration_s * rate_hz)), 1) | 1
        noise_levels = measured_noise_levels(source, chunk_samples=noise_window, num_chunks=params.noise_sample_chunks,
                                             seed=seed, device=device)
    detection = DetectionTables.for_peaks(positions, rate_hz, params, noise_levels, device)
    localization = LocalizationTables.build(positions, params.localization_radius_um, whitening_inverse, device)
    margin = 2 * detection.half + 1
    backoff = OomBackoff(chunk_samples, device=device)
    total = 0
    for start, end in chunk_ranges(source.num_samples, chunk_samples):
        parts: list[dict[str, np.ndarray]] = []

        def step(lo: int, hi: int, parts: list = parts) -> None:
            parts.append(_window_peaks(source, lo, hi, margin, detection, localization, params.localization))

        backoff.run(step, int(start), int(end))
        batch = parts[0] if len(parts) == 1 else {key: np.concatenate([part[key] for part in parts])
                                                  for key in parts[0]}
        total += batch["sample_index"].size
        yield batch
    log.info("detected %d peaks in %d samples x %d channels on %s", total, source.num_samples, source.num_channels,
             device)


def _window_peaks(source: TraceSource, start: int, end: int, margin: int, detection: DetectionTables,
                  localization: LocalizationTables, method: str) -> dict[str, np.ndarray]:
    """Peaks in ``[start, end)`` (read with ``margin`` on both sides), located; absolute sample indices."""
    window = read_window(source, start, end, margin)
    traces = torch.from_numpy(window.traces).to(detection.scale.device)
    samples, channels = neighbourhood_maxima(traces, detection)
    first = first_of_ties(samples, channels, traces.shape[0], detection)
    xy = localization.localize(traces, samples, channels, method)  # every maximum: ties are rare, no extra sync
    found = {"sample_index": samples - window.context_before, "channel_index": channels.to(torch.int32),
             "amplitude": traces[samples, channels], "x_um": xy[:, 0], "y_um": xy[:, 1], "first": first}
    found = {key: value.cpu().numpy() for key, value in found.items()}
    keep = found.pop("first") & (found["sample_index"] >= 0) & (found["sample_index"] < end - start)
    found = {key: value[keep] for key, value in found.items()}
    found["sample_index"] += start
    return found
