"""Spatial interpolation weights: a probe's contacts read at other positions (kriging, IDW, nearest; torch).

``W`` (targets x contacts) maps traces sampled at the contacts to traces at
the targets, ``interpolated[:, j] = sum_i W[j, i] * traces[:, i]``; one
:class:`SpatialInterpolator` per probe computes it for any batch of target
sets, as SpikeInterface's ``get_spatial_interpolation_kernel`` does:

* ``"kriging"`` (Kilosort 2.5's datashift): ``W = K(targets, contacts)
  pinv(K(contacts, contacts) + 1e-6 I)`` with ``K(d) = exp(-(d / sigma)^p)``;
* ``"idw"``: the ``num_closest`` nearest contacts weighted by ``1 / d``;
* ``"nearest"``: the nearest contact.

Then weights of contacts farther than ``radius_um`` from the target are
dropped and each row is scaled to sum to 1. A target outside the contacts'
extent (their bounding box, axis by axis) is, with ``border="zeros"``, given a
row of zeros (SpikeInterface's ``force_zeros``), or with ``border="clamp"``
read at the nearest point of that extent. A target with no contact within the
radius gets a row of zeros.

Zeroed rows are fine for display but not for sorting whitened traces: the
correction maps whitened traces through ``W K W^-1``, which spreads a zeroed
channel's loss over its neighbours, and a channel that is zero part of the time
has no single noise level. Measured on a static 32-channel ground truth that
MEDiCINe gives up to 1.5 µm of (spurious) motion: 13/25 well-sorted units
with zeros vs 22/25 uncorrected (benchmarks/RESULTS.md).

Differences from SpikeInterface 0.105: the radius (it weights every contact;
with sigma 20 µm, p 1 and radius 100 µm the dropped kriging weights sum to
at most ~1e-4 per target on 20 µm pitch probes), and a kriging target on a contact
copies it exactly (its 1e-6 regularisation leaves ~1e-6 of the neighbours).

Examples
--------
>>> contacts = np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0]])
>>> targets = contacts + [0.0, 5.0]  # the last target is off the probe
>>> interpolation_weights(contacts, targets, "nearest").tolist()
[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
>>> interpolation_weights(contacts, targets, "idw", num_closest=2).round(3).tolist()[0]
[0.75, 0.25, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from nwbflow.errors import BadInputError

__all__ = ["INTERPOLATION_METHODS", "KRIGING_NUGGET", "ON_CONTACT_UM", "SpatialInterpolator",
           "interpolation_weights"]

#: Kriging's diagonal regularisation (SpikeInterface's and Kilosort's value).
KRIGING_NUGGET = 1e-6
#: A target closer than this to a contact (µm) copies that contact.
ON_CONTACT_UM = 1e-6


def _kriging(interpolator: SpatialInterpolator, distance_um: torch.Tensor) -> torch.Tensor:
    """``K(targets, contacts) pinv(K(contacts, contacts) + nugget I)``; a target on a contact copies it."""
    weights = interpolator.covariance(distance_um) @ interpolator.kriging_inverse
    return _copy_contacts_hit(weights, distance_um)


def _idw(interpolator: SpatialInterpolator, distance_um: torch.Tensor) -> torch.Tensor:
    """``1 / d`` over the ``num_closest`` nearest contacts within the radius; a target on a contact copies it."""
    within = distance_um.masked_fill(distance_um > interpolator.radius_um, torch.inf)
    closest_um, index = torch.topk(within, min(interpolator.num_closest, within.shape[-1]), largest=False)
    weights = torch.zeros_like(distance_um).scatter_(-1, index, 1.0 / closest_um)  # 1 / inf = 0
    return _copy_contacts_hit(weights, distance_um)


def _nearest(interpolator: SpatialInterpolator, distance_um: torch.Tensor) -> torch.Tensor:
    """1 on the nearest contact (the lowest index among equals) if within the radius."""
    nearest_um, index = distance_um.min(dim=-1, keepdim=True)
    return torch.zeros_like(distance_um).scatter_(-1, index, (nearest_um <= interpolator.radius_um).double())


def _copy_contacts_hit(weights: torch.Tensor, distance_um: torch.Tensor) -> torch.Tensor:
    """Rows whose target lies on a contact become that contact's indicator."""
    nearest_um, index = distance_um.min(dim=-1, keepdim=True)
    hit = torch.zeros_like(weights).scatter_(-1, index, 1.0)
    return torch.where(nearest_um < ON_CONTACT_UM, hit, weights)


#: Interpolation methods (``MotionParams.interpolation``): raw weights (..., targets, contacts) from the
#: target-to-contact distances (µm); :meth:`SpatialInterpolator.weights` then applies radius, sums, borders.
INTERPOLATION_METHODS: dict[str, Callable[[SpatialInterpolator, torch.Tensor], torch.Tensor]] = {
    "kriging": _kriging, "idw": _idw, "nearest": _nearest}


class SpatialInterpolator:
    """Weights that interpolate a probe's contacts at target positions (float64, on ``device``).

    Parameters
    ----------
    contact_positions_um : (C, 2) float, µm
    method : {"kriging", "idw", "nearest"}
        A key of :data:`INTERPOLATION_METHODS`.
    sigma_um, p : float
        Kriging kernel ``exp(-(d / sigma_um)^p)``.
    radius_um : float
        Contacts farther than this from a target get weight 0.
    num_closest : int
        Contacts averaged by ``"idw"``.
    border : {"zeros", "clamp"}
        Targets outside the contacts' extent: a row of zeros, or read at the nearest point of the extent.
    device : torch.device or str
    """

    def __init__(self, contact_positions_um: np.ndarray, method: str = "kriging", *, sigma_um: float = 20.0,
                 p: float = 1.0, radius_um: float = 100.0, num_closest: int = 3, border: str = "zeros",
                 device: torch.device | str = "cpu"):
        if method not in INTERPOLATION_METHODS:
            raise BadInputError(f"unknown interpolation method {method!r}",
                                fix=f"use one of {sorted(INTERPOLATION_METHODS)}")
        if border not in ("zeros", "clamp"):
            raise BadInputError(f"unknown border mode {border!r}", fix="use 'zeros' or 'clamp'")
        self.method, self.device, self.border = method, torch.device(device), border
        self.sigma_um, self.p, self.radius_um, self.num_closest = sigma_um, p, radius_um, num_closest
        self.contacts = torch.as_tensor(np.asarray(contact_positions_um, np.float64), device=self.device)
        self.low, self.high = self.contacts.min(dim=0).values, self.contacts.max(dim=0).values
        self.kriging_inverse = None
        if method == "kriging":  # computed once: the contacts do not move
            gram = self.covariance(_distances(self.contacts, self.contacts)).cpu()
            self.kriging_inverse = torch.linalg.pinv(
                gram + KRIGING_NUGGET * torch.eye(len(gram), dtype=torch.float64)).to(self.device)

    def covariance(self, distance_um: torch.Tensor) -> torch.Tensor:
        """Kriging kernel ``exp(-(d / sigma)^p)`` of distances (µm)."""
        return torch.exp(-((distance_um / self.sigma_um) ** self.p))

    def inside(self, targets_um: torch.Tensor) -> torch.Tensor:
        """(...,) bool: the target lies within the contacts' extent on every axis."""
        return ((targets_um >= self.low) & (targets_um <= self.high)).all(dim=-1)

    def weights(self, targets_um: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Interpolation weights at (..., T, 2) targets (µm): (..., T, C) float64, rows summing to 1 or 0.

        A row is all zero where its target is outside the contacts' extent or
        has no contact within the radius.
        """
        targets = torch.as_tensor(targets_um, dtype=torch.float64, device=self.device)
        if self.border == "clamp":
            targets = torch.minimum(torch.maximum(targets, self.low), self.high)
        distance_um = _distances(targets, self.contacts)
        weights = INTERPOLATION_METHODS[self.method](self, distance_um)
        weights = weights.masked_fill(distance_um > self.radius_um, 0.0)
        total = weights.sum(dim=-1, keepdim=True)
        usable = self.inside(targets).unsqueeze(-1) & (total.abs() > 1e-12)
        return torch.where(usable, weights / torch.where(usable, total, 1.0), 0.0)


def _distances(targets: torch.Tensor, contacts: torch.Tensor) -> torch.Tensor:
    """(..., T, C) Euclidean distances, exact 0 where a target equals a contact (unlike ``torch.cdist``'s mm path)."""
    return (targets.unsqueeze(-2) - contacts).square().sum(dim=-1).sqrt()


def interpolation_weights(contact_positions_um: np.ndarray, target_positions_um: np.ndarray,
                          method: str = "kriging", *, sigma_um: float = 20.0, p: float = 1.0,
                          radius_um: float = 100.0, num_closest: int = 3) -> np.ndarray:
    """Weights ``W`` (float64, (..., T, C)) with ``interpolated[:, j] = sum_i W[..., j, i] x[:, i]``.

    Parameters
    ----------
    contact_positions_um : (C, 2) float, µm
    target_positions_um : (..., T, 2) float, µm
    method, sigma_um, p, radius_um, num_closest : as :class:`SpatialInterpolator`.
    """
    interpolator = SpatialInterpolator(contact_positions_um, method, sigma_um=sigma_um, p=p,
                                       radius_um=radius_um, num_closest=num_closest)
    return interpolator.weights(target_positions_um).numpy()
