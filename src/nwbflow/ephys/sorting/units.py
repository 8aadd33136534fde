"""What is reported of each unit: waveforms on the filtered (unwhitened) scale, amplitudes, quality metrics.

Sorting runs on whitened traces ``x_w = W x``; waveforms are reported in µV on the filtered scale,
``x = W^-1 x_w``, from a random subset of each unit's spikes read back from the traces
(:class:`UnwhitenedSource`); a SpikeInterface sorter's spikes are read from the raw series
preprocessed on demand without whitening. :func:`describe_units` computes all of it.

Metrics (per unit; ``duration_s`` the recording's length):

- ``firing_rate`` : spikes / duration_s (Hz)
- ``isi_violations_ratio`` : Hill et al.'s ratio as SpikeInterface computes it: violations (ISIs
  below ``refractory_ms``) per ``2 x spikes x refractory`` seconds, over the unit's mean rate
- ``presence_ratio`` : fraction of whole ``presence_bin_s`` bins holding a spike (NaN when the
  recording is shorter than one bin)
- ``snr`` : |mean waveform at its peak channel and sample| / that channel's noise (MAD-based), µV/µV
- ``amplitude_median`` : median of the spikes' amplitudes at the peak channel (µV, signed)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nwbflow.ephys.chunks import TraceSource
from nwbflow.ephys.noise import robust_noise_levels
from nwbflow.ephys.sorting.traces import SnippetGeometry
from nwbflow.params import SortingParams

#: Spikes whose trace values :func:`values_at` reads at once (one window spans them).
VALUES_BLOCK_SAMPLES = 30_000

#: Quality metric columns written to the Units table, with their descriptions (one place for both).
METRIC_DESCRIPTIONS: dict[str, str] = {
    "firing_rate": "Spikes per second over the recording (Hz).",
    "snr": "Peak of the mean waveform over the peak channel's noise level (MAD / 0.6745), unitless.",
    "isi_violations_ratio": "ISI violations ratio (Hill et al. 2011, as SpikeInterface computes it; 1.5 ms).",
    "presence_ratio": "Fraction of whole 60 s bins in which the unit fires (NaN for recordings under 60 s).",
    "amplitude_median": "Median spike amplitude at the peak channel, filtered scale (µV, signed).",
}
METRIC_NAMES = tuple(METRIC_DESCRIPTIONS)


class UnwhitenedSource:
    """``W^-1`` applied to every sample of a whitened :class:`TraceSource` (identity when None)."""

    def __init__(self, source: TraceSource, whitening_inverse: np.ndarray | None):
        self.source = source
        self.num_samples, self.num_channels = source.num_samples, source.num_channels
        self.sampling_rate_hz = source.sampling_rate_hz
        self.matrix_t = None if whitening_inverse is None else np.asarray(whitening_inverse, np.float32).T.copy()

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        traces = self.source.get_traces(start_sample, end_sample)
        return traces if self.matrix_t is None else traces @ self.matrix_t


@dataclass(frozen=True)
class UnitWaveforms:
    """Per unit: mean and standard deviation waveforms (U, T, C) µV, peak channel (U,), and the
    signed value of the mean waveform at its peak channel and sample (U,) µV."""

    mean_uv: np.ndarray
    sd_uv: np.ndarray
    peak_channel: np.ndarray
    peak_uv: np.ndarray


def unit_waveforms(source: TraceSource, spike_samples: np.ndarray, spike_units: np.ndarray, num_units: int,
                   before: int, width: int, spikes_per_unit: int, seed: int) -> UnitWaveforms:
    """Mean / SD waveforms from up to ``spikes_per_unit`` random spikes per unit (read one by one)."""
    rng = np.random.default_rng(seed)
    mean = np.zeros((num_units, width, source.num_channels), np.float32)
    sd = np.zeros_like(mean)
    for unit in range(num_units):
        samples = spike_samples[spike_units == unit]
        samples = samples[(samples >= before) & (samples - before + width <= source.num_samples)]
        if len(samples) > spikes_per_unit:
            samples = np.sort(rng.choice(samples, spikes_per_unit, replace=False))
        if len(samples) == 0:
            continue
        snippets = np.stack([source.get_traces(int(s) - before, int(s) - before + width) for s in samples])
        mean[unit] = snippets.mean(axis=0)
        sd[unit] = snippets.std(axis=0)
    extreme = np.abs(mean).max(axis=1)  # (U, C)
    peak_channel = extreme.argmax(axis=1)
    rows = np.abs(mean[np.arange(num_units), :, peak_channel]).argmax(axis=1)
    return UnitWaveforms(mean, sd, peak_channel, mean[np.arange(num_units), rows, peak_channel])


def filtered_noise_uv(source: TraceSource, seed: int) -> np.ndarray:
    """(C,) robust noise level (:func:`~nwbflow.ephys.noise.robust_noise_levels`) of the filtered traces, µV."""
    return robust_noise_levels(source, seed)


def values_at(source: TraceSource, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """(N,) float32 ``source``'s value at each (sample, channel) pair (samples ascending), read in windows
    of at most :data:`VALUES_BLOCK_SAMPLES` samples (one read per window, not per spike)."""
    values = np.zeros(len(samples), np.float32)
    start = 0
    while start < len(samples):
        first = int(samples[start])
        stop = int(np.searchsorted(samples, first + VALUES_BLOCK_SAMPLES, side="left"))
        window = source.get_traces(first, int(samples[stop - 1]) + 1)
        values[start:stop] = window[samples[start:stop] - first, channels[start:stop]]
        start = stop
    return values


def quality_metrics(spike_samples: np.ndarray, spike_units: np.ndarray, num_units: int, num_samples: int,
                    sampling_rate_hz: float, amplitudes_uv: np.ndarray, waveforms: UnitWaveforms,
                    noise_uv: np.ndarray, refractory_ms: float, presence_bin_s: float) -> dict[str, np.ndarray]:
    """The :data:`METRIC_NAMES` columns, (U,) float64 each (definitions in the module docstring)."""
    duration_s = num_samples / sampling_rate_hz
    counts = np.bincount(spike_units, minlength=num_units).astype(np.float64)
    bin_samples = int(presence_bin_s * sampling_rate_hz)
    edges = np.arange(0, num_samples // bin_samples * bin_samples + 1, bin_samples) if bin_samples else np.zeros(1)
    threshold_s = refractory_ms / 1000.0
    isi_ratio = np.full(num_units, np.nan)
    presence = np.full(num_units, np.nan)
    amplitude_median = np.full(num_units, np.nan)
    for unit in range(num_units):
        selected = spike_units == unit
        train = spike_samples[selected]
        n = len(train)
        if n == 0:
            continue
        violations = np.sum(np.diff(train) / sampling_rate_hz < threshold_s)
        isi_ratio[unit] = (violations / (2 * n * threshold_s)) / (n / duration_s)
        if len(edges) >= 2:
            presence[unit] = np.sum(np.histogram(train, bins=edges)[0] > 0) / (len(edges) - 1)
        amplitude_median[unit] = np.median(amplitudes_uv[selected])
    snr = np.abs(waveforms.peak_uv) / noise_uv[waveforms.peak_channel]
    return {"firing_rate": counts / duration_s, "snr": snr, "isi_violations_ratio": isi_ratio,
            "presence_ratio": presence, "amplitude_median": amplitude_median}


def spike_amplitudes_uv(spike_templates: np.ndarray, spike_scalings: np.ndarray, templates: np.ndarray,
                        template_units: np.ndarray, waveforms: UnitWaveforms,
                        whitening_inverse: np.ndarray | None) -> np.ndarray:
    """(N,) each spike's amplitude at its unit's peak channel, µV: its template's unwhitened value at
    that channel's extreme sample, times the spike's scaling of the template."""
    unwhitened = templates if whitening_inverse is None else templates @ np.asarray(whitening_inverse, np.float32).T
    values = np.zeros(len(templates), np.float32)
    for index, unit in enumerate(template_units):
        if unit >= 0:
            trace = unwhitened[index, :, waveforms.peak_channel[unit]]
            values[index] = trace[np.abs(trace).argmax()]
    return values[spike_templates] * spike_scalings


def unit_channels(positions: np.ndarray, peak_channel: np.ndarray, radius_um: float,
                  excluded: tuple[int, ...] | np.ndarray = ()) -> np.ndarray:
    """(U, K) each unit's K channels nearest its peak channel, nearest first (peak channel first).

    K is the most channels any channel has within ``radius_um``, so every unit gets the same count
    (NWB's waveform_mean is rectangular and ordered as the unit's ``electrodes``). ``excluded`` channels
    (bad ones) are never among them.
    """
    distance = np.linalg.norm(positions[:, None, :2] - positions[None, :, :2], axis=2)
    distance[:, np.asarray(excluded, np.int64)] = np.inf
    count = int((distance <= radius_um).sum(axis=1).max()) if len(positions) else 0
    order = np.argsort(distance, axis=1, kind="stable")[:, :count]
    return order[peak_channel].astype(np.int64)


@dataclass(frozen=True)
class MatchedTemplates:
    """How our sorter explained each spike: its template (N,) and scaling (N,), the templates (M, T, C) in
    the sorted traces' units and each one's unit (M,) (-1: dropped); for amplitudes without a read."""

    spike_templates: np.ndarray
    spike_scalings: np.ndarray
    templates: np.ndarray
    template_units: np.ndarray


@dataclass(frozen=True)
class UnitReport:
    """Per unit: waveforms (µV), each spike's amplitude (µV), the metric columns, and the channels
    (U, K) the unit's waveforms are reported on (nearest its peak channel first)."""

    waveforms: UnitWaveforms
    amplitudes_uv: np.ndarray
    metrics: dict[str, np.ndarray]
    channels: np.ndarray


def describe_units(source: TraceSource, spike_samples: np.ndarray, spike_units: np.ndarray, num_units: int,
                   channel_positions_um: np.ndarray, params: SortingParams, *, seed: int,
                   matched: MatchedTemplates | None = None, whitening_inverse: np.ndarray | None = None,
                   excluded_channels: tuple[int, ...] | np.ndarray = ()) -> UnitReport:
    """Waveforms, amplitudes and quality metrics of sorted units.

    Parameters
    ----------
    source : TraceSource
        Filtered traces in µV (e.g. :class:`UnwhitenedSource` of the sorted, whitened traces).
    spike_samples, spike_units : (N,) int64, samples ascending; units 0..U-1
    num_units : int
    channel_positions_um : (C, 2) float, µm
    params : SortingParams
        ``ms_before``/``ms_after``, ``waveform_spikes``, ``refractory_ms``, ``presence_bin_s``,
        ``template_radius_um`` (the channels reported).
    seed : int
        Seed of the spikes averaged and of the chunks sampled for the noise levels.
    matched : MatchedTemplates or None
        Our sorter's templates: amplitudes are then its scalings times the template's value at the
        unit's peak (needs ``whitening_inverse`` when the templates are whitened); otherwise each
        spike's value is read at its unit's peak channel.
    excluded_channels : channel indices (bad ones) never reported among a unit's channels.
    """
    geometry = SnippetGeometry.of(params, source.sampling_rate_hz)
    waveforms = unit_waveforms(source, spike_samples, spike_units, num_units, geometry.before, geometry.width,
                               params.waveform_spikes, seed)
    if matched is not None:
        amplitudes = spike_amplitudes_uv(matched.spike_templates, matched.spike_scalings, matched.templates,
                                         matched.template_units, waveforms, whitening_inverse)
    else:
        amplitudes = values_at(source, spike_samples, waveforms.peak_channel[spike_units])
    metrics = quality_metrics(spike_samples, spike_units, num_units, source.num_samples, source.sampling_rate_hz,
                              amplitudes, waveforms, filtered_noise_uv(source, seed), params.refractory_ms,
                              params.presence_bin_s)
    channels = unit_channels(np.asarray(channel_positions_um, np.float64), waveforms.peak_channel,
                             params.template_radius_um, excluded_channels)
    return UnitReport(waveforms, amplitudes, metrics, channels)
