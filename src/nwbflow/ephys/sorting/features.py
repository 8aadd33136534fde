"""The SVD temporal basis and the clustering subset: detected spikes as features.

Kilosort's compression is kept: every channel's waveform is projected on one shared temporal
basis of rank ``R`` (the leading right singular vectors of peak-channel waveforms), so a spike
becomes ``R x K`` features on its peak channel's neighbourhood and a template ``B @ U.T`` with
``B`` (T, R) and ``U`` (C, R).

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
from nwbflow.ephys.chunks import ProgressFn, chunk_ranges
from nwbflow.ephys.sorting.detection import BASIS_SAMPLE_CHUNKS, FootprintDetector
from nwbflow.ephys.sorting.traces import (Neighbourhoods, NothingToSort, ScaledSource, SnippetGeometry,
                                          gather_snippets)
from nwbflow.params import SortingParams

log = logging.getLogger(__name__)


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
                   seed: int, progress: ProgressFn | None = None) -> SpikeSubset:
    """Detect spikes over the whole recording (``detector``: footprint detection, peaks on the centre
    channel) and keep a bounded uniform subset with features."""
    source = scaled.source
    reservoir = _Reservoir(params.max_spikes_per_channel, source.num_channels, seed)
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
