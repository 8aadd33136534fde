"""Clustering of spike features: k-means over-clustering, then unimodality merges (ISO-SPLIT's idea).

Spikes are clustered separately for each peak channel, on the features of that channel's
neighbourhood (``features.SpikeSubset``). Within a channel:

1. the features are reduced to their leading principal components;
2. k-means (k-means++ start, seeded) over-clusters them: about one cluster per
   ``2 * min_cluster_spikes`` spikes, at most :data:`MAX_INITIAL_CLUSTERS`;
3. pairs of clusters, nearest centres first, are tested along the line joining their
   centres: the spikes of both are projected on it and the smoothed histogram of the
   projections is searched for a dip between the two centres. The *dip score* is
   ``1 - dip / smaller mode``. Below ``bimodality_threshold`` the two are one unimodal
   population and merge; above it they stay apart and their spikes are re-assigned by the
   side of the dip they fall on (the dip is a better boundary than k-means' midpoint).
   This repeats until no pair merges.

Clusters smaller than ``min_cluster_spikes`` are dropped (label -1).
"""

from __future__ import annotations

import numpy as np
import torch

#: Principal components of the features that clustering works in.
NUM_COMPONENTS = 8
#: Upper bound on the k-means over-clustering of one channel's spikes.
MAX_INITIAL_CLUSTERS = 24
KMEANS_ITERATIONS = 30
#: Bound on merge / re-assignment rounds per channel (each changes the labels).
MAX_MERGE_ROUNDS = 200
#: Width (bins) of the Gaussian smoothing of projection histograms.
HISTOGRAM_SMOOTHING_BINS = 1.0


def principal_components(features: torch.Tensor, count: int = NUM_COMPONENTS) -> torch.Tensor:
    """(n, D) -> (n, min(count, D, n)) scores on the leading principal axes (float64)."""
    centred = features.double() - features.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[: min(count, vh.shape[0])].T


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Labels (n,) int64 in 0..k'-1 (empty clusters removed) of Lloyd's k-means with a k-means++ start."""
    n = points.shape[0]
    k = max(1, min(k, n))
    centres = points[torch.randint(n, (1,), generator=generator, device=points.device)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).amin(dim=1) ** 2
        if float(distance.sum()) <= 0:
            break
        pick = torch.multinomial((distance / distance.sum()).float(), 1, generator=generator)
        centres = torch.cat([centres, points[pick]])
    labels = torch.zeros(n, dtype=torch.int64, device=points.device)
    for _ in range(iterations):
        new = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        counts = torch.bincount(labels, minlength=len(centres)).clamp(min=1).unsqueeze(1)
        centres = torch.zeros_like(centres).index_add_(0, labels, points) / counts
    return torch.unique(labels, return_inverse=True)[1]


def dip_split(projection: torch.Tensor, left_centre: float, right_centre: float) -> tuple[float, float]:
    """Search the smoothed histogram of 1-D ``projection`` between two centres for its lowest point.

    Returns (dip score, cut): ``1 - histogram[cut] / min(left mode, right mode)`` (0: no dip,
    1: empty gap) and the projection value of the cut. ``left_centre < right_centre``.
    """
    n = projection.numel()
    low, high = torch.quantile(projection, torch.tensor([0.005, 0.995], dtype=projection.dtype,
                                                        device=projection.device)).tolist()
    if high <= low:
        return 0.0, (left_centre + right_centre) / 2
    bins = int(min(max(n // 10, 16), 64))
    counts = torch.histc(projection.clamp(low, high), bins=bins, min=low, max=high).double()
    radius = int(np.ceil(3 * HISTOGRAM_SMOOTHING_BINS))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=counts.device)
    kernel = torch.exp(-0.5 * (offsets / HISTOGRAM_SMOOTHING_BINS) ** 2)
    smooth = torch.nn.functional.conv1d(counts.view(1, 1, -1), (kernel / kernel.sum()).view(1, 1, -1),
                                        padding=radius).view(-1)
    width = (high - low) / bins
    first = int(np.clip((left_centre - low) / width, 0, bins - 1))
    last = int(np.clip((right_centre - low) / width, 0, bins - 1))
    if last - first < 2:
        return 0.0, (left_centre + right_centre) / 2
    cut = first + int(torch.argmin(smooth[first:last + 1]))
    modes = min(float(smooth[: cut + 1].max()), float(smooth[cut:].max()))
    score = 1.0 - float(smooth[cut]) / modes if modes > 0 else 0.0
    return score, low + (cut + 0.5) * width


def cluster_features(features: torch.Tensor, min_cluster_spikes: int, bimodality_threshold: float,
                     seed: int) -> torch.Tensor:
    """Labels (n,) int64 of one channel's spikes (features (n, D)); -1 for spikes left out."""
    n = features.shape[0]
    labels = torch.full((n,), -1, dtype=torch.int64, device=features.device)
    if n < min_cluster_spikes:
        return labels
    points = principal_components(features.reshape(n, -1))
    generator = torch.Generator(device=features.device).manual_seed(seed)
    k = int(np.clip(n // (2 * min_cluster_spikes), 1, MAX_INITIAL_CLUSTERS))
    labels = kmeans(points, k, generator)
    labels = _merge_unimodal(points, labels, min_cluster_spikes, bimodality_threshold)
    return _drop_small(labels, min_cluster_spikes)


def _merge_unimodal(points: torch.Tensor, labels: torch.Tensor, min_size: int, threshold: float) -> torch.Tensor:
    tested: set[tuple[bytes, bytes]] = set()
    for _ in range(MAX_MERGE_ROUNDS):
        ids = torch.unique(labels)
        if len(ids) < 2:
            return labels
        centres = torch.stack([points[labels == i].mean(dim=0) for i in ids])
        distance = torch.cdist(centres, centres)
        distance.fill_diagonal_(float("inf"))
        order = torch.argsort(distance.flatten())
        changed = False
        for flat in order.tolist():
            a, b = divmod(flat, len(ids))
            if a >= b or not np.isfinite(float(distance[a, b])):
                continue
            members = (labels == ids[a]) | (labels == ids[b])
            signature = (_signature(labels == ids[a]), _signature(labels == ids[b]))
            if signature in tested:
                continue
            tested.add(signature)
            direction = (centres[b] - centres[a]) / (centres[b] - centres[a]).norm()
            projection = points[members] @ direction
            left, right = float(centres[a] @ direction), float(centres[b] @ direction)
            score, cut = dip_split(projection, left, right)
            if score < threshold:
                labels[members] = ids[a]
                changed = True
                break
            side = projection > cut
            if int(side.sum()) >= min_size and int((~side).sum()) >= min_size:
                relabelled = torch.where(side, ids[b], ids[a])
                if not torch.equal(relabelled, labels[members]):
                    labels[members] = relabelled
                    changed = True
                    break
        if not changed:
            return labels
    return labels


def _signature(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.cpu().numpy()).tobytes()


def _drop_small(labels: torch.Tensor, min_size: int) -> torch.Tensor:
    ids, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    big = counts >= min_size
    new_id = torch.cumsum(big, dim=0) - 1
    return torch.where(big[inverse], new_id[inverse], torch.full_like(labels, -1))
