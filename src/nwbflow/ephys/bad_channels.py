"""Bad-channel detection (dead, noisy, outside the brain) by IBL's coherence + spectrum method (numpy/scipy).

The method of the International Brain Laboratory's Neuropixels pipeline, as SpikeInterface's
``detect_bad_channels(method="coherence+psd")`` also runs it; our implementation. On each of
``chunks`` seeded sampled windows of ``chunk_s``, high-passed at ``highpass_hz`` (zero phase), with
channels ordered along the probe (by y, then x):

* ``similarity``: each channel's projection on the probe's reference (the median across channels,
  mean removed), over the reference's energy. Near 1 where a channel carries what the probe carries
  (in the brain, the shared background), near 0 for a channel that carries nothing of it.
* ``trend``: the similarity median-filtered along the probe over ``neighbours`` channels (the window
  shrinks symmetrically at the probe's ends); ``similarity - trend`` is a channel against its neighbours.
* ``psd_hf_uv2_hz``: the mean power spectral density (Welch, Hann windows of ``welch_ms``) above
  ``nyquist_fraction`` of Nyquist, µV²/Hz.

A channel is **dead** when ``similarity - trend < dead_below`` and (our addition to the method) its
high-passed RMS is below ``dead_rms_below`` of the probe's median channel RMS; **noisy** when it is above
``noisy_above`` or ``psd_hf_uv2_hz > psd_hf_above_uv2_hz``, **outside** (the brain) when it belongs to
the block of consecutive channels at the top of the probe whose trend is below ``1 + outside_below``
(labels in that priority: outside, noisy, dead). Each window labels every channel; a channel's label
is the one it got most often (ties: the lower code, "good" first).

Why the RMS condition: similarity is measured against the median, and where a probe carries no shared
background (SpikeInterface's ground-truth generator: independent noise), a channel under a large unit
is often in the tails and seldom the median, so its similarity falls although it records well. On the
384-channel benchmark recording both SpikeInterface's ``detect_bad_channels`` and the method without the
condition labelled 8-9 such channels dead; a dead channel also records little, and with the condition
none is labelled. The high-pass is applied by FFT (:func:`~nwbflow.ephys.filtering.zero_phase_filter`)
and Welch's spectrum and the median filter are computed for all channels at once; the labels are
SpikeInterface's on the damaged test sessions (``tests/test_bad_channels.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy import signal

from nwbflow.ephys.filtering import zero_phase_filter
from nwbflow.ephys.median import median_across_channels
from nwbflow.params import BadChannelParams

__all__ = ["LABELS", "BadChannels", "channel_labels", "depth_order", "label_window"]

#: Label codes: index into this tuple.
LABELS = ("good", "dead", "noisy", "outside")
GOOD, DEAD, NOISY, OUTSIDE = range(4)


@dataclass(frozen=True)
class BadChannels:
    """What detection found: a label code per channel (``LABELS``), in data order."""

    labels: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        """Channels that are not good (int64, ascending)."""
        return np.flatnonzero(self.labels != GOOD).astype(np.int64)

    def by_label(self) -> dict[str, list[int]]:
        """``{"dead": [...], "noisy": [...], "outside": [...]}``: channel indices of each bad label."""
        return {name: np.flatnonzero(self.labels == code).tolist() for code, name in enumerate(LABELS) if code}


def depth_order(positions_um: np.ndarray | None, num_channels: int) -> np.ndarray:
    """Channel indices ordered along the probe: by y, then x (µm); data order without positions."""
    if positions_um is None:
        return np.arange(num_channels)
    positions = np.asarray(positions_um, np.float64)
    return np.lexsort((positions[:, 0], positions[:, 1]))


def _shrinking_median(values: np.ndarray, width: int) -> np.ndarray:
    """Median over a centred window of ``width`` (odd) values, shrinking symmetrically at the ends.

    >>> _shrinking_median(np.array([5.0, 1, 9, 2, 8, 3, 7]), 5).tolist()
    [5.0, 5.0, 5.0, 3.0, 7.0, 7.0, 7.0]
    """
    half = min(width // 2, (len(values) - 1) // 2)
    out = np.empty_like(values)
    out[half:len(values) - half] = np.median(sliding_window_view(values, 2 * half + 1), axis=1)
    for i in (*range(half), *range(len(values) - half, len(values))):
        reach = min(i, len(values) - 1 - i)
        out[i] = np.median(values[i - reach:i + reach + 1])
    return out


def _welch_high_band(window: np.ndarray, rate_hz: float, segment: int, fraction: float) -> np.ndarray:
    """Per channel, the mean of Welch's one-sided density (µV²/Hz; Hann segments of ``segment`` samples, half
    overlapping: ``scipy.signal.welch``'s defaults) above ``fraction`` of Nyquist. Welch's removal of each
    segment's mean is left out: it changes the spectrum only within the Hann window's main lobe of 0 Hz, far
    below the band (the window is high-passed anyway)."""
    segments = sliding_window_view(window, segment, axis=0)[::segment // 2]  # (k, C, segment)
    taper = signal.get_window("hann", segment).astype(window.dtype)
    spectra = torch.fft.rfft(torch.from_numpy(segments * taper), dim=-1).numpy()
    frequencies = np.fft.rfftfreq(segment, 1.0 / rate_hz)
    band = frequencies > rate_hz / 2 * fraction
    power = (np.abs(spectra[..., band]) ** 2).mean(axis=0) / (rate_hz * (taper ** 2).sum())
    doubled = np.where(frequencies[band] < rate_hz / 2, 2.0, 1.0) if segment % 2 == 0 else 2.0
    return (power * doubled).mean(axis=-1, dtype=np.float64)


def label_window(window_uv: np.ndarray, rate_hz: float, *, neighbours: int, dead_below: float, dead_rms_below: float,
                 noisy_above: float, outside_below: float, psd_hf_above_uv2_hz: float, nyquist_fraction: float,
                 welch_ms: float) -> np.ndarray:
    """Label codes of one high-passed window ``(n, C)`` µV whose channels are ordered along the probe."""
    window = np.asarray(window_uv, np.float32)
    window = window - window.mean(axis=0, keepdims=True)
    psd_hf = _welch_high_band(window, rate_hz, min(int(welch_ms * rate_hz / 1000), len(window)), nyquist_fraction)
    reference = median_across_channels(torch.from_numpy(window)).numpy()
    reference = reference - reference.mean()
    similarity = (window.T @ reference).astype(np.float64) / max(float(reference @ reference), 1e-30)
    trend = _shrinking_median(similarity, neighbours)
    against_neighbours = similarity - trend
    rms = np.sqrt(np.square(window).mean(axis=0, dtype=np.float64))
    labels = np.full(window.shape[1], GOOD)
    labels[(against_neighbours < dead_below) & (rms < dead_rms_below * np.median(rms))] = DEAD
    labels[(psd_hf > psd_hf_above_uv2_hz) | (against_neighbours > noisy_above)] = NOISY
    below = np.flatnonzero(trend < 1 + outside_below)
    if below.size and below[-1] == window.shape[1] - 1:  # the block reaching the top of the probe
        gaps = np.flatnonzero(np.diff(below) > 1)
        labels[below[gaps[-1] + 1 if gaps.size else 0:]] = OUTSIDE
    return labels


def channel_labels(windows: Iterable[np.ndarray], rate_hz: float, positions_um: np.ndarray | None,
                   params: BadChannelParams) -> BadChannels:
    """Label each channel from raw windows ``(n, C)`` µV (sampled chunks), in data order.

    Parameters
    ----------
    windows : iterable of (n, num_channels) float arrays, µV
        Consumed one at a time (a generator keeps one window in memory).
    rate_hz : float
    positions_um : (num_channels, 2) µm or None (data order is then the order along the probe)
    params : BadChannelParams
        ``highpass_hz``: zero-phase Butterworth high-pass (order 3, applied forward and backward) of each
        window first; the thresholds of :func:`label_window` (see the module docstring). ``detect``,
        ``chunks`` and ``chunk_s`` are the caller's (which windows).
    """
    sos = signal.butter(3, params.highpass_hz, btype="highpass", fs=rate_hz, output="sos")
    thresholds = params.model_dump(exclude={"detect", "chunks", "chunk_s", "highpass_hz"})
    votes = order = None
    for window in windows:
        if votes is None:
            num_channels = window.shape[1]
            order = depth_order(positions_um, num_channels)
            votes = np.zeros((len(LABELS), num_channels), np.int64)
        filtered = zero_phase_filter(np.asarray(window, np.float32)[:, order], sos).numpy()
        votes[label_window(filtered, rate_hz, **thresholds), np.arange(num_channels)] += 1
    labels = np.empty(num_channels, np.int64)
    labels[order] = votes.argmax(axis=0)
    return BadChannels(labels)
