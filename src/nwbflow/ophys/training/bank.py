"""Training examples: ΔF/F windows at the model rate with their spike-count targets.

Ground truth is resampled as CASCADE does, to other frame rates and noise
levels: a crop of a recording is kept at its own rate (at most 100 Hz) or,
half of the time, resampled to a rate drawn in [7 Hz, that rate] with the
very function inference uses; then white and signal-dependent noise is
added until a drawn target noise level is reached (never removed: already
noisier data stay as they are). Simulated neurons (:mod:`.simulate`) cover
indicator families and conditions the ground truth lacks. Every example
then goes through inference's path: noise level at the recorded rate,
resampling to the model rate, edge padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from nwbflow.ophys.model import DFF_CLIP, TRAINED_RATE_RANGE_HZ, CnnSpec
from nwbflow.ophys.signal import noise_level, resample
from nwbflow.ophys.training.groundtruth import GtDataset, Recording
from nwbflow.ophys.training.simulate import FAMILIES, NOISE_PER_SIGMA, simulate_neuron

#: Output samples of one training example (at the model rate).
EXAMPLE_SAMPLES = 256
#: Gaussian smoothing of the spike-count targets (s).
TARGET_SIGMA_S = 0.025
RATE_RANGE_HZ = TRAINED_RATE_RANGE_HZ
#: Share of ground-truth crops kept at their own rate (at most the top of RATE_RANGE_HZ); the rest are
#: resampled to a rate drawn log-uniformly below it. Without it few examples are fast (log-uniform puts
#: the median at 26 Hz) and the network never learns the timing that 100+ Hz recordings carry.
TOP_RATE_SHARE = 0.5
#: Target noise levels (CASCADE, % / sqrt(Hz)) of degraded ground truth (its recordings are at 0.3-1.7, so
#: the low end keeps some as recorded), and of simulated neurons.
NOISE_RANGE = (0.3, 9.0)
SIMULATED_NOISE_RANGE = (0.1, 10.0)
SIMULATED = -1


@dataclass
class Bank:
    """Examples: inputs (E, EXAMPLE_SAMPLES + window - 1) ΔF/F, noise (E,), recorded rate (E,) Hz,
    targets (E, EXAMPLE_SAMPLES) spikes per model sample, source (E,) dataset index or SIMULATED."""

    dff: np.ndarray
    noise: np.ndarray
    rate_hz: np.ndarray
    target: np.ndarray
    source: np.ndarray

    @staticmethod
    def concatenate(parts: list[Bank]) -> Bank:
        return Bank(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                      ("dff", "noise", "rate_hz", "target", "source")))


def examples_from_trace(dff: np.ndarray, rate_hz: float, spike_times_s: np.ndarray, spec: CnnSpec,
                        rng: np.random.Generator, count: int, source: int) -> Bank | None:
    """Up to ``count`` non-overlapping windows of one trace (frame k at k / rate_hz, spikes on that clock)."""
    noise = float(noise_level(dff[:, None], rate_hz)[0])
    x = resample(dff, rate_hz, spec.model_rate_hz)
    length = x.size
    if length < EXAMPLE_SAMPLES:
        return None
    # Model sample j stands for time j / model rate: it counts the spikes nearest to it, not those after it.
    index = np.floor(spike_times_s * spec.model_rate_hz + 0.5).astype(np.int64)
    counts = np.bincount(index[(index >= 0) & (index < length)], minlength=length).astype(np.float32)
    target = gaussian_filter1d(counts, TARGET_SIGMA_S * spec.model_rate_hz, mode="constant")
    half = spec.half_window
    padded = np.pad(np.clip(x, *DFF_CLIP), half, mode="edge")
    slots = length // EXAMPLE_SAMPLES
    offset = int(rng.integers(0, length - slots * EXAMPLE_SAMPLES + 1))
    starts = offset + EXAMPLE_SAMPLES * rng.permutation(slots)[:count]
    inputs = np.stack([padded[s:s + EXAMPLE_SAMPLES + 2 * half] for s in starts])
    targets = np.stack([target[s:s + EXAMPLE_SAMPLES] for s in starts])
    n = len(starts)
    return Bank(inputs.astype(np.float32), np.full(n, noise, np.float32), np.full(n, rate_hz, np.float32),
                targets.astype(np.float32), np.full(n, source, np.int32))


def degrade(recording: Recording, rng: np.random.Generator, crop_s: float) -> tuple[np.ndarray, float, np.ndarray]:
    """A random crop of a ground-truth recording at a lower frame rate and a higher noise level.

    Returns (ΔF/F at the new rate, the new rate (Hz), spike times relative to the crop's first frame (s)).
    """
    native = recording.rate_hz
    n = recording.dff.size
    frames = min(n, int(crop_s * native))
    start = int(rng.integers(0, n - frames + 1))
    dff = recording.dff[start:start + frames].astype(np.float64)
    t0 = recording.times_s[start]
    spikes = recording.spike_times_s
    spikes = spikes[(spikes >= t0) & (spikes < t0 + frames / native)] - t0
    high = min(native, RATE_RANGE_HZ[1])
    if high > RATE_RANGE_HZ[0] and rng.random() >= TOP_RATE_SHARE:
        rate = float(np.exp(rng.uniform(np.log(RATE_RANGE_HZ[0]), np.log(high))))
    else:
        rate = high
    if rate < 0.97 * native:
        dff = resample(dff, native, rate).astype(np.float64)
    else:
        rate = native
    current = float(noise_level(dff[:, None], rate)[0])
    wanted = float(np.exp(rng.uniform(*np.log(NOISE_RANGE))))
    if wanted > current:
        sigma = math.sqrt(wanted ** 2 - current ** 2) * math.sqrt(rate) / NOISE_PER_SIGMA
        share = rng.uniform(0.0, 1.0)
        sd = sigma * np.sqrt((1.0 - share) + share * (1.0 + np.clip(dff, 0.0, None)))
        dff = dff + sd * rng.standard_normal(dff.size)
    return dff.astype(np.float32), rate, spikes


def ground_truth_bank(dataset: GtDataset, source: int, spec: CnnSpec, rng: np.random.Generator,
                      num_examples: int, per_crop: int = 4) -> Bank:
    """``num_examples`` degraded windows of one dataset, neurons drawn uniformly."""
    crop_s = (per_crop * EXAMPLE_SAMPLES + 2 * spec.window) / spec.model_rate_hz
    parts, have = [], 0
    while have < num_examples:
        neuron = dataset.neurons[int(rng.integers(len(dataset.neurons)))]
        lengths = np.array([r.dff.size for r in neuron], dtype=np.float64)
        recording = neuron[int(rng.choice(len(neuron), p=lengths / lengths.sum()))]
        dff, rate, spikes = degrade(recording, rng, crop_s)
        part = examples_from_trace(dff, rate, spikes, spec, rng, min(per_crop, num_examples - have), source)
        if part is not None:
            parts.append(part)
            have += len(part.source)
    return Bank.concatenate(parts)


def simulated_bank(spec: CnnSpec, rng: np.random.Generator, num_examples: int, duration_s: float = 90.0,
                   per_trace: int = 6) -> Bank:
    """``num_examples`` windows of simulated neurons, families drawn uniformly, rates and noise log-uniform."""
    families = sorted(FAMILIES)
    parts, have = [], 0
    while have < num_examples:
        family = families[int(rng.integers(len(families)))]
        rate = float(np.exp(rng.uniform(*np.log(RATE_RANGE_HZ))))
        noise = float(np.exp(rng.uniform(*np.log(SIMULATED_NOISE_RANGE))))
        dff, spikes = simulate_neuron(rng, family, rate, duration_s, noise)
        part = examples_from_trace(dff, rate, spikes, spec, rng, min(per_trace, num_examples - have), SIMULATED)
        if part is not None:
            parts.append(part)
            have += len(part.source)
    return Bank.concatenate(parts)
