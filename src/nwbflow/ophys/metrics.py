"""Accuracy of inferred spike rates against true spike times (Spikefinder and CASCADE measures).

- correlation: Pearson correlation of predicted and true spike counts summed in
  40 ms bins (the Spikefinder metric), per neuron;
- error and bias (CASCADE's): on the same counts smoothed with a Gaussian
  (sigma 0.2 s), sum |predicted - true| / number of true spikes and
  sum (predicted - true) / number of true spikes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

BIN_S = 0.04
#: Gaussian smoothing of the 40 ms counts before error and bias (s).
ERROR_SIGMA_S = 0.2


@dataclass(frozen=True)
class NeuronScore:
    """One neuron: correlation (unitless, NaN when the truth has no spike), error and bias (per true spike)."""

    correlation: float
    error: float
    bias: float
    num_spikes: int


def frame_edges(frame_times_s: np.ndarray) -> np.ndarray:
    """(n + 1,) edges of frames starting at ``frame_times_s`` (n,); the last lasts a median interval."""
    times = np.asarray(frame_times_s, dtype=np.float64)
    step = float(np.median(np.diff(times))) if times.size > 1 else 1.0
    return np.append(times, times[-1] + step)


def binned_prediction(rate_hz: np.ndarray, frame_times_s: np.ndarray, bin_edges_s: np.ndarray) -> np.ndarray:
    """Predicted spikes in each bin: the frames' counts (rate x duration) spread uniformly over each frame.

    Parameters
    ----------
    rate_hz : (n,) predicted spike rate of each frame (Hz); frame k spans [t_k, t_(k+1)).
    frame_times_s : (n,) frame start times (s), increasing.
    bin_edges_s : (m + 1,) bin edges (s).

    Returns
    -------
    (m,) float64 expected spike counts.

    Examples
    --------
    >>> binned_prediction(np.array([10.0, 0.0]), np.array([0.0, 0.1]), np.array([0.0, 0.05, 0.1, 0.2])).tolist()
    [0.5, 0.5, 0.0]
    """
    edges = frame_edges(frame_times_s)
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(rate_hz, np.float64) * np.diff(edges))])
    return np.diff(np.interp(bin_edges_s, edges, cumulative))


def score_neuron(rate_hz: np.ndarray, frame_times_s: np.ndarray, spike_times_s: np.ndarray,
                 bin_s: float = BIN_S) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) spike counts in ``bin_s`` bins over the frames' span."""
    edges = frame_edges(frame_times_s)
    bins = np.arange(edges[0], edges[-1] + 1e-9, bin_s)
    predicted = binned_prediction(rate_hz, frame_times_s, bins)
    true, _ = np.histogram(spike_times_s, bins)
    return predicted, true.astype(np.float64)


def correlation(predicted: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation; NaN when the truth is constant, 0 when the prediction is."""
    if np.std(true) == 0:
        return float("nan")
    if np.std(predicted) == 0:
        return 0.0
    return float(np.corrcoef(predicted, true)[0, 1])


def score(predicted: np.ndarray, true: np.ndarray, bin_s: float = BIN_S) -> NeuronScore:
    """Correlation, error and bias of binned counts (one neuron, possibly several segments concatenated)."""
    total = float(true.sum())
    smooth_p = gaussian_filter1d(predicted, ERROR_SIGMA_S / bin_s)
    smooth_t = gaussian_filter1d(true, ERROR_SIGMA_S / bin_s)
    error = float(np.abs(smooth_p - smooth_t).sum() / total) if total else float("nan")
    bias = float((smooth_p - smooth_t).sum() / total) if total else float("nan")
    return NeuronScore(correlation(predicted, true), error, bias, int(total))
