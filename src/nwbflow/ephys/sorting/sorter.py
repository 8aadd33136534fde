"""Our sorter from end to end: ``sort_traces`` runs features, clustering, matching and merges.

Passes over the recording (each streamed in chunks, memory bounded by a chunk plus the
clustering subset):

1. noise levels, then peak-channel waveforms from sampled chunks: the temporal basis and the
   prototypes of footprint detection (:mod:`~nwbflow.ephys.sorting.detection`), whose score
   noise is measured on sampled chunks too;
2. footprint detection over the whole recording, keeping a bounded uniform subset of spikes
   with features;
3. clustering per centre channel, templates from the cluster means, duplicates collapsed;
4. ``template_update_passes`` matching passes over chunks sampled up to ``template_update_s``,
   each re-estimating the templates from the residual plus own-template snippets of the
   matched spikes (count-weighted means);
5. the final matching pass, then merges of over-split units and removal of tiny, satellite and
   misaligned units (:mod:`~nwbflow.ephys.sorting.postprocess`; their templates still take part
   in matching).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ephys.chunks import ProgressFn, TraceSource, sample_chunk_ranges
from nwbflow.ephys.sorting.clustering import cluster_features
from nwbflow.ephys.sorting.detection import FootprintDetector, waveform_prototypes
from nwbflow.ephys.sorting.features import (Neighbourhoods, ScaledSource, SnippetGeometry, SpikeSubset,
                                            NothingToSort, collect_spikes, detection_tables, robust_noise_levels,
                                            sample_waveforms, temporal_basis)
from nwbflow.ephys.sorting.matching import Matches, match_recording, score_noise_levels
from nwbflow.ephys.sorting.postprocess import merge_oversplit_units, misaligned_units, satellite_units
from nwbflow.ephys.sorting.templates import Templates, merge_duplicates, restrict_to_radius, template_basis
from nwbflow.errors import BadInputError
from nwbflow.params import SortingParams

log = logging.getLogger(__name__)

#: Largest shift (ms) at which two templates are compared for duplicates and merges.
MERGE_MAX_LAG_MS = 0.25


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
                device: torch.device | str = "cpu", noise: np.ndarray | None = None,
                progress: ProgressFn | None = None) -> SortingResult:
    """Sort the spikes of ``source`` (preprocessed traces, ideally whitened and motion-corrected).

    Parameters
    ----------
    source : TraceSource
        (num_samples, num_channels) traces, e.g. ``open_binary`` of the motion stage's ``corrected.bin``.
    channel_positions_um : (num_channels, 2) float, µm
    params : SortingParams
    device : torch.device or str
        Where every kernel runs; resolve ``"auto"`` before calling.
    noise : (num_channels,) float or None
        Per-channel noise in the source's units; default: robust estimate from sampled chunks.
    progress : callable (done, total) or None
        Called after each chunk of each pass; ``total`` counts all passes' samples.

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
    try:
        return _sort(source, positions, params, device, noise, progress)
    except NothingToSort as reason:
        log.warning("sorting found no units: %s", reason)
        geometry, empty = SnippetGeometry.of(params, fs), np.zeros(0, np.int64)
        return SortingResult(spike_samples=empty, spike_units=empty, spike_templates=empty,
                             spike_amplitudes=np.zeros(0, np.float32),
                             templates=np.zeros((0, geometry.width, source.num_channels), np.float32),
                             template_units=empty, before=geometry.before,
                             noise_levels=np.full(source.num_channels, np.nan), detected_spikes=0,
                             nothing_found=str(reason))


def _sort(source: TraceSource, positions: np.ndarray, params: SortingParams, device: torch.device,
          noise: np.ndarray | None, progress: ProgressFn | None) -> SortingResult:
    fs = float(source.sampling_rate_hz)
    geometry = SnippetGeometry.of(params, fs)
    chunk_samples = max(int(round(params.chunk_duration_s * fs)), 8 * geometry.width)
    noise = robust_noise_levels(source, params.seed) \
        if noise is None else np.asarray(noise, dtype=np.float64)
    scaled = ScaledSource(source, noise, device)
    passes = _PassProgress(progress, source.num_samples, 2 + params.template_update_passes)

    tables = detection_tables(positions, fs, params, device)
    waveforms = sample_waveforms(scaled, tables, geometry, chunk_samples, params.seed)
    basis = temporal_basis(waveforms, params.temporal_components)
    neighbourhoods = Neighbourhoods.build(positions, params.clustering_radius_um, device)
    detector = FootprintDetector.build(waveform_prototypes(waveforms, geometry.before, params.seed), geometry.before,
                                       positions, fs, params.footprint_threshold)
    detector = detector.measured(scaled, chunk_samples, params.seed)
    subset = collect_spikes(scaled, detector, neighbourhoods, basis, geometry, params, chunk_samples, passes.next())
    templates, counts = initial_templates(subset, neighbourhoods, basis, geometry, params, device)
    max_lag = max(int(round(MERGE_MAX_LAG_MS * fs / 1000.0)), 1)
    templates = restrict_to_radius(templates.select(merge_duplicates(templates, counts, params.merge_similarity,
                                                                     max_lag)),
                                   positions, params.template_radius_um)
    log.info("sorting: %d clusters -> %d templates after duplicates", len(counts), templates.num_units)

    update_ranges = sample_chunk_ranges(source.num_samples, chunk_samples,
                                        max(int(round(params.template_update_s * fs / chunk_samples)), 1), params.seed)
    update_fraction = float(np.diff(update_ranges, axis=1).sum()) / source.num_samples
    for _ in range(params.template_update_passes):
        matches = match_recording(scaled, templates, params.match_threshold, params.match_passes, chunk_samples,
                                  score_noise_levels(scaled, templates, chunk_samples, params.seed),
                                  accumulate=True, ranges=update_ranges, progress=passes.next())
        templates = updated_templates(templates, matches, params, positions, max_lag, update_fraction)
    matches = match_recording(scaled, templates, params.match_threshold, params.match_passes, chunk_samples,
                              score_noise_levels(scaled, templates, chunk_samples, params.seed),
                              progress=passes.next())
    spike_units, template_units = merge_oversplit_units(matches, templates, params, fs, source.num_samples, max_lag)
    num_units = int(template_units.max()) + 1
    scaled_templates = templates.dense().cpu().numpy()  # noise units, as matched
    sizes = np.zeros(num_units)
    np.maximum.at(sizes, template_units, np.abs(scaled_templates).max(axis=(1, 2)))
    big = np.bincount(spike_units, minlength=num_units) >= params.min_unit_spikes
    big &= ~satellite_units(matches.samples, spike_units, sizes, templates.width)
    big &= ~misaligned_units(scaled_templates, template_units, num_units, geometry.before, fs)
    renumber = np.where(big, np.cumsum(big) - 1, -1)
    kept = renumber[spike_units] >= 0
    log.info("sorting: %d templates -> %d units, %d spikes", templates.num_units, int(big.sum()), int(kept.sum()))
    return SortingResult(spike_samples=matches.samples[kept], spike_units=renumber[spike_units][kept],
                         spike_templates=matches.units[kept], spike_amplitudes=matches.amplitudes[kept],
                         templates=scaled_templates * noise.astype(np.float32),  # source's units
                         template_units=renumber[template_units],
                         before=geometry.before, noise_levels=noise, detected_spikes=subset.detected)


def initial_templates(subset: SpikeSubset, neighbourhoods: Neighbourhoods, basis: torch.Tensor,
                      geometry: SnippetGeometry, params: SortingParams,
                      device: torch.device) -> tuple[Templates, torch.Tensor]:
    """Cluster each peak channel's spikes; one template per cluster (mean features). Returns the
    templates and each one's spike count in the subset."""
    num_channels = neighbourhoods.channels.shape[0]
    spatial, counts = [], []
    features = torch.as_tensor(subset.features, device=device)
    channels = torch.as_tensor(subset.channels, device=device)
    for channel in torch.unique(channels).tolist():
        members = torch.nonzero(channels == channel).flatten()
        labels = cluster_features(features[members], params.min_cluster_spikes, params.bimodality_threshold,
                                  params.seed + channel)
        neighbours, valid = neighbourhoods.channels[channel], neighbourhoods.valid[channel]
        for label in range(int(labels.max()) + 1 if labels.numel() else 0):
            chosen = members[labels == label]
            mean = features[chosen].mean(dim=0)  # (R, K)
            full = torch.zeros((num_channels, basis.shape[1]), device=device)
            full[neighbours[valid]] = mean[:, valid].T
            spatial.append(full)
            counts.append(len(chosen))
    if not spatial:
        raise NothingToSort(f"no cluster of at least {params.min_cluster_spikes} spikes among the "
                            f"{len(subset.samples)} detected")
    return (Templates(basis, torch.stack(spatial), geometry.before),
            torch.as_tensor(counts, dtype=torch.int64, device=device))


def updated_templates(templates: Templates, matches: Matches, params: SortingParams, positions: np.ndarray,
                      max_lag: int, fraction: float = 1.0) -> Templates:
    """Templates re-estimated as the mean (residual + own template) snippet of their matched spikes
    in a ``fraction`` of the recording; units with fewer than ``min_unit_spikes`` matches (scaled
    by ``fraction``) are dropped, duplicates collapsed."""
    counts = matches.snippet_counts
    alive = counts >= max(params.min_unit_spikes * fraction, 1.0)
    if not bool(alive.any()):
        raise NothingToSort(f"template matching found no unit with at least {params.min_unit_spikes} spikes")
    means = matches.snippet_sums[alive] / counts[alive, None, None]
    refreshed = Templates.from_dense(means, template_basis(means, templates.basis.shape[1]), templates.before)
    refreshed = restrict_to_radius(refreshed, positions, params.template_radius_um)
    return refreshed.select(merge_duplicates(refreshed, counts[alive], params.merge_similarity, max_lag))


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
