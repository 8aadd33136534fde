"""What every sorting step reads with: noise-scaled windows, snippet geometry, channel neighbourhoods.

A snippet is the ``(T, K)`` block of traces around a spike's trough: ``T = before + 1 + after``
samples on the ``K`` channels of its peak channel's neighbourhood (padding channels are zero).
The sorter works on traces divided by each channel's noise level (noise 1 everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ephys.chunks import TraceSource, read_window, sample_chunk_ranges
from nwbflow.ephys.localize import neighbour_table
from nwbflow.errors import BadInputError
from nwbflow.params import SortingParams


class NothingToSort(Exception):
    """The recording holds no spiking activity the sorter can learn from (not an error: no units)."""


@dataclass(frozen=True)
class SnippetGeometry:
    """Samples of a snippet around its trough: ``before`` + 1 + ``after``."""

    before: int
    after: int

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    @classmethod
    def of(cls, params: SortingParams, sampling_rate_hz: float) -> SnippetGeometry:
        return cls(max(int(round(params.ms_before * sampling_rate_hz / 1000.0)), 1),
                   max(int(round(params.ms_after * sampling_rate_hz / 1000.0)), 1))


@dataclass(frozen=True)
class Neighbourhoods:
    """Per channel, the channels within a radius (padded; ``valid`` False on padding)."""

    channels: torch.Tensor  # (C, K) int64
    valid: torch.Tensor     # (C, K) bool

    @classmethod
    def build(cls, channel_positions_um: np.ndarray, radius_um: float, device: torch.device) -> Neighbourhoods:
        channels, valid = neighbour_table(channel_positions_um, radius_um)
        return cls(torch.as_tensor(channels, device=device), torch.as_tensor(valid, device=device))


def gather_snippets(traces: torch.Tensor, samples: torch.Tensor, channels: torch.Tensor,
                    geometry: SnippetGeometry) -> torch.Tensor:
    """Snippets of ``traces`` (S, C) at ``samples`` (n,) on ``channels`` (n, K) -> (n, T, K).

    Every ``samples[i] - before`` .. ``samples[i] + after`` must lie inside ``traces``.
    """
    offsets = torch.arange(-geometry.before, geometry.after + 1, device=traces.device)
    rows = samples[:, None, None] + offsets[None, :, None]
    return traces[rows, channels[:, None, :]]


class ScaledSource:
    """Windows of a :class:`TraceSource` divided by each channel's noise level (noise 1 everywhere)."""

    def __init__(self, source: TraceSource, noise_levels: np.ndarray, device: torch.device):
        noise = np.asarray(noise_levels, dtype=np.float64)
        if noise.shape != (source.num_channels,) or not np.all(np.isfinite(noise) & (noise > 0)):
            raise BadInputError(f"noise levels must be {source.num_channels} positive finite values, "
                                f"got shape {noise.shape}")
        self.source, self.device = source, device
        self.scale = torch.as_tensor(1.0 / noise, dtype=torch.float32, device=device)

    def window(self, start: int, end: int, margin: int) -> tuple[torch.Tensor, int]:
        """Rows ``[start - margin, end + margin)`` scaled, zero-padded beyond the recording;
        returns (traces, index of the window's first row in the recording)."""
        window = read_window(self.source, start, end, margin)
        traces = torch.from_numpy(window.traces).to(self.device) * self.scale
        pad_before, pad_after = margin - window.context_before, margin - window.context_after
        if pad_before or pad_after:
            traces = torch.nn.functional.pad(traces, (0, 0, pad_before, pad_after))
        return traces, start - margin

    def sample(self, chunk_samples: int, num_chunks: int, seed: int) -> SampledChunks:
        """:class:`SampledChunks` of ``num_chunks`` seeded chunks of ``chunk_samples``, read once."""
        ranges = sample_chunk_ranges(self.source.num_samples, chunk_samples, num_chunks, seed)
        stored = torch.float16 if str(getattr(self.source, "dtype", "")) == "float16" else torch.float32
        windows = []
        for start, end in ranges:
            window = read_window(self.source, int(start), int(end), 0)
            windows.append(torch.from_numpy(window.traces).to(self.device, stored))
        return SampledChunks(windows, self.scale)


@dataclass(frozen=True, eq=False)
class SampledChunks:
    """Chunks of a recording read once and kept (in the binary's storage type: float16 values are exact)
    for the measurements that go over them several times (footprint and template-score noise)."""

    windows: list[torch.Tensor]  # (n_i, C) each, unscaled
    scale: torch.Tensor          # (C,) float32, 1 / noise level

    def scaled(self):
        """Each chunk's noise-scaled traces, (n_i, C) float32, as :meth:`ScaledSource.window` gives them."""
        for window in self.windows:
            yield window.float() * self.scale
