"""Non-negative AR(1) deconvolution: the classical, fast alternative to the CNN.

Model (as in OASIS, Friedrich et al. 2017): ``y_t = b + c_t + noise``,
``c_t = g c_{t-1} + s_t``, ``s_t >= 0``; we solve
``min_c 1/2 sum (y_t - b - c_t)^2 + lam sum s_t``.

Our solution path (not OASIS's code): substituting ``c_t = g^t u_t`` turns
``s_t >= 0`` into "``u`` non-decreasing", and the sparsity term into a linear
term in ``c`` that shifts the data; the problem becomes a *weighted isotonic
regression* of ``(y_t - b - mu_t) g^-t`` with weights ``g^2t``, solved exactly
by the pool-adjacent-violators algorithm (scipy's C implementation), then
clipped at zero (the non-negative solution of an isotonic problem is its
clipped unconstrained one). ``g^-t`` overflows on long traces, so the trace is
solved in overlapping blocks of at most ``e^200`` dynamic range, each keeping
only its central part (edge effects decay within a few time constants).

``g`` is estimated from the trace's autocovariance (``acov(2) / acov(1)``,
exact for AR(1) calcium plus white noise), the noise ``sigma`` from the median
absolute first difference, the baseline ``b`` from a low percentile, and
``lam = sparsity * sigma`` with ``sparsity`` tuned on ground truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from nwbflow.ophys.signal import fill_gaps

#: Clip range of the estimated AR coefficient (unitless).
DECAY_RANGE = (0.3, 0.998)
#: Largest log dynamic range of ``g^-t`` within one block.
MAX_LOG_RANGE = 200.0


@dataclass(frozen=True)
class Ar1Fit:
    """One trace's deconvolution: calcium (ΔF/F), spikes (ΔF/F jumps), and the parameters used."""

    calcium: np.ndarray
    spikes: np.ndarray
    g: float
    baseline: float
    sigma: float
    lam: float


def estimate_noise(y: np.ndarray) -> float:
    """White-noise standard deviation from the median absolute first difference (same unit as ``y``)."""
    return float(np.median(np.abs(np.diff(y))) / (0.6745 * math.sqrt(2.0))) if y.size > 1 else 0.0


def estimate_g(y: np.ndarray) -> float:
    """AR(1) coefficient of the calcium in ``y`` from its autocovariance at lags 1 and 2.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> from scipy.signal import lfilter
    >>> c = lfilter([1.0], [1.0, -0.9], rng.poisson(0.1, 20000).astype(float))
    >>> round(estimate_g(c + 0.05 * rng.standard_normal(c.size)), 2)
    0.9
    """
    x = y - y.mean()
    n = x.size
    if n < 4:
        return DECAY_RANGE[0]
    acov1, acov2 = float(x[1:] @ x[:-1]) / n, float(x[2:] @ x[:-2]) / n
    if acov1 <= 0 or acov2 <= 0:
        return DECAY_RANGE[0]
    return float(np.clip(acov2 / acov1, *DECAY_RANGE))


def _solve_block(z: np.ndarray, g: float, lam: float) -> np.ndarray:
    """Non-negative calcium ``c`` minimizing 1/2 |z - c|^2 + lam sum s over one block (its own start free)."""
    t = np.arange(z.size, dtype=np.float64)
    shift = np.full(z.size, lam * (1.0 - g))
    shift[-1] = lam
    log_g = math.log(g)
    values = (z - shift) * np.exp(-t * log_g)
    weights = np.exp(2.0 * t * log_g)
    u = isotonic_regression(values, weights=weights, increasing=True).x
    return np.maximum(u, 0.0) * np.exp(t * log_g)


def deconvolve_ar1(y: np.ndarray, *, sparsity: float = 1.0, g: float | None = None,
                   baseline_percentile: float = 15.0) -> Ar1Fit:
    """Deconvolve one ΔF/F trace.

    Parameters
    ----------
    y : (num_frames,) ΔF/F (unitless).
    sparsity : lam / sigma, the L1 penalty in units of the noise (unitless; larger = fewer spikes).
    g : AR(1) coefficient per frame; None estimates it from ``y``.
    baseline_percentile : ``b`` = this percentile of ``y`` + 1.04 sigma (the percentile of pure noise).

    Returns
    -------
    Ar1Fit with ``spikes`` (num_frames,) >= 0: the calcium jump at each frame (ΔF/F).
    """
    y = np.asarray(y, dtype=np.float64)
    sigma = estimate_noise(y)
    g = estimate_g(y) if g is None else float(g)
    baseline = float(np.percentile(y, baseline_percentile)) + 1.04 * sigma if y.size else 0.0
    lam = sparsity * sigma
    z = y - baseline
    block = max(16, int(MAX_LOG_RANGE / -math.log(g)))
    calcium = _solve_block(z, g, lam) if z.size <= block else _blockwise(z, g, lam, block)
    spikes = np.empty_like(calcium)
    if calcium.size:
        spikes[0] = calcium[0]
        spikes[1:] = calcium[1:] - g * calcium[:-1]
    return Ar1Fit(calcium=calcium, spikes=np.maximum(spikes, 0.0), g=g, baseline=baseline, sigma=sigma, lam=lam)


def _blockwise(z: np.ndarray, g: float, lam: float, block: int) -> np.ndarray:
    """Solve overlapping blocks; each keeps its central half (the first/last keep their outer edge too)."""
    margin = block // 4
    step = block - 2 * margin
    out = np.empty_like(z)
    start = 0
    while True:
        stop = min(start + block, z.size)
        solved = _solve_block(z[start:stop], g, lam)
        keep_from = 0 if start == 0 else margin
        keep_to = solved.size if stop == z.size else solved.size - margin
        out[start + keep_from:start + keep_to] = solved[keep_from:keep_to]
        if stop == z.size:
            return out
        start += step


def ar1_spike_rate(dff: np.ndarray, rate_hz: float, *, sparsity: float, dff_per_spike: float) -> np.ndarray:
    """Spike rate (Hz) of each ROI by AR(1) deconvolution.

    Parameters
    ----------
    dff : (num_frames, num_rois) ΔF/F (NaN gaps interpolated).
    rate_hz : frame rate (Hz).
    sparsity : L1 penalty in noise units (see :func:`deconvolve_ar1`).
    dff_per_spike : ΔF/F jump of one spike, converting deconvolved jumps to spike counts.

    Returns
    -------
    (num_frames, num_rois) float32 spike rate (Hz), >= 0.
    """
    dff = fill_gaps(np.asarray(dff).reshape(len(dff), -1))
    rates = np.zeros(dff.shape, dtype=np.float32)
    for roi in range(dff.shape[1]):
        rates[:, roi] = deconvolve_ar1(dff[:, roi], sparsity=sparsity).spikes / dff_per_spike * rate_hz
    return rates
