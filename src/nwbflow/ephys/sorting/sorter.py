"""Our sorter from end to end: ``sort_traces`` runs features, clustering, matching and merges.

Passes over the recording (each streamed in chunks, memory bounded by a chunk plus the
clustering subset):

1. noise levels, then peak-channel waveforms from sampled chunks: the temporal basis and the
   prototypes of footprint detection (:mod:`~nwbflow.ephys.sorting.detection`), whose score
   noise is measured on chunks sampled once (and reused by matching's score noise);
2. footprint detection over the whole recording, keeping a bounded uniform subset of spikes
   with features;
3. clustering per centre channel, templates from the cluster means, duplicates collapsed;
4. ``template_update_passes`` matching passes over chunks sampled up to ``template_update_s``,
   each re-estimating the templates from the residual plus own-template snippets of the
   matched spikes (count-weighted means);
5. the final matching pass, then merges of over-split units and removal of tiny, satellite and
   misaligned units (:mod:`~nwbflow.ephys.sorting.curation`; their templates still take part
   in matching).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ephys.chunks import ProgressFn, TraceSource, sample_chunk_ranges
from nwbflow.ephys.sorting.curation import curate
from nwbflow.ephys.sorting.detection import (NOISE_SAMPLE_CHUNKS, FootprintDetector, sample_waveforms,
                                             sorter_noise_levels, threshold_tables, waveform_prototypes)
from nwbflow.ephys.sorting.features import collect_spikes, temporal_basis
from nwbflow.ephys.sorting.matching import match_recording, score_noise_levels
from nwbflow.ephys.sorting.templates import (cluster_into_templates, merge_duplicates, restrict_to_radius,
                                             updated_templates)
from nwbflow.ephys.sorting.traces import Neighbourhoods, NothingToSort, ScaledSource, SnippetGeometry
from nwbflow.errors import BadInputError
from nwbflow.params import DEFAULT_CHUNKS, SortingParams

log = logging.getLogger(__name__)

#: Largest shift (ms) at which two templates are compared for duplicates and merges.
MERGE_MAX_LAG_MS = 0.25
#: On the CPU a chunk's float32 traces are kept to about this size: detection and matching hold ~12 arrays of
#: a chunk's size at once (scores per prototype and footprint, their spectra, projections), which at 384
#: channels and 2 s chunks was ~1.2 GB of the sorting stage's peak; at 32 channels chunks stay 2 s.
CPU_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class SortingResult:
    """Sorted spikes and their templates.

    Attributes
    ----------
    spike_samples : (N,) int64, trough samples, ascending
    spike_units : (N,) int64, unit index 0..K-1
    spike_templates : (N,) int64, the template each spike matched (a unit may hold several)
    spike_amplitudes : (N,) float32, each spike's scaling of its template (1: the template's size)
    templates : (M, T, C) float32, in the source's units (e.g. whitened)
    template_units : (M,) int64, unit of each template; -1 for templates of dropped units
    before : int, row of the trough in a template
    noise_levels : (C,) float64, the source's per-channel noise (its units)
    detected_spikes : int, threshold crossings of the detection pass
    nothing_found : str, why there are no units ("" when there are)
    """

    spike_samples: np.ndarray
    spike_units: np.ndarray
    spike_templates: np.ndarray
    spike_amplitudes: np.ndarray
    templates: np.ndarray
    template_units: np.ndarray
    before: int
    noise_levels: np.ndarray
    detected_spikes: int
    nothing_found: str = ""

    @property
    def num_units(self) -> int:
        return int(self.template_units.max()) + 1 if self.template_units.size else 0


def sort_traces(source: TraceSource, channel_positions_um: np.ndarray, params: SortingParams, *,
                chunk_duration_s: float = DEFAULT_CHUNKS.sorting_s, seed: int = 0,
                device: torch.device | str = "cpu", noise: np.ndarray | None = None,
                progress: ProgressFn | None = None, whitening_inverse: np.ndarray | None = None) -> SortingResult:
    """Sort the spikes of ``source`` (preprocessed traces, ideally whitened and motion-corrected).

    Parameters
    ----------
    source : TraceSource
        (num_samples, num_channels) traces, e.g. the motion stage's ``PreprocessedRecording.open()``.
    channel_positions_um : (num_channels, 2) float, µm
    params : SortingParams
    chunk_duration_s : float
        Samples detected and matched at once (s), the execution policy's ``chunks.sorting_s``; on the CPU at
        most ``CPU_CHUNK_BYTES`` of float32 traces too.
    seed : int
        Seed of every random choice (sampled chunks, clustering, subsets).
    device : torch.device or str
        Where every kernel runs; resolve ``"auto"`` before calling.
    noise : (num_channels,) float or None
        Per-channel noise in the source's units; default: ``detection.sorter_noise_levels``.
    progress : callable (done, total) or None
        Called after each chunk of each pass; ``total`` counts all passes' samples.
    whitening_inverse : (num_channels, num_channels) float or None
        ``W^-1`` of whitened traces (``PreprocessedRecording.whitening_inverse``): over-split units are then
        compared on the filtered scale, where one neuron's templates from two ends of a drift stay alike
        (:func:`~nwbflow.ephys.sorting.curation.merge_oversplit_units`).

    Returns
    -------
    SortingResult
        With no units, and ``nothing_found`` saying why, when the recording holds no spiking
        activity to learn from (a silent or too short recording is not an error).

    Raises
    ------
    BadInputError
        Mismatched positions.
    """
    device = torch.device(device)
    positions = np.asarray(channel_positions_um, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[0] != source.num_channels or positions.shape[1] < 2:
        raise BadInputError(f"channel_positions_um has shape {positions.shape}, expected "
                            f"({source.num_channels}, 2)")
    positions = positions[:, :2]
    fs = float(source.sampling_rate_hz)
    geometry = SnippetGeometry.of(params, fs)
    chunk_samples = max(int(round(chunk_duration_s * fs)), 8 * geometry.width)
    if device.type == "cpu":
        chunk_samples = max(min(chunk_samples, CPU_CHUNK_BYTES // (4 * source.num_channels)), 8 * geometry.width)
    try:
        return _sort(source, positions, params, geometry, chunk_samples, seed, device, noise, progress,
                     whitening_inverse)
    except NothingToSort as reason:
        log.warning("sorting found no units: %s", reason)
        empty = np.zeros(0, np.int64)
        return SortingResult(spike_samples=empty, spike_units=empty, spike_templates=empty,
                             spike_amplitudes=np.zeros(0, np.float32),
                             templates=np.zeros((0, geometry.width, source.num_channels), np.float32),
                             template_units=empty, before=geometry.before,
                             noise_levels=np.full(source.num_channels, np.nan), detected_spikes=0,
                             nothing_found=str(reason))


def _sort(source: TraceSource, positions: np.ndarray, params: SortingParams, geometry: SnippetGeometry,
          chunk_samples: int, seed: int, device: torch.device, noise: np.ndarray | None,
          progress: ProgressFn | None, whitening_inverse: np.ndarray | None) -> SortingResult:
    fs = float(source.sampling_rate_hz)
    noise = sorter_noise_levels(source, seed) if noise is None else np.asarray(noise, dtype=np.float64)
    scaled = ScaledSource(source, noise, device)
    passes = _PassProgress(progress, source.num_samples, 2 + params.template_update_passes)

    waveforms = sample_waveforms(scaled, threshold_tables(positions, fs, params.detect_threshold_mad, device),
                                 geometry, chunk_samples, seed)
    basis = temporal_basis(waveforms, params.temporal_components)
    neighbourhoods = Neighbourhoods.build(positions, params.clustering_radius_um, device)
    noise_chunks = scaled.sample(chunk_samples, NOISE_SAMPLE_CHUNKS, seed)
    detector = FootprintDetector.build(waveform_prototypes(waveforms, geometry.before, seed), geometry.before,
                                       positions, fs, params.footprint_threshold).measured(noise_chunks)
    subset = collect_spikes(scaled, detector, neighbourhoods, basis, geometry, params, chunk_samples, seed,
                            passes.next())
    templates, counts = cluster_into_templates(subset, neighbourhoods, basis, geometry, params, seed, device)
    max_lag = max(int(round(MERGE_MAX_LAG_MS * fs / 1000.0)), 1)
    templates = restrict_to_radius(templates.select(merge_duplicates(templates, counts, params.merge_similarity,
                                                                     max_lag)),
                                   positions, params.template_radius_um)
    log.info("sorting: %d clusters -> %d templates after duplicates", len(counts), templates.num_units)

    update_ranges = sample_chunk_ranges(source.num_samples, chunk_samples,
                                        max(int(round(params.template_update_s * fs / chunk_samples)), 1), seed)
    update_fraction = float(np.diff(update_ranges, axis=1).sum()) / source.num_samples
    for _ in range(params.template_update_passes):
        matches = match_recording(scaled, templates, params.match_threshold, params.match_passes, chunk_samples,
                                  score_noise_levels(noise_chunks, templates), accumulate=True, ranges=update_ranges,
                                  progress=passes.next())
        templates = updated_templates(templates, matches.snippet_sums, matches.snippet_counts, params, positions,
                                      max_lag, update_fraction)
    matches = match_recording(scaled, templates, params.match_threshold, params.match_passes, chunk_samples,
                              score_noise_levels(noise_chunks, templates), progress=passes.next())
    filtered = None if whitening_inverse is None else templates.unwhitened(noise, whitening_inverse)
    curated = curate(matches, templates, params, fs, source.num_samples, max_lag, filtered)
    kept = curated.spike_units >= 0
    log.info("sorting: %d templates -> %d units, %d spikes", templates.num_units, curated.num_units, int(kept.sum()))
    return SortingResult(spike_samples=matches.samples[kept], spike_units=curated.spike_units[kept],
                         spike_templates=matches.units[kept], spike_amplitudes=matches.amplitudes[kept],
                         templates=templates.dense().cpu().numpy() * noise.astype(np.float32),  # source's units
                         template_units=curated.template_units,
                         before=geometry.before, noise_levels=noise, detected_spikes=subset.detected)


class _PassProgress:
    """Maps each pass's (done, total) onto one count over all passes."""

    def __init__(self, progress: ProgressFn | None, samples: int, passes: int):
        self.progress, self.samples, self.passes, self.index = progress, samples, passes, -1

    def next(self) -> Callable[[int, int], None] | None:
        self.index += 1
        if self.progress is None:
            return None
        offset, total = self.index * self.samples, self.passes * self.samples
        return lambda done, _total: self.progress(offset + done, total)
