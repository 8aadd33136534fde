"""Spike-to-fluorescence lag of ground-truth datasets, and aligning them to a common lag before training.

The delay between a spike and the rise of ΔF/F it causes is not the same in
every ground-truth dataset: measured here, it is 0-30 ms in the mouse V1
recordings (GCaMP6f/6s/7f/8 at 122-158 Hz) and about 100 ms in the
zebrafish ones (GCaMP6f at 30 Hz, room temperature; slower rise and the
recording set-up's own timing). Nothing in a trace says which of these
delays its set-up has, so a network trained on the mixture learns their
average and places spikes 20-30 ms early on fast mammalian data, which
costs a fifth of the 40 ms-bin correlation on GCaMP8. We measure each
training dataset's lag and shift the spike times of the outliers (the
zebrafish sets) to the median lag of the training datasets. Evaluation
always uses spike times as recorded.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nwbflow.ophys.metrics import BIN_S, binned_prediction, correlation
from nwbflow.ophys.training.groundtruth import GtDataset

#: Lags searched (s): spikes before the fluorescence rise are positive lags.
LAG_GRID_S = np.arange(-0.1, 0.3001, 0.005)
#: A lag is an outlier beyond this many scaled median absolute deviations from the median lag.
OUTLIER_MADS = 3.0
#: Median absolute deviation -> standard deviation of a normal distribution.
MAD_SCALE = 1.4826
#: Floor of that spread (s): the lag grid's resolution, so near-identical lags flag nothing.
MIN_SPREAD_S = 0.005


def onset_lag_s(dataset: GtDataset, lags_s: np.ndarray = LAG_GRID_S) -> float:
    """The lag (s) by which a dataset's spikes precede the rises of its ΔF/F.

    The lag maximizing the correlation, averaged over neurons, between true
    spike counts and the positive first difference of ΔF/F (the fluorescence
    rise per frame), both in 40 ms bins, the spike train shifted by each lag
    of ``lags_s``. Parameter-free and independent of any model.
    """
    scores = np.zeros(len(lags_s))
    counted = np.zeros(len(lags_s))
    for neuron in dataset.neurons:
        segments = []  # (bin edges, binned rise, spike times) per recording: the rise does not depend on the lag
        for r in neuron:
            edges = np.arange(r.times_s[0], r.times_s[-1], BIN_S)
            if edges.size < 3:
                continue
            rise = np.clip(np.diff(r.dff.astype(np.float64), prepend=r.dff[0]), 0.0, None) * r.rate_hz
            segments.append((edges, binned_prediction(rise, r.times_s, edges), r.spike_times_s))
        if not segments:
            continue
        predicted = np.concatenate([binned for _, binned, _ in segments])
        for i, lag in enumerate(lags_s):
            true = np.concatenate([np.histogram(spikes + lag, edges)[0] for edges, _, spikes in segments])
            c = correlation(predicted, true.astype(np.float64))
            if np.isfinite(c):
                scores[i] += c
                counted[i] += 1
    mean = np.where(counted > 0, scores / np.maximum(counted, 1), -np.inf)
    return round(float(lags_s[int(np.argmax(mean))]), 4)


def shifted(dataset: GtDataset, shift_s: float) -> GtDataset:
    """A copy of ``dataset`` with every spike time moved by ``shift_s`` (s; positive = later)."""
    neurons = [[replace(r, spike_times_s=r.spike_times_s + shift_s) for r in neuron] for neuron in dataset.neurons]
    return replace(dataset, neurons=neurons)


def align_lags(datasets: list[GtDataset], lags_s: list[float]) -> tuple[list[GtDataset], dict]:
    """Datasets whose lag is an outlier among ``lags_s`` shifted to the median lag; the others unchanged.

    An outlier lies more than ``OUTLIER_MADS`` scaled median absolute deviations from the median (a
    robust rule that does not let the outliers set the scale). The others keep their lags: their
    spread (5-25 ms) follows indicator rise times, which the network can see in the trace.

    Returns the datasets and, per dataset name, the shift applied (s).
    """
    lags = np.asarray(lags_s, dtype=np.float64)
    median = float(np.median(lags))
    spread = max(MAD_SCALE * float(np.median(np.abs(lags - median))), MIN_SPREAD_S)
    shifts = np.where(np.abs(lags - median) > OUTLIER_MADS * spread, lags - median, 0.0)
    out = [shifted(d, s) if s else d for d, s in zip(datasets, shifts)]
    return out, {d.name: round(float(s), 4) for d, s in zip(datasets, shifts)}
