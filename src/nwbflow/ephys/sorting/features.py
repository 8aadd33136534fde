"""Spike snippets on channel neighbourhoods, the SVD temporal basis, and the clustering subset.

A snippet is the ``(T, K)`` block of traces around a spike's trough: ``T = before + 1 + after``
samples on the ``K`` channels of its peak channel's neighbourhood (padding channels are zero).
Kilosort's compression is kept: every channel's waveform is projected on one shared temporal
basis of rank ``R`` (the leading right singular vectors of peak-channel waveforms), so a spike
becomes ``R x K`` features and a template ``B @ U.T`` with ``B`` (T, R) and ``U`` (C, R).

The subset fed to clustering is drawn from the whole recording in one streaming pass: each
detected spike gets a random key and, per peak channel, the ``max_spikes_per_channel`` spikes
with the smallest keys are kept — a uniform sample of that channel's spikes whatever the
recording's length, in memory bounded by the cap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.device import OomBackoff
from nwbflow.ephys.chunks import ProgressFn, TraceSource, chunk_ranges, read_window, sample_chunk_ranges
from nwbflow.ephys.localize import neighbour_table
from nwbflow.ephys.peaks import DetectionTables, chunk_noise_mads, first_of_ties, neighbourhood_maxima
from nwbflow.ephys.sorting.detection import FootprintDetector
from nwbflow.errors import BadInputError
from nwbflow.params import PeakParams, SortingParams

log = logging.getLogger(__name__)

#: Exclusion radius (µm) and sweep (ms) of the per-channel detection that samples waveforms: one
#: spike per neighbourhood and ~0.3 ms, so a spike is sampled once, at its largest channel.
DETECTION_EXCLUSION_UM = 50.0
DETECTION_SWEEP_MS = 0.3
#: Chunks sampled to learn the temporal basis and the detection prototypes.
BASIS_SAMPLE_CHUNKS = 30


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


def detection_tables(channel_positions_um: np.ndarray, sampling_rate_hz: float, params: SortingParams,
                     device: torch.device) -> DetectionTables:
    """Threshold detection on noise-scaled traces (noise 1 on every channel)."""
    peak_params = PeakParams(threshold_mad=params.detect_threshold_mad, peak_sign="neg",
                             exclusion_radius_um=DETECTION_EXCLUSION_UM, sweep_ms=DETECTION_SWEEP_MS)
    return DetectionTables.build(channel_positions_um, sampling_rate_hz, peak_params,
                                 np.ones(len(channel_positions_um)), device)


def detect_in_window(traces: torch.Tensor, tables: DetectionTables, geometry: SnippetGeometry,
                     core: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks (rows, channels) of ``traces`` whose row is in ``core`` = [lo, hi) rows of the window.

    ``core`` must leave ``geometry`` room on both sides for the snippets.
    """
    samples, channels = neighbourhood_maxima(traces, tables)
    first = first_of_ties(samples, channels, traces.shape[0], tables)
    keep = first & (samples >= core[0]) & (samples < core[1])
    return samples[keep], channels[keep]


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


def sample_waveforms(scaled: ScaledSource, tables: DetectionTables, geometry: SnippetGeometry,
                     chunk_samples: int, seed: int) -> torch.Tensor:
    """(n, T) peak-channel waveforms of the spikes detected in :data:`BASIS_SAMPLE_CHUNKS` sampled chunks."""
    source = scaled.source
    margin = geometry.width
    waveforms = [torch.zeros((0, geometry.width), device=scaled.device)]
    for start, end in sample_chunk_ranges(source.num_samples, chunk_samples, BASIS_SAMPLE_CHUNKS, seed):
        traces, _ = scaled.window(int(start), int(end), margin)
        rows, channels = detect_in_window(traces, tables, geometry, (margin, margin + int(end - start)))
        waveforms.append(gather_snippets(traces, rows, channels[:, None], geometry)[:, :, 0])
    return torch.cat(waveforms)


def temporal_basis(waveforms: torch.Tensor, rank: int) -> torch.Tensor:
    """(T, rank) orthonormal basis: leading right singular vectors of ``waveforms`` (n, T).
    Raises NothingToSort when there are too few."""
    if len(waveforms) < max(rank, 10):
        raise NothingToSort(f"only {len(waveforms)} spikes crossed the sorting threshold in "
                            f"{BASIS_SAMPLE_CHUNKS} sampled chunks; cannot learn waveform features")
    _, _, vh = torch.linalg.svd(waveforms.double(), full_matrices=False)
    return vh[:rank].T.float().contiguous()


@dataclass
class SpikeSubset:
    """Spikes kept for clustering.

    Attributes
    ----------
    samples : (n,) int64, recording samples of the troughs
    channels : (n,) int64, peak channels
    features : (n, R, K) float32 (float16 while streaming), the snippet on the peak channel's
        neighbourhood projected on the basis
    detected : int, spikes detected in the whole recording
    """

    samples: np.ndarray
    channels: np.ndarray
    features: np.ndarray
    detected: int


class _Reservoir:
    """Per peak channel, the ``cap`` spikes with the smallest random keys seen so far."""

    def __init__(self, cap: int, num_channels: int, seed: int):
        self.cap, self.rng = cap, np.random.default_rng(seed)
        self.limit = cap * num_channels + 200_000  # prune above this many held spikes
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.held = 0
        self.seen = 0

    def add(self, samples: np.ndarray, channels: np.ndarray, features: np.ndarray) -> None:
        keys = self.rng.random(len(samples))
        self.parts.append((keys, samples, channels, features.astype(np.float16)))
        self.held += len(samples)
        self.seen += len(samples)
        if self.held > self.limit:
            self._prune()

    def _prune(self) -> None:
        keys, samples, channels, features = (np.concatenate(x) for x in zip(*self.parts))
        order = np.lexsort((keys, channels))
        channels_sorted = channels[order]
        starts = np.searchsorted(channels_sorted, channels_sorted, side="left")
        keep = np.sort(order[np.arange(len(order)) - starts < self.cap])
        self.parts = [(keys[keep], samples[keep], channels[keep], features[keep])]
        self.held = len(keep)

    def subset(self) -> SpikeSubset:
        if not self.parts:
            raise NothingToSort("no spike crossed the sorting threshold")
        self._prune()
        _, samples, channels, features = self.parts[0]
        order = np.argsort(samples, kind="stable")
        return SpikeSubset(samples[order], channels[order], features[order].astype(np.float32), self.seen)


def collect_spikes(scaled: ScaledSource, detector: FootprintDetector, neighbourhoods: Neighbourhoods,
                   basis: torch.Tensor, geometry: SnippetGeometry, params: SortingParams, chunk_samples: int,
                   progress: ProgressFn | None = None) -> SpikeSubset:
    """Detect spikes over the whole recording (``detector``: footprint detection, peaks on the centre
    channel) and keep a bounded uniform subset with features."""
    source = scaled.source
    reservoir = _Reservoir(params.max_spikes_per_channel, source.num_channels, params.seed)
    margin = geometry.width
    backoff = OomBackoff(chunk_samples, min_chunk_samples=4 * margin, device=scaled.device)

    def step(lo: int, hi: int) -> None:
        traces, first = scaled.window(lo, hi, margin)
        rows, channels = detector.detect(traces, (margin, margin + hi - lo))
        neighbours = neighbourhoods.channels[channels]
        snippets = gather_snippets(traces, rows, neighbours, geometry)
        snippets = snippets * neighbourhoods.valid[channels][:, None, :]
        features = torch.einsum("ntk,tr->nrk", snippets, basis)
        reservoir.add((rows + first).cpu().numpy(), channels.cpu().numpy(), features.cpu().numpy())

    for start, end in chunk_ranges(source.num_samples, chunk_samples):
        backoff.run(step, int(start), int(end))
        if progress is not None:
            progress(int(end), source.num_samples)
    subset = reservoir.subset()
    log.info("sorting: %d spikes detected, %d kept for clustering", subset.detected, len(subset.samples))
    return subset


#: Quantile over sampled chunks of each channel's per-chunk noise level (see robust_noise_levels).
NOISE_CHUNK_QUANTILE = 0.8
#: Chunks sampled for the noise levels, and their length (s).
NOISE_CHUNKS, NOISE_CHUNK_S = 20, 0.33


def robust_noise_levels(source: TraceSource, seed: int) -> np.ndarray:
    """(C,) per-channel noise level (source units): each of :data:`NOISE_CHUNKS` sampled chunks'
    MAD / 0.6745 (``peaks.chunk_noise_mads``), then the :data:`NOISE_CHUNK_QUANTILE` quantile over chunks.

    Motion correction attenuates a channel while its corrected position lies off the probe (its
    interpolation weights vanish there); a median over chunks would take that quiet level for the
    channel's noise and flood it with false detections whenever it is not attenuated. A channel
    that is constant everywhere gets the median level of the others.
    """
    if source.num_samples == 0:
        raise BadInputError("cannot estimate the noise of an empty recording")
    levels = chunk_noise_mads(source, chunk_samples=max(int(round(NOISE_CHUNK_S * source.sampling_rate_hz)), 1),
                              num_chunks=NOISE_CHUNKS, seed=seed)
    noise = torch.quantile(levels, NOISE_CHUNK_QUANTILE, dim=1).numpy()
    usable = np.isfinite(noise) & (noise > 0)
    if not usable.any():
        raise NothingToSort("every channel of the recording is constant")
    return np.where(usable, noise, np.median(noise[usable]))
