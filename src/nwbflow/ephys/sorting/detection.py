"""The sorter's detection, in one place: noise levels, threshold detection, footprint detection.

**Noise levels.** The sorter scales each channel by its robust noise level
(:func:`sorter_noise_levels`: :func:`nwbflow.ephys.noise.robust_noise_levels`); detection thresholds
below are in those units.

**Threshold detection** samples waveforms: locally exclusive peaks of the noise-scaled traces
beyond ``detect_threshold_mad`` in :data:`BASIS_SAMPLE_CHUNKS` sampled chunks (exclusion
:data:`EXCLUSION_UM`, ± :data:`THRESHOLD_SWEEP_MS`: one spike per neighbourhood, sampled once at its
largest channel) give the peak-channel waveforms that teach the temporal basis and the prototypes.

**Footprint detection** feeds clustering: generic matched filters summed over each channel's
neighbourhood.

A small unit's spike may stay under a per-channel threshold on every channel, yet its energy
summed over the samples and channels it spans stands well above the noise (the idea behind
Kilosort 4's universal templates). On the 300 s benchmark a 19 µV unit peaks at 2.9 noise SD
on its best channel, so 11 % of its spikes cross 5.5 MAD there; footprint scores find 86 %
at 5 SD. Each chunk of noise-scaled traces is

1. correlated in time with ``P`` prototype waveforms (unit norm, trough at ``before``):
   k-means centres of peak-channel waveforms sampled by per-channel detection;
2. summed over channels with Gaussian footprints (unit norm, :data:`FOOTPRINT_SIGMAS_UM`)
   centred on every channel: ``score[t, c] = sum_k u_ck (w * x_k)[t]``;
3. divided by that (prototype, footprint) score's noise SD, measured on sampled chunks
   (median absolute deviation: spikes are rare, and band-passed noise is correlated in time,
   so it is not 1);

and the best normalised score over prototypes and footprints at each (trough sample, centre
channel) is detected like peaks: at least the threshold, the maximum of its neighbourhood
(:data:`EXCLUSION_UM`, ± :data:`FOOTPRINT_SWEEP_MS`; a matched-filter output is wider than the spike),
the first of ties.

Summing over a footprint also lifts what a large spike leaves on channels far from it: the
median common reference shifts with the spike on every channel (an echo about a sixth of the
spike's score) and the band-pass rings before and after it. So a detection is dropped when a
score :data:`ECHO_RATIO` times its own lies anywhere on the probe within ± ``before`` samples.
On the benchmark that removes 88 % of those echoes and 8 % of true detections (the ones
coincident with a much larger spike), which only thins the clustering sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ephys.chunks import TraceSource, sample_chunk_ranges
from nwbflow.ephys.filtering import correlate_valid
from nwbflow.ephys.local_matrix import LocalMatrix, depth_keys
from nwbflow.ephys.localize import neighbour_table
from nwbflow.ephys.noise import MAD_TO_SD, robust_noise_levels
from nwbflow.ephys.peaks import DetectionTables, first_of_ties, neighbourhood_maxima
from nwbflow.ephys.sorting.clustering import kmeans
from nwbflow.ephys.sorting.traces import NothingToSort, SampledChunks, ScaledSource, SnippetGeometry, gather_snippets

#: Exclusion radius (µm) of both detections: a spike is detected once per neighbourhood.
EXCLUSION_UM = 50.0
#: Half-sweeps (ms) of threshold detection (~ a trough's width) and of footprint detection (a
#: matched-filter output is wider than the spike).
THRESHOLD_SWEEP_MS, FOOTPRINT_SWEEP_MS = 0.3, 1.0
#: Chunks sampled to learn the temporal basis and the detection prototypes.
BASIS_SAMPLE_CHUNKS = 30
#: Chunks sampled once per sort to measure score noise (footprint scores here, template outputs in matching).
NOISE_SAMPLE_CHUNKS = 5
#: k-means centres tried as prototype waveforms (those whose trough is not at ``before`` are left out).
NUM_PROTOTYPES = 2
#: Footprint widths (Gaussian SD, µm) and the distance footprints are cut at (in SDs of the widest).
FOOTPRINT_SIGMAS_UM = (15.0, 30.0)
FOOTPRINT_CUTOFF_SIGMAS = 2.5
#: A detection is dropped when a score this many times its own lies within ± ``before`` samples.
ECHO_RATIO = 4.0
#: Time step (samples) of the scores kept to measure their noise.
NOISE_SAMPLE_STEP = 7


def sorter_noise_levels(source: TraceSource, seed: int) -> np.ndarray:
    """(C,) the noise level each channel is divided by (source units): :func:`robust_noise_levels`.
    Raises NothingToSort when every channel is constant."""
    noise = robust_noise_levels(source, seed)
    if not np.isfinite(noise).any():
        raise NothingToSort("every channel of the recording is constant")
    return noise


def threshold_tables(channel_positions_um: np.ndarray, sampling_rate_hz: float, threshold: float,
                     device: torch.device) -> DetectionTables:
    """Threshold detection on noise-scaled traces (noise 1 on every channel), negative peaks."""
    return DetectionTables.build(channel_positions_um, sampling_rate_hz, threshold=threshold, peak_sign="neg",
                                 exclusion_radius_um=EXCLUSION_UM, sweep_ms=THRESHOLD_SWEEP_MS,
                                 noise_levels=np.ones(len(channel_positions_um)), device=device)


def detect_in_window(traces: torch.Tensor, tables: DetectionTables,
                     core: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks (rows, channels) of ``traces`` whose row is in ``core`` = [lo, hi) rows of the window.

    ``core`` must leave a snippet's room on both sides for the snippets.
    """
    samples, channels = neighbourhood_maxima(traces, tables)
    first = first_of_ties(samples, channels, traces.shape[0], tables)
    keep = first & (samples >= core[0]) & (samples < core[1])
    return samples[keep], channels[keep]


def sample_waveforms(scaled: ScaledSource, tables: DetectionTables, geometry: SnippetGeometry,
                     chunk_samples: int, seed: int) -> torch.Tensor:
    """(n, T) peak-channel waveforms of the spikes detected in :data:`BASIS_SAMPLE_CHUNKS` sampled chunks."""
    source = scaled.source
    margin = geometry.width
    waveforms = [torch.zeros((0, geometry.width), device=scaled.device)]
    for start, end in sample_chunk_ranges(source.num_samples, chunk_samples, BASIS_SAMPLE_CHUNKS, seed):
        traces, _ = scaled.window(int(start), int(end), margin)
        rows, channels = detect_in_window(traces, tables, (margin, margin + int(end - start)))
        waveforms.append(gather_snippets(traces, rows, channels[:, None], geometry)[:, :, 0])
    return torch.cat(waveforms)


def waveform_prototypes(waveforms: torch.Tensor, before: int, seed: int) -> torch.Tensor:
    """(P, T) unit-norm k-means centres (:data:`NUM_PROTOTYPES`) of the unit-norm ``waveforms`` (n, T),
    keeping those whose trough is at ``before`` ± 1 sample (not overlaps or misaligned spikes); the
    mean waveform when none is."""
    unit = waveforms.double() / waveforms.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    labels = kmeans(unit, NUM_PROTOTYPES, torch.Generator(device=waveforms.device).manual_seed(seed))
    centres = torch.zeros((int(labels.max()) + 1, unit.shape[1]), dtype=unit.dtype, device=unit.device)
    centres.index_add_(0, labels, unit)
    aligned = centres[(centres.argmin(dim=1) - before).abs() <= 1]
    centres = aligned if len(aligned) else centres.sum(dim=0, keepdim=True)
    return (centres / centres.norm(dim=1, keepdim=True)).float()


@dataclass(frozen=True)
class FootprintDetector:
    """Footprint detection's constants, on the device (build with :meth:`build`, then :meth:`measured`)."""

    prototypes: torch.Tensor  # (P, T), unit norm
    footprints: LocalMatrix   # (C * F, C), groups of F: row c * F + f holds footprint f centred on channel c
    noise: torch.Tensor       # (P, F) noise SD of each score
    before: int               # row of the prototypes' trough
    tables: DetectionTables   # threshold, exclusion and sweep on the normalised scores

    @classmethod
    def build(cls, prototypes: torch.Tensor, before: int, channel_positions_um: np.ndarray,
              sampling_rate_hz: float, threshold: float) -> FootprintDetector:
        """Footprints on ``channel_positions_um`` (µm); ``threshold`` in score noise SDs; noise SDs 1
        until :meth:`measured`."""
        device = prototypes.device
        positions = np.asarray(channel_positions_um, dtype=np.float64)[:, :2]
        num_channels = len(positions)
        neighbours, valid = neighbour_table(positions, FOOTPRINT_CUTOFF_SIGMAS * max(FOOTPRINT_SIGMAS_UM))
        distance = np.linalg.norm(positions[neighbours] - positions[:, None], axis=2)  # (C, K)
        footprints = np.zeros((num_channels, len(FOOTPRINT_SIGMAS_UM), num_channels))
        for index, sigma in enumerate(FOOTPRINT_SIGMAS_UM):
            weights = np.exp(-0.5 * (distance / sigma) ** 2) * valid
            np.add.at(footprints[:, index], (np.arange(num_channels)[:, None], neighbours), weights)
        footprints /= np.linalg.norm(footprints, axis=2, keepdims=True)
        tables = DetectionTables.build(positions, sampling_rate_hz, threshold=threshold, peak_sign="neg",
                                       exclusion_radius_um=EXCLUSION_UM, sweep_ms=FOOTPRINT_SWEEP_MS,
                                       noise_levels=np.ones(num_channels), device=device)
        local = LocalMatrix.build(footprints.reshape(-1, num_channels), depth_keys(positions),
                                  len(FOOTPRINT_SIGMAS_UM), device)
        return cls(prototypes, local, torch.ones((len(prototypes), len(FOOTPRINT_SIGMAS_UM)), device=device),
                   before, tables)

    def raw_scores(self, traces: torch.Tensor) -> torch.Tensor:
        """(P, F, L, C) scores of ``traces`` (S, C), L = S - T + 1; row t is the trough at t + before.

        The correlation with the prototypes is :func:`correlate_valid` (one FFT of the traces); the
        footprint sums are one local product per prototype (:class:`~nwbflow.ephys.local_matrix.LocalMatrix`)."""
        num_channels = traces.shape[1]
        return torch.stack([self.footprints.apply(one).view(num_channels, len(FOOTPRINT_SIGMAS_UM), -1)
                            .permute(1, 2, 0) for one in correlate_valid(traces, self.prototypes)])

    def measured(self, noise_chunks: SampledChunks) -> FootprintDetector:
        """The same detector with each score's noise SD (MAD / ``MAD_TO_SD``) measured on the sampled
        chunks (:data:`NOISE_SAMPLE_CHUNKS`); unchanged when no chunk is as long as a prototype."""
        parts = []
        for traces in noise_chunks.scaled():
            if traces.shape[0] >= self.prototypes.shape[1]:
                parts.append(self.raw_scores(traces)[:, :, ::NOISE_SAMPLE_STEP].flatten(2))
        if not parts:
            return self
        noise = torch.cat(parts, dim=2).abs().median(dim=2).values / MAD_TO_SD
        return FootprintDetector(self.prototypes, self.footprints, noise.clamp(min=1e-6), self.before, self.tables)

    def detect(self, traces: torch.Tensor, core: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Trough rows and centre channels of the spikes in ``traces`` (S, C) whose row is in ``core``
        = [lo, hi); ``core`` must leave a template's width on both sides."""
        best = None  # (L, C): best normalised score over prototypes and footprints, one prototype at a time
        for prototype, filtered in enumerate(correlate_valid(traces, self.prototypes)):
            scores = self.footprints.group_maxima(filtered, self.noise[prototype])
            best = scores if best is None else torch.maximum(best, scores, out=best)
        oriented = torch.zeros_like(traces)  # row r: the spike whose trough is at r (negative: peak detection)
        oriented[self.before: self.before + best.shape[0]] = -best
        rows, channels = neighbourhood_maxima(oriented, self.tables)
        keep = first_of_ties(rows, channels, oriented.shape[0], self.tables) & (rows >= core[0]) & (rows < core[1])
        rows, channels = rows[keep], channels[keep]
        loudest = torch.nn.functional.max_pool1d(-oriented.amin(dim=1).view(1, 1, -1), 2 * self.before + 1,
                                                 stride=1, padding=self.before).view(-1)
        own = -oriented[rows, channels]
        keep = loudest[rows] < ECHO_RATIO * own
        return rows[keep], channels[keep]
