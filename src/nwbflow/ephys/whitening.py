"""ZCA whitening matrices from a channel covariance (numpy, float64).

The covariance is of band-passed traces in µV² (num_channels, num_channels);
the matrices ``W`` returned are in 1/µV and applied to each sample ``x`` (µV)
as ``W @ x``, giving whitened traces whose noise has unit variance. Global
(:func:`whitening_matrix`) or per channel neighbourhood
(:func:`local_whitening_matrix`, Kilosort's).

Examples
--------
>>> import numpy as np
>>> whitening_matrix(np.diag([4.0, 1.0]), regularization=0.0).round(3).tolist()
[[0.5, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import numpy as np

from nwbflow.errors import BadInputError

__all__ = ["local_whitening_matrix", "whitening_matrix"]


def whitening_matrix(cov: np.ndarray, regularization: float) -> np.ndarray:
    """ZCA whitening ``W = E diag(1 / sqrt(d + eps)) E^T`` of a covariance matrix.

    Parameters
    ----------
    cov : (num_channels, num_channels) float
        Symmetric covariance of filtered traces (µV²).
    regularization : float
        ``eps = regularization * mean(d)`` (unitless fraction), keeping
        near-null directions (e.g. left by the common reference) bounded.

    Returns
    -------
    whitening : (num_channels, num_channels) float64, 1/µV
        Symmetric; ``W @ cov @ W`` is close to identity.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    eps = regularization * float(np.mean(eigenvalues))
    denominator = eigenvalues + eps
    if not np.all(np.isfinite(denominator)) or np.any(denominator <= 0):
        raise BadInputError("cannot whiten: the noise covariance is singular (flat or identical channels)",
                            fix="set preprocess.whitening_regularization > 0 or whiten=False")
    return (eigenvectors / np.sqrt(denominator)) @ eigenvectors.T


def local_whitening_matrix(cov: np.ndarray, channel_positions_um: np.ndarray, radius_um: float,
                           regularization: float) -> np.ndarray:
    """Local ZCA whitening (Kilosort's): row ``c`` is row ``c`` of the ZCA of ``c``'s neighbourhood.

    Parameters
    ----------
    cov : (num_channels, num_channels) float, µV²
    channel_positions_um : (num_channels, 2) float, µm
    radius_um : float
        Channels within this distance of ``c`` (``c`` included) form its neighbourhood (µm).
    regularization : float
        As :func:`whitening_matrix`, relative to each neighbourhood's mean eigenvalue.

    Returns
    -------
    whitening : (num_channels, num_channels) float64, 1/µV
        Zero outside each row's neighbourhood; not symmetric in general.
        Each output channel has unit variance and is decorrelated from its
        neighbours.
    """
    cov = np.asarray(cov, dtype=np.float64)
    positions = np.asarray(channel_positions_um, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[0] != cov.shape[0]:
        raise BadInputError(f"channel_positions_um must be ({cov.shape[0]}, 2) µm for local whitening, "
                            f"got shape {positions.shape}")
    distances = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    whitening = np.zeros_like(cov)
    for channel in range(cov.shape[0]):
        neighbours = np.flatnonzero(distances[channel] <= radius_um)
        local = whitening_matrix(cov[np.ix_(neighbours, neighbours)], regularization)
        whitening[channel, neighbours] = local[np.searchsorted(neighbours, channel)]
    return whitening
