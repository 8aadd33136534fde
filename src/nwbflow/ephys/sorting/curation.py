"""Curation after matching: merges of over-split units, removal of tiny, satellite and misaligned units.

:func:`curate` applies them in that order and numbers the units kept.

Two units are one neuron split in two when their templates are nearly the same shape and
their spike trains never come closer than a refractory period: their cross-correlogram has
the refractory dip an auto-correlogram has. Pairs whose templates correlate at least
``merge_similarity`` (best lag) are merged when the count of cross pairs within
``refractory_ms`` is at most :data:`REFRACTORY_FRACTION` of the count two independent trains
of those rates would give. When that expectation is too small to test
(< :data:`MIN_EXPECTED_PAIRS`), only near-identical templates (:data:`IDENTICAL_SIMILARITY`) merge.
The shapes are compared on the filtered scale when the sorter knows ``W^-1``: whitening sharpens a
footprint, so a neuron whose residual drift leaves it a few µm apart at the two ends of a drift cycle
gets two whitened templates that correlate 0.8-0.9 where its filtered ones correlate 0.95-0.98 (measured
on the 384-channel drifting benchmark, where such splits were most of the units lost); the refractory
test then decides. The near-identical rule stays on the sorted (whitened) scale, which separates
neighbouring neurons better.

A *satellite* is a small unit whose spikes are copies of larger units' spikes: most of them sit
at one fixed lag from a larger unit's spikes. What a large spike leaves that its template does
not explain is matched that way: the echo the median common reference spreads to every channel,
band-pass ringing, a fragment on channels beyond the template's radius. Independent neurons
share so fixed a lag by chance only (rate x (2 x jitter + 1) samples: a few % at most), so
satellites (:data:`SATELLITE_FRACTION` of the spikes) are dropped.

A *misaligned* unit's template does not have its trough where detection put every spike's
trough (``before``, ± :data:`TROUGH_JITTER_MS`): it was built from fragments of spikes (their
rising phase or repolarisation) rather than from spikes, and it matches the edges of other
units' spikes.

Dropped units keep their templates in the sorting (``template_units`` -1): they still absorb,
during matching, the signal that would otherwise be fitted by the units that are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nwbflow.ephys.sorting.matching import Matches
from nwbflow.ephys.sorting.templates import Templates, similarity
from nwbflow.params import SortingParams

REFRACTORY_FRACTION = 0.2
#: A unit is a satellite when this fraction of its spikes lie at one lag (± SATELLITE_JITTER samples,
#: within a template's width) from spikes of units at least SATELLITE_SIZE_RATIO times its peak size.
SATELLITE_FRACTION, SATELLITE_JITTER, SATELLITE_SIZE_RATIO = 0.5, 2, 2.0
#: How far (ms) a reported unit's template trough may lie from the detection's trough sample.
TROUGH_JITTER_MS = 0.1
MIN_EXPECTED_PAIRS = 5.0
IDENTICAL_SIMILARITY = 0.97


@dataclass(frozen=True)
class Curated:
    """Units after curation.

    Attributes
    ----------
    spike_units : (N,) int64, each match's unit 0..U-1, or -1 when its unit was dropped
    template_units : (K,) int64, each template's unit, -1 for templates of dropped units
    num_units : int, units kept (U)
    """

    spike_units: np.ndarray
    template_units: np.ndarray
    num_units: int


def curate(matches: Matches, templates: Templates, params: SortingParams, sampling_rate_hz: float,
           num_samples: int, max_lag: int, filtered: Templates | None = None) -> Curated:
    """Merge over-split units, then drop units with fewer than ``min_unit_spikes`` spikes, satellites and
    misaligned units (their templates stay in matching); the rest are numbered 0..U-1 by first template.
    ``filtered``: the same templates on the filtered scale, for the merges' shape test (module docstring)."""
    spike_units, template_units = merge_oversplit_units(matches, templates, params, sampling_rate_hz, num_samples,
                                                        max_lag, filtered)
    num_units = int(template_units.max()) + 1
    scaled_templates = templates.dense().cpu().numpy()  # noise units, as matched
    sizes = np.zeros(num_units)
    np.maximum.at(sizes, template_units, np.abs(scaled_templates).max(axis=(1, 2)))
    big = np.bincount(spike_units, minlength=num_units) >= params.min_unit_spikes
    big &= ~satellite_units(matches.samples, spike_units, sizes, templates.width)
    big &= ~misaligned_units(scaled_templates, template_units, num_units, templates.before, sampling_rate_hz)
    renumber = np.where(big, np.cumsum(big) - 1, -1)
    return Curated(renumber[spike_units], renumber[template_units], int(big.sum()))


def cross_pairs_within(first: np.ndarray, second: np.ndarray, window: int) -> int:
    """Pairs (i in first, j in second) with ``|first[i] - second[j]| <= window`` (sorted sample arrays)."""
    return int((np.searchsorted(second, first + window, side="right")
                - np.searchsorted(second, first - window, side="left")).sum())


def merge_oversplit_units(matches: Matches, templates: Templates, params: SortingParams, sampling_rate_hz: float,
                          num_samples: int, max_lag: int,
                          filtered: Templates | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Group templates into units (``filtered``: the templates on the filtered scale, whose shapes decide
    which pairs are tested; default: ``templates``).

    Returns
    -------
    spike_units : (N,) int64, unit of each match (units numbered 0..U-1 by first template)
    template_units : (K,) int64, unit of each template
    """
    num_templates = templates.num_units
    parent = np.arange(num_templates)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if num_templates > 1:
        identical = similarity(templates, max_lag).cpu().numpy()
        close = identical if filtered is None else similarity(filtered, max_lag).cpu().numpy()
        np.fill_diagonal(close, -np.inf)
        trains = [matches.samples[matches.units == k] for k in range(num_templates)]
        window = max(int(round(params.refractory_ms * sampling_rate_hz / 1000.0)), 1)
        rows, cols = np.nonzero(np.triu(close >= params.merge_similarity, k=1))
        for a, b in sorted(zip(rows.tolist(), cols.tolist()), key=lambda pair: -close[pair]):
            ra, rb = root(a), root(b)
            if ra == rb:
                continue
            group_a = np.sort(np.concatenate([trains[k] for k in range(num_templates) if root(k) == ra]))
            group_b = np.sort(np.concatenate([trains[k] for k in range(num_templates) if root(k) == rb]))
            expected = len(group_a) * len(group_b) * (2 * window + 1) / max(num_samples, 1)
            if expected >= MIN_EXPECTED_PAIRS:
                merge = cross_pairs_within(group_a, group_b, window) <= REFRACTORY_FRACTION * expected
            else:
                merge = identical[a, b] >= IDENTICAL_SIMILARITY
            if merge:
                parent[rb] = ra
    roots = np.array([root(k) for k in range(num_templates)])
    _, template_units = np.unique(roots, return_inverse=True)
    return template_units[matches.units].astype(np.int64), template_units.astype(np.int64)


def satellite_units(spike_samples: np.ndarray, spike_units: np.ndarray, unit_sizes: np.ndarray,
                    width: int) -> np.ndarray:
    """(U,) bool, True for satellite units (module docstring).

    Parameters
    ----------
    spike_samples, spike_units : (N,) int64, spikes (samples ascending) and their units 0..U-1
    unit_sizes : (U,) float, each unit's template peak (any units, the same for all)
    width : int, largest lag (samples) at which a spike can copy another: a template's width
    """
    num_units = len(unit_sizes)
    trains = [spike_samples[spike_units == unit] for unit in range(num_units)]
    satellite = np.zeros(num_units, dtype=bool)
    for unit, train in enumerate(trains):
        locked = np.zeros(len(train), dtype=bool)
        for parent in np.nonzero(unit_sizes >= SATELLITE_SIZE_RATIO * unit_sizes[unit])[0]:
            lags = _nearest_lags(train, trains[parent])
            near = np.abs(lags) <= width
            if not near.any():
                continue
            mode = int(np.argmax(np.bincount(lags[near] + width))) - width
            locked |= near & (np.abs(lags - mode) <= SATELLITE_JITTER)
        satellite[unit] = len(train) > 0 and locked.mean() >= SATELLITE_FRACTION
    return satellite


def misaligned_units(templates: np.ndarray, template_units: np.ndarray, num_units: int, before: int,
                     sampling_rate_hz: float) -> np.ndarray:
    """(U,) bool, True for units whose largest template has its most negative sample (over all
    channels) more than :data:`TROUGH_JITTER_MS` from row ``before`` (module docstring).

    Parameters
    ----------
    templates : (K, T, C) float, templates in any one scale
    template_units : (K,) int64, unit of each template (-1: none)
    """
    jitter = max(int(round(TROUGH_JITTER_MS * sampling_rate_hz / 1000.0)), 1)
    flat = templates.reshape(len(templates), -1)
    trough_rows = flat.argmin(axis=1) // templates.shape[2]
    peaks = np.abs(flat).max(axis=1)
    misaligned = np.zeros(num_units, dtype=bool)
    for unit in range(num_units):
        members = np.nonzero(template_units == unit)[0]
        if len(members):
            largest = members[np.argmax(peaks[members])]
            misaligned[unit] = abs(int(trough_rows[largest]) - before) > jitter
    return misaligned


def _nearest_lags(train: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each sample of ``train``, its lag to the nearest sample of the sorted ``other``
    (``train - other``; a huge value when ``other`` is empty)."""
    if not len(other):
        return np.full(len(train), np.iinfo(np.int64).max // 2)
    index = np.searchsorted(other, train)
    before, after = other[np.clip(index - 1, 0, len(other) - 1)], other[np.clip(index, 0, len(other) - 1)]
    return np.where(np.abs(train - before) <= np.abs(train - after), train - before, train - after)
