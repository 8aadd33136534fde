"""Templates in Kilosort's low-rank form: one temporal basis, per-unit spatial components.

A template is ``W_k = B @ U_k.T`` : (T, C), with ``B`` (T, R) the shared orthonormal temporal
basis and ``U_k`` (C, R). Inner products between shifted templates, which template matching
needs to update its scores after a subtraction, follow from ``U_j.T U_k`` and the basis's own
shifted products, without forming the dense templates.

Templates are made from the clusters of each channel's spikes (:func:`cluster_into_templates`),
restricted to a radius, collapsed where duplicated, and re-estimated from the spikes a
matching pass found (:func:`updated_templates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ephys.sorting.clustering import cluster_features
from nwbflow.ephys.sorting.features import SpikeSubset
from nwbflow.ephys.sorting.traces import Neighbourhoods, NothingToSort, SnippetGeometry
from nwbflow.params import SortingParams


@dataclass
class Templates:
    """Low-rank templates on noise-scaled traces.

    Attributes
    ----------
    basis : (T, R) float32, orthonormal columns
    spatial : (K, C, R) float32
    before : int
        Row of the trough in the template (the spike's sample).
    """

    basis: torch.Tensor
    spatial: torch.Tensor
    before: int

    @property
    def num_units(self) -> int:
        return int(self.spatial.shape[0])

    @property
    def width(self) -> int:
        return int(self.basis.shape[0])

    def dense(self) -> torch.Tensor:
        """(K, T, C) templates."""
        return torch.einsum("tr,kcr->ktc", self.basis, self.spatial)

    def unwhitened(self, noise_levels: np.ndarray, whitening_inverse: np.ndarray) -> Templates:
        """The templates on the filtered scale (µV): each channel times its noise level (the sorter divides
        the whitened traces by it), then ``W^-1`` applied to every sample."""
        device = self.spatial.device
        scale = torch.as_tensor(np.asarray(noise_levels, np.float64), dtype=torch.float32, device=device)
        inverse = torch.as_tensor(np.asarray(whitening_inverse, np.float64), dtype=torch.float32, device=device)
        return Templates(self.basis, torch.einsum("dc,kcr->kdr", inverse, self.spatial * scale[None, :, None]),
                         self.before)

    def squared_norms(self) -> torch.Tensor:
        """(K,) ``||W_k||^2`` (the basis is orthonormal)."""
        return (self.spatial ** 2).sum(dim=(1, 2))

    def peak_channels(self) -> torch.Tensor:
        """(K,) channel of each template's largest absolute value."""
        dense = self.dense()
        return dense.abs().amax(dim=1).argmax(dim=1)

    def cross_products(self) -> torch.Tensor:
        """(K, K, 2T-1) ``P[j, k, d] = sum_{t,c} W_j[t, c] W_k[t + d, c]``, d = -(T-1)..T-1."""
        width = self.width
        # Shifted basis products: S[r, s, d] = sum_t B[t, r] B[t + d, s].
        padded = torch.nn.functional.pad(self.basis.T, (width - 1, width - 1))  # (R, 3T-2)
        shifted = torch.nn.functional.conv1d(padded.unsqueeze(1), self.basis.T.unsqueeze(1))  # (R, R, 2T-1)
        # conv1d: out[s, r, j] = sum_t padded[s, j + t] B[t, r] = sum_t B[t, r] B[j + t - (T-1), s]
        basis_products = shifted.permute(1, 0, 2)  # [r, s, d + T - 1]
        spatial_products = torch.einsum("jcr,kcs->jkrs", self.spatial, self.spatial)
        return torch.einsum("jkrs,rsd->jkd", spatial_products, basis_products)

    def select(self, keep: torch.Tensor) -> Templates:
        return Templates(self.basis, self.spatial[keep], self.before)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, basis: torch.Tensor, before: int) -> Templates:
        """Project (K, T, C) templates on ``basis`` (T, R)."""
        return cls(basis, torch.einsum("ktc,tr->kcr", dense, basis).contiguous(), before)


def similarity(templates: Templates, max_lag: int) -> torch.Tensor:
    """(K, K) best normalized inner product of two templates over shifts of at most ``max_lag`` samples."""
    products = templates.cross_products()
    centre = templates.width - 1
    window = products[:, :, centre - max_lag: centre + max_lag + 1].amax(dim=2)
    norms = templates.squared_norms().clamp(min=1e-12).sqrt()
    return window / (norms[:, None] * norms[None, :])


def restrict_to_radius(templates: Templates, channel_positions_um: np.ndarray, radius_um: float) -> Templates:
    """Zero each template's channels farther than ``radius_um`` from its peak channel."""
    positions = torch.as_tensor(np.asarray(channel_positions_um, dtype=np.float64)[:, :2],
                                device=templates.spatial.device)
    peaks = templates.peak_channels()
    near = torch.cdist(positions[peaks], positions) <= radius_um  # (K, C)
    return Templates(templates.basis, templates.spatial * near.unsqueeze(2), templates.before)


def merge_duplicates(templates: Templates, counts: torch.Tensor, min_similarity: float, max_lag: int,
                     max_norm_ratio: float = 1.5) -> torch.Tensor:
    """Indices of the templates kept when near-identical ones collapse onto the most populated.

    Two templates are duplicates when their best-lag similarity is at least ``min_similarity``
    and their norms differ by less than ``max_norm_ratio``; returns kept indices (ascending).
    """
    if templates.num_units < 2:
        return torch.arange(templates.num_units, device=counts.device)
    close = similarity(templates, max_lag) >= min_similarity
    norms = templates.squared_norms().sqrt()
    larger, smaller = torch.maximum(norms[:, None], norms[None, :]), torch.minimum(norms[:, None], norms[None, :])
    ratio = larger / smaller.clamp(min=1e-12)
    close &= ratio < max_norm_ratio
    alive = torch.ones(templates.num_units, dtype=torch.bool, device=counts.device)
    for unit in torch.argsort(counts, descending=True).tolist():
        if alive[unit]:
            duplicates = close[unit] & alive
            duplicates[unit] = False
            alive &= ~duplicates
    return torch.nonzero(alive).flatten()


def template_basis(dense: torch.Tensor, rank: int) -> torch.Tensor:
    """(T, rank) orthonormal temporal basis that best represents every channel of every template.

    The leading left singular vectors of all templates' (T, C) blocks side by side, each
    template scaled to unit norm so that small units weigh as much as large ones.
    """
    norms = dense.flatten(1).norm(dim=1).clamp(min=1e-12)
    blocks = (dense / norms[:, None, None]).permute(1, 0, 2).reshape(dense.shape[1], -1)  # (T, K*C)
    left, _, _ = torch.linalg.svd(blocks.double(), full_matrices=False)
    return left[:, :rank].float().contiguous()


def cluster_into_templates(subset: SpikeSubset, neighbourhoods: Neighbourhoods, basis: torch.Tensor,
                           geometry: SnippetGeometry, params: SortingParams, seed: int,
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
                                  seed + channel)
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


def updated_templates(templates: Templates, snippet_sums: torch.Tensor, snippet_counts: torch.Tensor,
                      params: SortingParams, positions: np.ndarray, max_lag: int, fraction: float = 1.0) -> Templates:
    """Templates re-estimated as the mean (residual + own template) snippet of their matched spikes
    (``snippet_sums`` (K, T, C), ``snippet_counts`` (K,)) in a ``fraction`` of the recording; units
    with fewer than ``min_unit_spikes`` matches (scaled by ``fraction``) are dropped, duplicates
    collapsed."""
    alive = snippet_counts >= max(params.min_unit_spikes * fraction, 1.0)
    if not bool(alive.any()):
        raise NothingToSort(f"template matching found no unit with at least {params.min_unit_spikes} spikes")
    means = snippet_sums[alive] / snippet_counts[alive, None, None]
    refreshed = Templates.from_dense(means, template_basis(means, templates.basis.shape[1]), templates.before)
    refreshed = restrict_to_radius(refreshed, positions, params.template_radius_um)
    return refreshed.select(merge_duplicates(refreshed, snippet_counts[alive], params.merge_similarity, max_lag))
