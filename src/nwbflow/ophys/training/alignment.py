"""Spike-to-fluorescence lag of ground-truth datasets, and aligning them to one lag before training.

The delay between a spike and the rise of ΔF/F it causes is not the same in
every ground-truth dataset: measured here, it is 5-10 ms in the GCaMP8 mouse
V1 recordings, 15-25 ms in the GCaMP6f/6s/7f ones and about 100 ms in the
zebrafish ones (GCaMP6f at 30 Hz). Part of that follows indicator rise
times, part the set-ups' own timing, and a network cannot tell the two apart:
trained on every dataset as recorded, it places GCaMP8 spikes one to two
frames (8-16 ms) early and GCaMP6 spikes one frame late *on its own training
data*, and GCaMP8 loses 0.04-0.07 of 40 ms-bin correlation from it. So every
training dataset's spike times are shifted to one lag, ``ALIGNED_LAG_S``, the
lag of the fastest indicators: their sharp rises make a timing error cost
most, while the smooth rates inferred on slow indicators lose little when
placed a few ms late (leave-one-dataset-out, benchmarks/RESULTS.md).
Evaluation always uses spike times as recorded.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nwbflow.ophys.metrics import BIN_S, binned_prediction, correlation
from nwbflow.ophys.training.groundtruth import GtDataset

#: Lags searched (s): spikes before the fluorescence rise are positive lags.
LAG_GRID_S = np.arange(-0.1, 0.3001, 0.005)
#: Every training dataset's spikes are shifted to precede the fluorescence rise by this much (s).
ALIGNED_LAG_S = 0.005


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
    """Each dataset's spikes shifted by ``lag - ALIGNED_LAG_S`` (its measured lag in ``lags_s``, s).

    Returns the datasets (unchanged where the shift is 0) and, per dataset name, the shift applied (s).
    """
    shifts = [round(float(lag) - ALIGNED_LAG_S, 4) for lag in lags_s]
    out = [shifted(d, s) if s else d for d, s in zip(datasets, shifts)]
    return out, {d.name: s for d, s in zip(datasets, shifts)}
