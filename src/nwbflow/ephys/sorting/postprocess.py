"""After matching: merges of over-split units.

Two units are one neuron split in two when their templates are nearly the same shape and
their spike trains never come closer than a refractory period: their cross-correlogram has
the refractory dip an auto-correlogram has. Pairs whose templates correlate at least
``merge_similarity`` (best lag) are merged when the count of cross pairs within
``refractory_ms`` is at most :data:`REFRACTORY_FRACTION` of the count two independent trains
of those rates would give. When that expectation is too small to test
(< :data:`MIN_EXPECTED_PAIRS`), only near-identical templates (:data:`IDENTICAL_SIMILARITY`) merge.
"""

from __future__ import annotations

import numpy as np

from nwbflow.ephys.sorting.matching import Matches
from nwbflow.ephys.sorting.templates import Templates, similarity
from nwbflow.params import SortingParams

REFRACTORY_FRACTION = 0.2
MIN_EXPECTED_PAIRS = 5.0
IDENTICAL_SIMILARITY = 0.97


def cross_pairs_within(first: np.ndarray, second: np.ndarray, window: int) -> int:
    """Pairs (i in first, j in second) with ``|first[i] - second[j]| <= window`` (sorted sample arrays)."""
    return int((np.searchsorted(second, first + window, side="right")
                - np.searchsorted(second, first - window, side="left")).sum())


def merge_oversplit_units(matches: Matches, templates: Templates, params: SortingParams, sampling_rate_hz: float,
                          num_samples: int, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Group templates into units.

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
        close = similarity(templates, max_lag).cpu().numpy()
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
                merge = close[a, b] >= IDENTICAL_SIMILARITY
            if merge:
                parent[rb] = ra
    roots = np.array([root(k) for k in range(num_templates)])
    _, template_units = np.unique(roots, return_inverse=True)
    return template_units[matches.units].astype(np.int64), template_units.astype(np.int64)
