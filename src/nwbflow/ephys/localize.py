"""Peak localization in torch: center of mass and monopolar triangulation, batched over peaks.

Both methods read the same evidence. For a peak at sample ``t`` on channel
``c`` they take the channels within ``radius_um`` of ``c`` (its *neighbourhood*,
see :func:`neighbour_table`) and their magnitudes ``a_k = |x[t, k]|`` at the
peak sample. When the traces are whitened, the peak rows are first mapped back
to the filtered scale, ``x = x_white @ W^-T`` (one GEMM over the peak rows
only), so whitening does not distort the spatial footprint.

``center_of_mass``
    ``sum_k a_k p_k / sum_k a_k`` (the peak channel's position when all
    ``a_k`` are 0). A convex combination of contacts: it cannot leave the
    probe and is pulled toward the peak channel.
``monopolar_triangulation``
    The point source that best explains the footprint,
    ``a_k ~ alpha / sqrt((x - x_k)^2 + (y - y_k)^2 + z^2)`` with ``(x, y)``
    in the probe plane, ``z`` the distance off the plane and ``alpha > 0``,
    fitted by least squares (as SpikeInterface's ``monopolar_triangulation``,
    Boussard et al. 2021) for all peaks of a batch at once: a fixed number of
    Levenberg-Marquardt steps on the device, started at the center of mass,
    with ``(x, y)`` kept within the neighbourhood's bounding box
    ``± TRIANGULATION_MARGIN_UM`` and ``z`` within ``TRIANGULATION_Z_BOUNDS_UM``.

:data:`LOCALIZATION_METHODS` maps each ``PeakParams.localization`` name to its
batched implementation.

Examples
--------
>>> import numpy as np
>>> positions = np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0]])
>>> traces = np.array([[1.0, 2.0, 1.0]], dtype=np.float32)
>>> x_um, y_um = localize_center_of_mass(traces, np.array([0]), np.array([1]), positions, 50.0)
>>> x_um.tolist(), y_um.tolist()
([0.0], [20.0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.errors import BadInputError

#: Bounds of the fitted distance off the probe plane (µm).
TRIANGULATION_Z_BOUNDS_UM = (1.0, 100.0)
#: How far past its neighbourhood's bounding box a fitted source may sit, in the probe plane (µm).
TRIANGULATION_MARGIN_UM = 30.0
#: Starting distance off the plane (µm), as SpikeInterface's initial guess.
TRIANGULATION_INITIAL_Z_UM = 20.0
#: Levenberg-Marquardt steps (a fixed number: no data-dependent loop, no host synchronization).
TRIANGULATION_ITERATIONS = 30


def neighbour_table(channel_positions_um: np.ndarray, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Channels within ``radius_um`` of each channel, as a padded index table.

    Parameters
    ----------
    channel_positions_um : (num_channels, 2+) float, µm
        x, y in the first two columns.
    radius_um : float

    Returns
    -------
    neighbours : (num_channels, max_neighbours) int64
        Row ``c`` lists the neighbours of ``c`` (itself included) in increasing
        order; padded with ``c``.
    valid : (num_channels, max_neighbours) bool
        False on padding.
    """
    positions = np.asarray(channel_positions_um, dtype=np.float64)[:, :2]
    within = np.linalg.norm(positions[:, None] - positions[None], axis=2) <= radius_um
    counts = within.sum(axis=1)
    valid = np.arange(counts.max())[None, :] < counts[:, None]
    neighbours = np.repeat(np.arange(len(within))[:, None], counts.max(), axis=1)
    neighbours[valid] = np.nonzero(within)[1]  # row-major: each row's neighbours in order
    return neighbours, valid


def neighbourhood_magnitudes(traces: torch.Tensor, sample_index: torch.Tensor, channel_index: torch.Tensor,
                             neighbours: torch.Tensor, valid: torch.Tensor,
                             whitening_inverse_t: torch.Tensor | None) -> torch.Tensor:
    """``|x[t, k]|`` on each peak's neighbourhood, on the filtered scale.

    Parameters
    ----------
    traces : (num_samples, num_channels) float32 tensor
    sample_index, channel_index : (num_peaks,) int64 tensors
    neighbours, valid : (num_channels, K) tensors, from :func:`neighbour_table`
    whitening_inverse_t : (num_channels, num_channels) float32 tensor or None
        ``W^-1`` transposed (so a row of filtered values is ``row @ W^-T``).

    Returns
    -------
    magnitudes : (num_peaks, K) float32 tensor, 0 on padding
    """
    rows = traces[sample_index]
    if whitening_inverse_t is not None:
        rows = rows @ whitening_inverse_t
    return rows.gather(1, neighbours[channel_index]).abs() * valid[channel_index]


def center_of_mass(magnitudes: torch.Tensor, positions: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Magnitude-weighted mean of neighbourhood positions.

    Parameters
    ----------
    magnitudes : (num_peaks, K) float tensor
        0 on padding.
    positions : (num_peaks, K, 2) float tensor, µm
    own : (num_peaks, 2) float tensor, µm
        The peak channels' positions.

    Returns
    -------
    xy_um : (num_peaks, 2) tensor; ``own`` where all magnitudes are 0.
    """
    total = magnitudes.sum(dim=1, keepdim=True)
    com = (magnitudes.unsqueeze(2) * positions).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, com, own)


def monopolar_triangulation(magnitudes: torch.Tensor, positions: torch.Tensor, own: torch.Tensor, *,
                            iterations: int = TRIANGULATION_ITERATIONS) -> torch.Tensor:
    """Least-squares point-source fit ``a_k ~ alpha / sqrt(|(x, y) - p_k|^2 + z^2)`` for every peak at once.

    Levenberg-Marquardt with Marquardt's diagonal scaling, one accept/reject
    decision and damping per peak, and bounds kept by projection (a parameter
    pressed against its bound by the gradient is held there for the step).

    Parameters
    ----------
    magnitudes : (num_peaks, K) float tensor
        ``a_k``, 0 on padding (padding is left out of the fit).
    positions : (num_peaks, K, 2) float tensor, µm
        ``p_k``.
    own : (num_peaks, 2) float tensor, µm
        The peak channels' positions.
    iterations : int
        Levenberg-Marquardt steps (a fixed count).

    Returns
    -------
    source : (num_peaks, 4) tensor
        ``x_um, y_um, z_um, alpha`` (``alpha`` in magnitude units × µm).
        Peaks whose magnitudes are all 0 keep ``own``, ``z`` at the initial
        guess and ``alpha = 0``.
    """
    # Fit in a well-scaled frame: amplitudes over their maximum, positions relative to the center of mass.
    scale = magnitudes.amax(dim=1, keepdim=True).clamp_min(torch.finfo(magnitudes.dtype).tiny)
    origin = center_of_mass(magnitudes, positions, own)
    problem = _Footprints(positions - origin.unsqueeze(1), magnitudes / scale, (magnitudes > 0).to(magnitudes.dtype))
    theta, lower, upper = problem.start_and_bounds()
    residual, jacobian = problem.residual_and_jacobian(theta)
    cost = residual.square().sum(dim=1)
    damping = torch.full_like(cost, 1e-2)
    for _ in range(iterations):
        gradient = (jacobian.transpose(1, 2) @ residual.unsqueeze(2)).squeeze(2)
        free = ~(((theta <= lower) & (gradient > 0)) | ((theta >= upper) & (gradient < 0)))
        step = _solve_spd(_damped_normal_matrix(jacobian, damping, free), -gradient * free)
        candidate = torch.maximum(torch.minimum(theta + step, upper), lower)
        residual_new, jacobian_new = problem.residual_and_jacobian(candidate)
        cost_new = residual_new.square().sum(dim=1)
        better = cost_new < cost
        theta = torch.where(better.unsqueeze(1), candidate, theta)
        residual = torch.where(better.unsqueeze(1), residual_new, residual)
        jacobian = torch.where(better.view(-1, 1, 1), jacobian_new, jacobian)
        cost = torch.where(better, cost_new, cost)
        damping = torch.where(better, damping * 0.3, damping * 10.0).clamp(1e-7, 1e7)
    return torch.cat([theta[:, :2] + origin, theta[:, 2:3], theta[:, 3:] * scale], dim=1)


class _Footprints:
    """Batched point-source model of normalized footprints, in a frame centred on each peak's center of mass.

    ``relative`` (n, K, 2) µm, ``amplitudes`` (n, K) in [0, 1], ``weight`` (n, K) 1 on data, 0 on padding
    or on channels without signal. Parameters ``theta`` (n, 4) are ``x, y, z, alpha``.
    """

    def __init__(self, relative: torch.Tensor, amplitudes: torch.Tensor, weight: torch.Tensor):
        self.relative, self.amplitudes, self.weight = relative, amplitudes, weight

    def start_and_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Start at the center of mass, ``z`` = TRIANGULATION_INITIAL_Z_UM, best ``alpha``; box bounds."""
        column = torch.ones_like(self.amplitudes[:, :1])
        theta = torch.cat([0 * column, 0 * column, TRIANGULATION_INITIAL_Z_UM * column, 0 * column], dim=1)
        q = self.inverse_distance(theta)
        theta[:, 3] = ((self.amplitudes * q * self.weight).sum(dim=1)
                       / (q.square() * self.weight).sum(dim=1).clamp_min(torch.finfo(q.dtype).tiny))
        z_lo, z_hi = TRIANGULATION_Z_BOUNDS_UM
        lower = torch.cat([self.relative.amin(dim=1) - TRIANGULATION_MARGIN_UM, z_lo * column, 0 * column], dim=1)
        upper = torch.cat([self.relative.amax(dim=1) + TRIANGULATION_MARGIN_UM, z_hi * column,
                           torch.inf * column], dim=1)
        return theta, lower, upper

    def inverse_distance(self, theta: torch.Tensor) -> torch.Tensor:
        """(n, K): ``q_k = 1 / sqrt(|(x, y) - p_k|^2 + z^2)``."""
        squared = (theta[:, None, :2] - self.relative).square().sum(dim=2) + theta[:, 2:3].square()
        return squared.rsqrt()

    def residual_and_jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``alpha q_k - a_k`` (n, K) and their Jacobian (n, K, 4), 0 where ``weight`` is 0."""
        q = self.inverse_distance(theta)
        alpha = theta[:, 3:4]
        slope = -alpha * q.pow(3)  # d(alpha q_k)/du = -alpha q_k^3 (u - u_k) for u in x, y, z
        jacobian = torch.stack([slope * (theta[:, None, 0] - self.relative[..., 0]),
                                slope * (theta[:, None, 1] - self.relative[..., 1]),
                                slope * theta[:, 2:3], q], dim=2) * self.weight.unsqueeze(2)
        return (alpha * q - self.amplitudes) * self.weight, jacobian


def _damped_normal_matrix(jacobian: torch.Tensor, damping: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """``J^T J + damping diag(J^T J)`` on free parameters, identity rows/columns for held ones (n, 4, 4)."""
    normal = jacobian.transpose(1, 2) @ jacobian
    damped = normal + (damping.unsqueeze(1) * normal.diagonal(dim1=1, dim2=2) + 1e-9).diag_embed()
    free_pairs = (free.unsqueeze(2) & free.unsqueeze(1)).to(normal.dtype)
    return damped * free_pairs + (~free).to(normal.dtype).diag_embed()


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a batch of small symmetric positive definite systems (n, m, m) x = (n, m) by unrolled Cholesky.

    Elementwise over the batch (m = 4 here): no per-matrix LAPACK call and no error check, so no host sync.
    """
    size = matrix.shape[-1]
    tiny = torch.finfo(matrix.dtype).tiny
    lower = [[None] * size for _ in range(size)]
    for j in range(size):
        pivot = matrix[:, j, j]
        for k in range(j):
            pivot = pivot - lower[j][k].square()
        lower[j][j] = pivot.clamp_min(tiny).sqrt()
        for i in range(j + 1, size):
            entry = matrix[:, i, j]
            for k in range(j):
                entry = entry - lower[i][k] * lower[j][k]
            lower[i][j] = entry / lower[j][j]
    forward = [None] * size  # L y = b
    for i in range(size):
        value = rhs[:, i]
        for k in range(i):
            value = value - lower[i][k] * forward[k]
        forward[i] = value / lower[i][i]
    solution = [None] * size  # L^T x = y
    for i in reversed(range(size)):
        value = forward[i]
        for k in range(i + 1, size):
            value = value - lower[k][i] * solution[k]
        solution[i] = value / lower[i][i]
    return torch.stack(solution, dim=1)


def _triangulation_xy(magnitudes: torch.Tensor, positions: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    return monopolar_triangulation(magnitudes, positions, own)[:, :2]


#: ``PeakParams.localization`` name -> batched (magnitudes (n, K), positions (n, K, 2), own (n, 2)) -> (n, 2) µm.
LOCALIZATION_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "center_of_mass": center_of_mass,
    "monopolar_triangulation": _triangulation_xy,
}


def localize_peaks(traces: np.ndarray | torch.Tensor, sample_index: np.ndarray, channel_index: np.ndarray,
                   channel_positions_um: np.ndarray, radius_um: float, *, method: str = "center_of_mass",
                   whitening_inverse: np.ndarray | None = None,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Locate peaks from their neighbourhood magnitudes (rules in the module docstring).

    Parameters
    ----------
    traces : (num_samples, num_channels) float32 array or tensor
        The traces the peaks were detected on (whitened or filtered).
    sample_index : (num_peaks,) int
        Rows of ``traces``.
    channel_index : (num_peaks,) int
        Peak channels.
    channel_positions_um : (num_channels, 2+) float, µm
    radius_um : float
        Channels within this distance of the peak channel are used.
    method : str
        A key of :data:`LOCALIZATION_METHODS`.
    whitening_inverse : (num_channels, num_channels) float or None
        When given, the values at the peak sample are first mapped back to
        the filtered scale, ``x = W^-1 @ x_white``.
    device : torch.device or str

    Returns
    -------
    x_um, y_um : (num_peaks,) float32 arrays, µm
    """
    if method not in LOCALIZATION_METHODS:
        raise BadInputError(f"unknown localization method {method!r}; expected one of {sorted(LOCALIZATION_METHODS)}")
    device = torch.device(device)
    tables = LocalizationTables.build(channel_positions_um, radius_um, whitening_inverse, device)
    traces = torch.as_tensor(traces, dtype=torch.float32).to(device)
    xy = tables.localize(traces, torch.as_tensor(np.asarray(sample_index), dtype=torch.int64, device=device),
                         torch.as_tensor(np.asarray(channel_index), dtype=torch.int64, device=device), method)
    xy = xy.cpu().numpy()
    return xy[:, 0].copy(), xy[:, 1].copy()


def localize_center_of_mass(traces: np.ndarray | torch.Tensor, sample_index: np.ndarray, channel_index: np.ndarray,
                            channel_positions_um: np.ndarray, radius_um: float, *,
                            whitening_inverse: np.ndarray | None = None,
                            device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Magnitude-weighted mean position of the channels around each peak (:func:`localize_peaks`)."""
    return localize_peaks(traces, sample_index, channel_index, channel_positions_um, radius_um,
                          method="center_of_mass", whitening_inverse=whitening_inverse, device=device)


def localize_monopolar_triangulation(traces: np.ndarray | torch.Tensor, sample_index: np.ndarray,
                                     channel_index: np.ndarray, channel_positions_um: np.ndarray,
                                     radius_um: float, *, whitening_inverse: np.ndarray | None = None,
                                     device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Point-source fit of the footprint around each peak (:func:`localize_peaks`)."""
    return localize_peaks(traces, sample_index, channel_index, channel_positions_um, radius_um,
                          method="monopolar_triangulation", whitening_inverse=whitening_inverse, device=device)


@dataclass(frozen=True)
class LocalizationTables:
    """Device-resident constants of localization for one run (build once, :meth:`localize` per chunk).

    Attributes
    ----------
    neighbours, valid : (num_channels, K) int64 / bool tensors
        :func:`neighbour_table` at the localization radius.
    positions : (num_channels, 2) float32 tensor, µm
    whitening_inverse_t : (num_channels, num_channels) float32 tensor or None
        ``W^-T``.
    """

    neighbours: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    whitening_inverse_t: torch.Tensor | None

    @classmethod
    def build(cls, channel_positions_um: np.ndarray, radius_um: float, whitening_inverse: np.ndarray | None,
              device: torch.device) -> LocalizationTables:
        positions = np.asarray(channel_positions_um, dtype=np.float64)[:, :2]
        neighbours, valid = neighbour_table(positions, radius_um)
        inverse_t = None
        if whitening_inverse is not None:
            inverse = np.asarray(whitening_inverse, dtype=np.float32)
            if inverse.shape != (len(positions), len(positions)):
                raise BadInputError(f"whitening_inverse has shape {inverse.shape}, "
                                    f"expected ({len(positions)}, {len(positions)})")
            inverse_t = torch.as_tensor(inverse.T.copy(), device=device)
        return cls(torch.as_tensor(neighbours, device=device), torch.as_tensor(valid, device=device),
                   torch.as_tensor(positions, dtype=torch.float32, device=device), inverse_t)

    def localize(self, traces: torch.Tensor, sample_index: torch.Tensor, channel_index: torch.Tensor,
                 method: str) -> torch.Tensor:
        """(num_peaks, 2) float32 tensor of x, y (µm) on the traces' device."""
        magnitudes = neighbourhood_magnitudes(traces, sample_index, channel_index, self.neighbours, self.valid,
                                              self.whitening_inverse_t)
        return LOCALIZATION_METHODS[method](magnitudes, self.positions[self.neighbours[channel_index]],
                                            self.positions[channel_index])
