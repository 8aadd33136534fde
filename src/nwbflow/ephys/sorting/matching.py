"""Template matching by convolution with residual subtraction, streamed over the recording.

For each chunk (read with a margin of twice the template width, noise-scaled):

1. the traces are correlated with the ``R`` temporal basis vectors on every channel (by FFT,
   :func:`~nwbflow.ephys.filtering.correlate_valid`), then with each template's spatial
   components (one matrix product):
   ``score[k, t] = <traces around t, W_k>`` for every unit ``k`` and trough time ``t``;
2. the best unit at each time is the one whose subtraction removes the most energy,
   ``score^2 / ||W_k||^2`` (amplitude ``a = score / ||W_k||^2`` within :data:`AMPLITUDE_RANGE`),
   among the units whose score reaches ``match_threshold`` standard deviations of that unit's
   matched-filter output on noise (band-passed noise is correlated in time, so that is not
   ``||W_k||``: :func:`score_noise_levels` measures it); times where the best is a local
   maximum (± half a template) are spikes;
3. the spikes are subtracted: instead of recomputing the scores on the residual, each
   subtraction updates them through the templates' shifted inner products
   (``Templates.cross_products``) — exact, and cheap;
4. steps 2-3 repeat (``match_passes``): spikes hidden under larger overlapping ones appear
   in later passes; finally each amplitude is refitted once against the residual of all the
   others (greedy amplitudes of overlapping spikes are biased by their neighbours).

Spikes in the margins are matched too (so the core's neighbours are subtracted) but only
those whose trough lies in the core are kept: each spike belongs to exactly one chunk.
Optionally the residual plus each spike's own template is accumulated per unit, which
re-estimates the templates from the matched spikes (``template_update_passes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.device import OomBackoff
from nwbflow.ephys.chunks import ProgressFn, chunk_ranges
from nwbflow.ephys.filtering import correlate_valid
from nwbflow.ephys.sorting.templates import Templates
from nwbflow.ephys.sorting.traces import SampledChunks, ScaledSource

#: Accepted template scalings ``a`` of a match (1: the template's own size). Below 0.6, matches on
#: a large unit's subtraction residual (its spike-to-spike variation) take over from genuine
#: small spikes: 0.5-0.6 copies of a 23-noise-SD unit's residual, 0.27 ms after each of its spikes.
AMPLITUDE_RANGE = (0.6, 2.5)
#: Scores whose window comes within a template width of a sample this far from zero (noise
#: units) on the template's channels are left out of its noise level (they hold a spike).
NOISE_EXCLUSION_LEVEL = 4.0
#: The fewest quiet scores trusted to measure a template's noise level.
MIN_NOISE_SCORES = 1000
#: Spikes whose score updates are applied in one batch (bounds memory: K x batch x (2T - 1) floats).
UPDATE_BATCH = 512


@dataclass(frozen=True)
class MatchTables:
    """Constants of one matching pass, on the device."""

    templates: Templates
    dense: torch.Tensor          # (K, T, C)
    squared_norms: torch.Tensor  # (K,)
    products: torch.Tensor       # (K, K, 2T-1)
    min_energy: torch.Tensor     # (K,) energy a match must remove: threshold^2 x score variance / ||W||^2
    passes: int

    @classmethod
    def build(cls, templates: Templates, threshold: float, passes: int, score_noise: torch.Tensor) -> MatchTables:
        dense = templates.dense()
        squared_norms = templates.squared_norms().clamp(min=1e-12)
        return cls(templates, dense, squared_norms, templates.cross_products(),
                   threshold ** 2 * score_noise.clamp(min=1e-6) ** 2 / squared_norms, passes)


def template_scores(traces: torch.Tensor, templates: Templates) -> torch.Tensor:
    """(K, S - T + 1) matched-filter outputs ``<traces[t : t + T], W_k>`` of ``traces`` (S, C)."""
    num_units = templates.num_units
    projected = correlate_valid(traces, templates.basis.T)  # (R, C, L)
    return templates.spatial.transpose(1, 2).reshape(num_units, -1) @ projected.flatten(0, 1)


def score_noise_levels(noise_chunks: SampledChunks, templates: Templates) -> torch.Tensor:
    """(K,) standard deviation of each template's matched-filter output on the recording's noise.

    Measured, not modelled: band-passed noise is correlated in time and, after a whitening
    estimated on spiking data, across channels too, so the output's spread is neither
    ``||W_k||`` nor a per-channel model of it (for a small unit beside large ones such a model
    was 18 % too high). Scores are computed on the sorter's sampled noise chunks
    (``detection.NOISE_SAMPLE_CHUNKS``, read once per sort); a score is left out when its window
    comes within a template width of a sample beyond :data:`NOISE_EXCLUSION_LEVEL` on any of the
    template's channels (a spike, not noise); a template left with fewer than
    :data:`MIN_NOISE_SCORES` quiet scores uses all of them.
    """
    width = templates.width
    support = (templates.spatial.abs().sum(dim=2) > 0).T.float()  # (C, K)
    quiet_sums, quiet_counts, all_sums = (torch.zeros(templates.num_units, dtype=torch.float64,
                                                      device=templates.spatial.device) for _ in range(3))
    scored = 0  # scores per template, quiet or not
    for traces in noise_chunks.scaled():
        if traces.shape[0] < width:
            continue
        squares = template_scores(traces, templates).T ** 2  # (L, K), float32; sums in float64
        loud = (traces.abs() > NOISE_EXCLUSION_LEVEL).T.float().unsqueeze(1)  # (C, 1, S)
        near = torch.nn.functional.max_pool1d(loud, 2 * width + 1, stride=1, padding=width).squeeze(1)
        quiet = ((near.T[:squares.shape[0]] @ support) == 0).float()  # (L, K)
        quiet_sums += (squares * quiet).sum(dim=0, dtype=torch.float64)
        quiet_counts += quiet.sum(dim=0, dtype=torch.float64)
        all_sums += squares.sum(dim=0, dtype=torch.float64)
        scored += squares.shape[0]
    if scored == 0:
        return templates.squared_norms().sqrt()  # no sampled chunk as long as a template: white noise's value
    variance = torch.where(quiet_counts >= MIN_NOISE_SCORES, quiet_sums / quiet_counts.clamp(min=1),
                           all_sums / scored)
    return variance.sqrt().float()


@dataclass
class Matches:
    """Spikes found by matching: trough samples (int64), units (int64), amplitude scalings (float32)."""

    samples: np.ndarray
    units: np.ndarray
    amplitudes: np.ndarray
    snippet_sums: torch.Tensor | None = None  # (K, T, C) sum of residual + own template per unit
    snippet_counts: torch.Tensor | None = None  # (K,)


def match_window(traces: torch.Tensor, tables: MatchTables, core: tuple[int, int],
                 sums: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matches in one window of noise-scaled ``traces`` (S, C): (trough rows, units, amplitudes) of
    the spikes whose row lies in ``core`` = [lo, hi). Adds residual snippets to ``sums``/``counts``."""
    templates = tables.templates
    width, before = templates.width, templates.before
    num_units = templates.num_units
    length = traces.shape[0] - width + 1
    empty = (torch.zeros(0, dtype=torch.int64, device=traces.device),) * 2 + (torch.zeros(0, device=traces.device),)
    if length <= 0 or num_units == 0:
        return empty
    scores = template_scores(traces, templates)
    low, high = AMPLITUDE_RANGE
    half = max(width // 2, 1)
    lags = torch.arange(-(width - 1), width, device=traces.device)
    found = []
    for _ in range(tables.passes):
        amplitude = scores / tables.squared_norms[:, None]
        energy = scores * amplitude
        energy = torch.where((amplitude >= low) & (amplitude <= high) & (energy >= tables.min_energy[:, None]),
                             energy, 0.0)
        best, unit = energy.max(dim=0)
        pooled = torch.nn.functional.max_pool1d(best.view(1, 1, -1), 2 * half + 1, stride=1, padding=half).view(-1)
        starts = torch.nonzero((best >= pooled) & (best > 0)).flatten()
        if starts.numel() == 0:
            break
        units = unit[starts]
        scale = amplitude[units, starts]
        found.append((starts, units, scale))
        for lo in range(0, starts.numel(), UPDATE_BATCH):
            batch = slice(lo, lo + UPDATE_BATCH)
            columns = starts[batch, None] + lags[None, :]  # (b, 2T-1)
            valid = (columns >= 0) & (columns < length)
            update = tables.products[:, units[batch], :] * scale[batch][None, :, None]  # (K, b, 2T-1)
            scores.index_add_(1, columns[valid], -update[:, valid])
    if not found:
        return empty
    starts, units, scale = (torch.cat(parts) for parts in zip(*found))
    # One Gauss-Seidel sweep: the scores now hold <residual, W_k>, so adding each spike's own share
    # back refits its amplitude given all the others (greedy amplitudes of overlapping spikes are biased).
    scale = scale + scores[units, starts] / tables.squared_norms[units]
    rows = starts + before
    if sums is not None:
        _accumulate_snippets(traces, tables, starts, units, scale, rows, core, sums, counts)
    keep = (rows >= core[0]) & (rows < core[1])
    return rows[keep], units[keep], scale[keep]


def _accumulate_snippets(traces: torch.Tensor, tables: MatchTables, starts: torch.Tensor, units: torch.Tensor,
                         scale: torch.Tensor, rows: torch.Tensor, core: tuple[int, int], sums: torch.Tensor,
                         counts: torch.Tensor) -> None:
    """Add (residual + own template) snippets of the core's spikes to ``sums``/``counts`` per unit."""
    width = tables.templates.width
    offsets = torch.arange(width, device=traces.device)
    residual = traces.clone()
    for lo in range(0, starts.numel(), UPDATE_BATCH):
        batch = slice(lo, lo + UPDATE_BATCH)
        placed = (starts[batch, None] + offsets[None, :]).flatten()
        residual.index_add_(0, placed, -(tables.dense[units[batch]] * scale[batch, None, None]).flatten(0, 1))
    keep = torch.nonzero((rows >= core[0]) & (rows < core[1])).flatten()
    for lo in range(0, keep.numel(), UPDATE_BATCH):
        chosen = keep[lo: lo + UPDATE_BATCH]
        snippets = residual[starts[chosen, None] + offsets[None, :]]  # (b, T, C)
        snippets += tables.dense[units[chosen]] * scale[chosen, None, None]
        sums.index_add_(0, units[chosen], snippets)
        counts.index_add_(0, units[chosen], torch.ones_like(units[chosen], dtype=counts.dtype))


def match_recording(scaled: ScaledSource, templates: Templates, threshold: float, passes: int, chunk_samples: int,
                    score_noise: torch.Tensor, *, accumulate: bool = False, ranges: np.ndarray | None = None,
                    progress: ProgressFn | None = None) -> Matches:
    """Template matching over the recording, chunk by chunk (memory: one chunk).

    ``threshold`` is in units of ``score_noise`` (K,), each template's matched-filter output
    standard deviation on noise (:func:`score_noise_levels`; ``||W_k||`` for white noise).
    ``ranges`` (n, 2) restricts matching to those chunks of the grid (default: all of it)."""
    source, device = scaled.source, scaled.device
    tables = MatchTables.build(templates, threshold, passes, score_noise)
    margin = 2 * templates.width
    sums = counts = None
    if accumulate:
        sums = torch.zeros((templates.num_units, templates.width, source.num_channels), device=device)
        counts = torch.zeros(templates.num_units, dtype=torch.int64, device=device)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    backoff = OomBackoff(chunk_samples, min_chunk_samples=2 * margin, device=device)

    def step(lo: int, hi: int) -> None:
        traces, first = scaled.window(lo, hi, margin)
        # Per-chunk sums, added only once the chunk succeeded: a chunk retried after an OOM counts once.
        chunk_sums = None if sums is None else torch.zeros_like(sums)
        chunk_counts = None if counts is None else torch.zeros_like(counts)
        rows, units, scale = match_window(traces, tables, (margin, margin + hi - lo), chunk_sums, chunk_counts)
        parts.append(((rows + first).cpu().numpy(), units.cpu().numpy(), scale.float().cpu().numpy()))
        if sums is not None:
            sums.add_(chunk_sums)
            counts.add_(chunk_counts)

    ranges = chunk_ranges(source.num_samples, chunk_samples) if ranges is None else ranges
    for done, (start, end) in enumerate(ranges, start=1):
        backoff.run(step, int(start), int(end))
        if progress is not None:
            progress(done * source.num_samples // len(ranges), source.num_samples)
    if parts:
        samples, units, amplitudes = (np.concatenate(column) for column in zip(*parts))
    else:
        samples, units, amplitudes = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    order = np.argsort(samples, kind="stable")
    return Matches(samples[order].astype(np.int64), units[order].astype(np.int64), amplitudes[order], sums, counts)
