"""Calcium imaging simulated from spikes, for training: indicator families, noise, frame rates.

One simulated neuron: spikes (Poisson with a slowly varying rate, plus
bursts, 2 ms refractory period) -> calcium on a fine grid (double
exponential per spike, rise and decay time constants of the family) ->
saturating, possibly supralinear indicator response (Hill curve normalized so
that one isolated spike gives ``dff_per_spike``) -> raw fluorescence
``F0 (1 + ΔF/F) (slow drift, bleaching)`` + residual neuropil (slow
fluctuations and a share of the population's activity) -> integrated over each
frame's exposure -> shot noise (sd ∝ sqrt(F)) + white noise scaled to a
drawn CASCADE noise level -> ΔF/F by the same running baseline as inference
(:func:`nwbflow.ophys.signal.dff_from_fluorescence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from nwbflow.ophys.signal import dff_from_fluorescence

#: Noise level (CASCADE, % / sqrt(Hz)) of white noise with standard deviation sigma (ΔF/F) at rate r:
#: 100 * median|Δ| / sqrt(r) = 100 * 0.954 sigma / sqrt(r).
NOISE_PER_SIGMA = 100.0 * 0.6745 * math.sqrt(2.0)


@dataclass(frozen=True)
class Family:
    """Ranges (low, high) each simulated neuron draws its indicator parameters from.

    rise_s, decay_s : time constants (s); dff_per_spike : ΔF/F of one spike;
    hill : Hill exponent (1 linear at low counts, > 1 supralinear, GCaMP-like);
    half_saturation : calcium (spike-equivalents) at half the maximal response.
    """

    rise_s: tuple[float, float]
    decay_s: tuple[float, float]
    dff_per_spike: tuple[float, float]
    hill: tuple[float, float]
    half_saturation: tuple[float, float]


FAMILIES: dict[str, Family] = {
    "OGB": Family((0.003, 0.02), (0.3, 1.2), (0.02, 0.12), (1.0, 1.0), (15.0, 60.0)),
    "GCaMP6f": Family((0.02, 0.08), (0.25, 0.8), (0.04, 0.35), (1.0, 2.5), (3.0, 15.0)),
    "GCaMP6s": Family((0.07, 0.25), (0.8, 2.2), (0.08, 0.45), (1.0, 2.5), (3.0, 12.0)),
    "GCaMP7f": Family((0.02, 0.07), (0.3, 0.9), (0.08, 0.45), (1.0, 2.0), (4.0, 15.0)),
    "GCaMP8": Family((0.004, 0.03), (0.1, 0.7), (0.08, 0.6), (1.0, 1.6), (5.0, 25.0)),
}


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], log: bool = False) -> float:
    low, high = bounds
    if low == high:
        return low
    return float(np.exp(rng.uniform(np.log(low), np.log(high)))) if log else float(rng.uniform(low, high))


def spike_train(rng: np.random.Generator, duration_s: float) -> np.ndarray:
    """Spike times (s): rate 0.05-8 Hz log-uniform, modulated by a slow random process, plus bursts."""
    base = _uniform(rng, (0.05, 8.0), log=True)
    dt = 0.01
    steps = int(duration_s / dt)
    modulation = lfilter([1.0], [1.0, -math.exp(-dt / rng.uniform(0.5, 5.0))], rng.standard_normal(steps))
    modulation /= max(modulation.std(), 1e-9)
    rate = base * np.exp(rng.uniform(0.0, 1.2) * modulation - 0.5 * rng.uniform(0.0, 1.2) ** 2)
    counts = rng.poisson(rate * dt)
    times = np.repeat(np.arange(steps) * dt, counts) + rng.uniform(0.0, dt, counts.sum())
    bursts = rng.uniform(0.0, duration_s, rng.poisson(duration_s * _uniform(rng, (0.0, 0.2))))
    parts = [times]
    for start in bursts:
        size = 2 + int(rng.poisson(2.5))
        parts.append(start + np.concatenate([[0.0], np.cumsum(rng.uniform(0.004, 0.02, size - 1))]))
    times = np.sort(np.concatenate(parts))
    times = times[(times >= 0) & (times < duration_s)]
    keep = np.concatenate([[True], np.diff(times) >= 0.002])
    return times[keep]


def indicator_response(spike_times_s: np.ndarray, dt_s: float, num_steps: int, rise_s: float, decay_s: float,
                       dff_per_spike: float, hill: float, half_saturation: float) -> np.ndarray:
    """ΔF/F on a fine grid (step ``dt_s``): double-exponential calcium through a normalized Hill curve."""
    index = np.minimum((spike_times_s / dt_s).astype(np.int64), num_steps - 1)
    counts = np.bincount(index, minlength=num_steps).astype(np.float64)
    rise_s = min(rise_s, 0.5 * decay_s)
    decay = lfilter([1.0], [1.0, -math.exp(-dt_s / decay_s)], counts)
    rise = lfilter([1.0], [1.0, -math.exp(-dt_s / rise_s)], counts)
    t_peak = decay_s * rise_s / (decay_s - rise_s) * math.log(decay_s / rise_s)
    calcium = (decay - rise) / (math.exp(-t_peak / decay_s) - math.exp(-t_peak / rise_s))
    powered = np.maximum(calcium, 0.0) ** hill
    k = half_saturation ** hill
    return dff_per_spike * (1.0 + k) * powered / (powered + k)


def simulate_neuron(rng: np.random.Generator, family: str, rate_hz: float, duration_s: float,
                    noise_level: float) -> tuple[np.ndarray, np.ndarray]:
    """One simulated neuron recorded at ``rate_hz``.

    Returns
    -------
    dff : (num_frames,) float32 ΔF/F from the running baseline (frame k spans [k / rate, (k + 1) / rate)).
    spike_times_s : (k,) float64 spike times (s).
    """
    f = FAMILIES[family]
    num_frames = int(duration_s * rate_hz)
    oversample = max(1, math.ceil(200.0 / rate_hz))  # fine step <= 5 ms
    dt = 1.0 / (rate_hz * oversample)
    spikes = spike_train(rng, num_frames / rate_hz)
    fine = indicator_response(spikes, dt, num_frames * oversample, _uniform(rng, f.rise_s, True),
                              _uniform(rng, f.decay_s, True), _uniform(rng, f.dff_per_spike, True),
                              _uniform(rng, f.hill), _uniform(rng, f.half_saturation, True))
    signal = fine.reshape(num_frames, oversample).mean(axis=1)
    t = (np.arange(num_frames) + 0.5) / rate_hz
    f0 = rng.uniform(100.0, 1000.0)
    drift = (1.0 + rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * t / rng.uniform(20.0, 200.0) + rng.uniform(0, 6.3))) \
        * np.exp(-t / rng.uniform(300.0, 3000.0))
    neuropil = _neuropil(rng, t, rate_hz, signal) * rng.uniform(0.0, 0.25)
    clean = f0 * drift * (1.0 + signal + neuropil)
    sigma = noise_level * math.sqrt(rate_hz) / NOISE_PER_SIGMA  # ΔF/F at baseline
    shot_share = rng.uniform(0.0, 1.0)
    sd = f0 * sigma * np.sqrt(shot_share * clean / (f0 * drift) + (1.0 - shot_share))
    raw = clean + sd * rng.standard_normal(num_frames)
    dff = dff_from_fluorescence(raw[:, None], rate_hz, window_s=60.0)[:, 0]
    return dff, spikes


def _neuropil(rng: np.random.Generator, t: np.ndarray, rate_hz: float, own: np.ndarray) -> np.ndarray:
    """Residual neuropil ΔF/F: slow fluctuations plus population events (a blurred, sparse echo)."""
    tau = rng.uniform(0.5, 5.0)
    alpha = math.exp(-1.0 / (tau * rate_hz))
    slow = lfilter([math.sqrt(1 - alpha ** 2)], [1.0, -alpha], rng.standard_normal(t.size)) * 0.5
    events = lfilter([1.0], [1.0, -math.exp(-1.0 / (0.8 * rate_hz))],
                     (rng.random(t.size) < 0.3 / rate_hz) * rng.exponential(0.3, t.size))
    return slow + events + rng.uniform(0.0, 0.3) * own
