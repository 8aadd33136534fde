"""Noise level of traces: each channel's robust standard deviation, from sampled chunks (torch).

The one estimate of a channel's noise: in each sampled chunk, the median absolute deviation
from the chunk's median divided by :data:`MAD_TO_SD` (the MAD of a standard normal); then over
chunks, the median (:func:`noise_levels`, what peak detection thresholds) or a high quantile
(:func:`robust_noise_levels`, what the sorter scales by). Spikes are rare, so they barely move
a median; the noise of derived scores (footprint scores, template outputs) is measured in their
own rooms, with this constant.

Examples
--------
>>> import numpy as np
>>> from nwbflow.ephys.chunks import ArraySource
>>> traces = np.random.default_rng(0).normal(0.0, [1.0, 3.0], size=(40_000, 2)).astype(np.float32)
>>> noise_levels(ArraySource(traces, 1000.0), chunk_samples=10_001, num_chunks=4).round(1).tolist()
[1.0, 3.0]
"""

from __future__ import annotations

import numpy as np
import torch

from nwbflow.ephys.chunks import TraceSource, sample_chunk_ranges
from nwbflow.errors import BadInputError

__all__ = ["MAD_TO_SD", "NOISE_CHUNK_QUANTILE", "chunk_noise_levels", "median_last", "noise_levels",
           "robust_noise_levels"]

#: Median absolute deviation of a standard normal distribution: SD = MAD / MAD_TO_SD.
MAD_TO_SD = 0.6744897501960817
#: Quantile over chunks of each channel's per-chunk level taken by :func:`robust_noise_levels`.
NOISE_CHUNK_QUANTILE = 0.8
#: Chunks sampled by :func:`robust_noise_levels`, and their length (s).
ROBUST_CHUNKS, ROBUST_CHUNK_S = 20, 0.33


def median_last(values: torch.Tensor) -> torch.Tensor:
    """Median along the last dim, the mean of the two middle values for an even count (as ``np.median``)."""
    count = values.shape[-1]
    low = values.kthvalue((count + 1) // 2, dim=-1, keepdim=True).values
    if count % 2:
        return low.squeeze(-1)
    # The next order statistic: ``low`` again when it is repeated past the middle, else the least value above it.
    above = torch.where(values > low, values, torch.inf).amin(dim=-1, keepdim=True)
    high = torch.where((values <= low).sum(dim=-1, keepdim=True) > count // 2, low, above)
    return ((low + high) / 2).squeeze(-1)


def chunk_noise_levels(source: TraceSource, ranges: np.ndarray, *,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, chunks) float64: each chunk's per-channel ``MAD / MAD_TO_SD`` (source units).

    Parameters
    ----------
    source : TraceSource
    ranges : (k, 2) int, samples
        The chunks (e.g. :func:`~nwbflow.ephys.chunks.sample_chunk_ranges`); an odd length makes each
        median one order statistic (one ``kthvalue``).
    device : torch.device or str
    """
    device = torch.device(device)
    if len(ranges) == 0:
        raise BadInputError("cannot estimate the noise of an empty recording")
    levels = torch.empty((source.num_channels, len(ranges)), dtype=torch.float64, device=device)
    for i, (start, end) in enumerate(ranges):
        traces = torch.from_numpy(source.get_traces(int(start), int(end))).to(device).T.contiguous()  # (C, T)
        levels[:, i] = median_last((traces - median_last(traces).unsqueeze(1)).abs()) / MAD_TO_SD
    return levels


def noise_levels(source: TraceSource, *, chunk_samples: int, num_chunks: int = 20, seed: int = 0,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """(C,) float64 per-channel noise level (source units): the median over ``num_chunks`` seeded chunks
    of ``chunk_samples`` of each chunk's ``MAD / MAD_TO_SD`` (memory: one chunk)."""
    if source.num_samples == 0:
        raise BadInputError("cannot estimate the noise of an empty recording")
    ranges = sample_chunk_ranges(source.num_samples, chunk_samples, num_chunks, seed)
    return median_last(chunk_noise_levels(source, ranges, device=device)).cpu().numpy()


def robust_noise_levels(source: TraceSource, seed: int) -> np.ndarray:
    """(C,) float64 per-channel noise level (source units) robust to channels quiet part of the time:
    the :data:`NOISE_CHUNK_QUANTILE` quantile over :data:`ROBUST_CHUNKS` seeded chunks of
    :data:`ROBUST_CHUNK_S` of each chunk's level. A channel constant everywhere gets the median level
    of the others; all NaN when every channel is constant.

    Motion correction attenuates a channel while its corrected position lies off the probe (its
    interpolation weights vanish there); a median over chunks would take that quiet level for the
    channel's noise and flood it with false detections whenever it is not attenuated.
    """
    if source.num_samples == 0:
        raise BadInputError("cannot estimate the noise of an empty recording")
    chunk_samples = max(int(round(ROBUST_CHUNK_S * source.sampling_rate_hz)), 1)
    levels = chunk_noise_levels(source, sample_chunk_ranges(source.num_samples, chunk_samples, ROBUST_CHUNKS, seed))
    noise = torch.quantile(levels, NOISE_CHUNK_QUANTILE, dim=1).numpy()
    usable = np.isfinite(noise) & (noise > 0)
    if not usable.any():
        return np.full(source.num_channels, np.nan)
    return np.where(usable, noise, np.median(noise[usable]))
