"""Saturation and artifact periods: samples where much of the probe leaves its amplifier's range at once.

A sample is *saturated* (IBL's rule, as SpikeInterface's ``detect_saturation_periods`` has it) when more
than ``proportion`` of the channels either lie at least ``level_uv`` from their offset (the amplifier held
at its rail: Neuropixels 1.0 clips at about ±1.2 mV) or move at least ``jump_uv`` from one sample to the
next (the edges of a saturation, and fast artifacts such as a lick or a cable knock that do not clip).
Every saturated sample, widened by ``pad_samples`` on each side (the band-pass rings around the step a
clipped period makes), is zeroed after preprocessing, so detection, motion and sorting see nothing there.

Works on offset-free µV (offsets subtracted first, so that a channel's DC level cannot hide or fake a
rail) in torch on any device; :func:`periods_of` and :func:`merge_periods` are host-side bookkeeping.

Examples
--------
>>> import torch
>>> traces = torch.zeros(8, 5)
>>> traces[3:5] = 1500.0          # every channel at +1.5 mV for two samples
>>> saturated_samples(traces, level_uv=1000.0, jump_uv=300.0, proportion=0.2).nonzero().flatten().tolist()
[2, 3, 4, 5]
>>> periods_of(widen(saturated_samples(traces, 1000.0, 300.0, 0.2), 1).numpy(), first_sample=100).tolist()
[[101, 107]]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["merge_periods", "periods_of", "saturated_samples", "widen"]


def saturated_samples(traces_uv: torch.Tensor, level_uv: float, jump_uv: float, proportion: float) -> torch.Tensor:
    """Which samples are saturated.

    Parameters
    ----------
    traces_uv : (n, num_channels) float tensor, µV, offsets removed
    level_uv : float, µV
        A channel is beyond its range where ``|x| >= level_uv``.
    jump_uv : float, µV per sample
        ... or where ``|x[t + 1] - x[t]| >= jump_uv`` (both samples ``t`` and ``t + 1`` are marked).
    proportion : float in (0, 1)
        A sample is saturated when more than this fraction of the channels are.

    Returns
    -------
    (n,) bool tensor on the traces' device
    """
    rows, channels = traces_uv.shape
    needed = proportion * channels
    beyond = (traces_uv.abs() >= level_uv).sum(dim=1) > needed
    if rows > 1:
        jumping = ((traces_uv[1:] - traces_uv[:-1]).abs_() >= jump_uv).sum(dim=1) > needed
        beyond[1:] |= jumping
        beyond[:-1] |= jumping
    return beyond


def widen(mask: torch.Tensor, samples: int) -> torch.Tensor:
    """``mask`` (n,) bool with every True extended by ``samples`` on each side (clipped to the array)."""
    if samples <= 0 or not len(mask):
        return mask
    pooled = F.max_pool1d(mask.to(torch.float32)[None, None], kernel_size=2 * samples + 1, stride=1,
                          padding=samples)
    return pooled[0, 0] > 0


def periods_of(mask: np.ndarray, first_sample: int = 0) -> np.ndarray:
    """The runs of True in ``mask`` (n,) as (k, 2) int64 ``[start, end)`` samples, offset by ``first_sample``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], np.asarray(mask, np.int8), [0]))))
    return edges.reshape(-1, 2).astype(np.int64) + int(first_sample)


def merge_periods(periods: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(k, 2) ``[start, end)`` samples, sorted, with touching or overlapping periods joined (chunks of one
    stream report a period that crosses their boundary in two pieces)."""
    stacked = np.concatenate([np.reshape(p, (-1, 2)) for p in periods]) if len(periods) else np.zeros((0, 2))
    stacked = stacked[np.argsort(stacked[:, 0], kind="stable")].astype(np.int64)
    merged: list[list[int]] = []
    for start, end in stacked:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], int(end))
        else:
            merged.append([int(start), int(end)])
    return np.asarray(merged, np.int64).reshape(-1, 2)
