"""MEDiCINe motion estimation (Watters, Buccino & Jazayeri 2024) in torch: our implementation.

Peaks are points (time s, depth µm, amplitude). Depth and amplitude are scaled
to [0, 1]. The motion is a free array ``M`` (num_depth_bins x num_time_bins),
bounded as ``b * tanh(M)`` (``b`` is half of ``motion_bound_um`` over the depth
span), smoothed over time by a triangular kernel of ``time_kernel_width_s``
(normalized at the edges) and centred per depth level. A peak's motion is
interpolated linearly across depth levels and, over time, either held over
its bin (the paper) or interpolated linearly between bin centres (our
default). An activity network (an MLP over depth and amplitude, each with
``sin(f x)`` features for f = 1, 2, 4, ..., 32) scores how likely a
(motion-corrected depth, amplitude) point is. The loss is the logistic loss of
real peaks against negatives that keep real peak times but draw depth and
amplitude uniformly: the only way to explain every time point is a motion that
registers all peaks onto one stationary distribution. Adam, gradient clipping,
and Gaussian noise on the motion that decays to 0 over the first
``motion_noise_steps`` steps.

Differences from the reference package (``medicine-neuro``), by design:
everything is sampled on the ``device`` from this call's own seeded
generator; no host synchronisation per step (losses stay on the device; an
optional early stop looks at the motion every ``CHECK_INTERVAL`` steps); one
forward pass over real and negative peaks together; the logistic loss is
computed from logits; time bins are reported by their centres (the reference
returns left edges); nothing is plotted or logged to the root logger.

Sign of the result: observed depth = rest depth + displacement
(:class:`~nwbflow.ephys.motion.displacement.Motion`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from nwbflow.ephys.motion.displacement import Motion
from nwbflow.errors import BadInputError
from nwbflow.params import MotionParams

__all__ = ["CHECK_INTERVAL", "FEATURE_FREQUENCIES", "MIN_PEAKS", "MotionFit", "estimate_motion"]

log = logging.getLogger(__name__)

#: Frequencies of the sine features of depth and amplitude (the reference's).
FEATURE_FREQUENCIES = (1, 2, 4, 8, 16, 32)
#: Steps between looks at the motion for early stopping (the only host syncs of the loop).
CHECK_INTERVAL = 250
#: Fewer peaks than this cannot constrain a motion.
MIN_PEAKS = 100
_TIME_EPSILON_S = 1e-3


@dataclass(frozen=True, eq=False)
class MotionFit:
    """The estimated motion and how the fit went.

    Attributes
    ----------
    motion : Motion
    losses : (steps,) float32
        Logistic loss per step.
    steps : int
        Steps run (fewer than ``training_steps`` after an early stop).
    seconds : float
        Wall time of the fit (s).
    device : str
    peaks_used : int
        Peaks left after the amplitude threshold.
    """

    motion: Motion
    losses: np.ndarray
    steps: int
    seconds: float
    device: str
    peaks_used: int


class _ActivityNetwork(torch.nn.Module):
    """Logit of a (depth, amplitude) point, both in [0, 1] (depth possibly shifted by the motion)."""

    def __init__(self, hidden_features: tuple[int, ...]):
        super().__init__()
        widths = [2 * (1 + len(FEATURE_FREQUENCIES)), *hidden_features, 1]
        layers: list[torch.nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            if i:
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Linear(width_in, width_out))
        self.net = torch.nn.Sequential(*layers)
        self.register_buffer("frequencies", torch.tensor(FEATURE_FREQUENCIES, dtype=torch.float32))

    def forward(self, depths: torch.Tensor, amplitudes: torch.Tensor) -> torch.Tensor:
        points = torch.stack([depths, amplitudes], dim=1)  # (n, 2)
        waves = torch.sin(points[:, :, None] * self.frequencies)  # (n, 2, F)
        features = torch.cat([points[:, :1], waves[:, 0], points[:, 1:], waves[:, 1]], dim=1)
        return self.net(features)[:, 0]


class _MotionField(torch.nn.Module):
    """Bounded, time-smoothed, centred motion (normalized depth units) over depth levels x time bins."""

    def __init__(self, num_depth_bins: int, num_time_bins: int, bound: float, kernel_bins: torch.Tensor,
                 start_s: float, bin_s: float, interpolate_time: bool):
        super().__init__()
        self.raw = torch.nn.Parameter(torch.zeros(num_depth_bins, num_time_bins))
        self.bound, self.start_s, self.bin_s, self.interpolate_time = bound, start_s, bin_s, interpolate_time
        self.register_buffer("kernel", kernel_bins[None, None])
        ones = torch.ones(1, 1, num_time_bins)
        self.register_buffer("edge_norm", functional.conv1d(ones, self.kernel, padding="same")[0])
        self.register_buffer("levels", torch.linspace(0.0, 1.0, num_depth_bins))

    def smooth(self) -> torch.Tensor:
        """(num_depth_bins, num_time_bins): bound * tanh, triangular smoothing, mean over time removed."""
        bounded = self.bound * torch.tanh(self.raw)
        smoothed = functional.conv1d(bounded[:, None], self.kernel, padding="same")[:, 0] / self.edge_norm
        # Centred with a detached mean, as the paper does: the fit cannot buy density by shifting everything.
        return smoothed - smoothed.mean(dim=1, keepdim=True).detach()

    def at(self, field: torch.Tensor, times_s: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        """Motion (normalized depth) of each point from ``field`` (:meth:`smooth`): over time bins and depth levels."""
        num_time_bins = field.shape[1]
        position = (times_s - self.start_s) / self.bin_s
        if self.interpolate_time:
            position = (position - 0.5).clamp(0.0, num_time_bins - 1)
            left = position.floor().long().clamp(max=max(num_time_bins - 2, 0))
            weight = (position - left).clamp(0.0, 1.0)
            right = (left + 1).clamp(max=num_time_bins - 1)
            per_level = field[:, left] * (1 - weight) + field[:, right] * weight
        else:
            per_level = field[:, position.floor().long().clamp(0, num_time_bins - 1)]
        return (per_level * _depth_weights(depths, self.levels)).sum(dim=0)


def _depth_weights(depths: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(num_levels, n) linear-interpolation weights of each depth between the levels (constant outside)."""
    if len(levels) == 1:
        return torch.ones(1, len(depths), dtype=depths.dtype, device=depths.device)
    spacing = 1.0 / (len(levels) - 1)
    hats = functional.relu(1.0 - (depths.clamp(0.0, 1.0)[None] - levels[:, None]).abs() / spacing)
    return hats / hats.sum(dim=0, keepdim=True)


def triangular_kernel(width_s: float, bin_s: float) -> np.ndarray:
    """Unit-sum triangular kernel of full width ``width_s`` sampled at ``bin_s`` (odd length >= 1).

    >>> triangular_kernel(4.0, 1.0).round(3).tolist()
    [0.25, 0.5, 0.25]
    """
    half_width_bins = 0.5 * width_s / bin_s
    if half_width_bins <= 1:
        return np.ones(1)
    half = np.arange(1.0, 0.0, -1.0 / half_width_bins)
    kernel = np.concatenate([half[::-1], half[1:]])
    return kernel / kernel.sum()


def estimate_motion(times_s: np.ndarray, depths_um: np.ndarray, amplitudes: np.ndarray, params: MotionParams, *,
                    seed: int = 0, device: torch.device | str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> MotionFit:
    """Fit MEDiCINe's motion and activity distribution to peaks.

    Parameters
    ----------
    times_s : (n,) float, s
        Peak times on the recording's clock.
    depths_um : (n,) float, µm
        Peak depths along the probe (e.g. localized ``y_um``).
    amplitudes : (n,) float
        Peak amplitudes (any unit; only their ranking and spread matter).
    params : MotionParams
    seed : int
        Seeds this call's own generator (network initialisation and sampling).
    device : torch.device or str
        Where to fit; resolve ``"auto"`` before calling. Threads: torch's
        current setting (the caller's choice).
    progress : callable, optional
        Called as ``progress(steps_done, training_steps)`` every
        ``CHECK_INTERVAL`` steps; an exception it raises stops the fit.

    Returns
    -------
    MotionFit

    Raises
    ------
    BadInputError
        Fewer than ``MIN_PEAKS`` usable peaks, non-finite values, or no spread in depth.
    """
    device = torch.device(device)
    started = time.perf_counter()
    times, depths, amps = _usable_peaks(times_s, depths_um, amplitudes, params.amplitude_threshold_quantile)
    depth_lo, depth_span = float(depths.min()), float(np.ptp(depths))
    amp_lo, amp_span = float(amps.min()), float(np.ptp(amps))
    start_s = float(times.min()) - _TIME_EPSILON_S
    num_time_bins = max(math.ceil((float(times.max()) + _TIME_EPSILON_S - start_s) / params.time_bin_s), 1)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))  # nn.Linear's initialisation draws from the global CPU generator
    try:
        network = _ActivityNetwork(tuple(params.hidden_features)).to(device)
    finally:
        torch.random.set_rng_state(torch_state)
    field = _MotionField(params.num_depth_bins, num_time_bins, 0.5 * params.motion_bound_um / depth_span,
                         torch.as_tensor(triangular_kernel(params.time_kernel_width_s, params.time_bin_s),
                                         dtype=torch.float32),
                         start_s, params.time_bin_s, params.time_interpolation == "linear").to(device)
    peaks = _DevicePeaks(times, (depths - depth_lo) / depth_span, (amps - amp_lo) / max(amp_span, 1e-12), device)
    reported, losses, steps = _fit(network, field, peaks, params, generator, depth_span, progress)
    displacement = -(reported.T.cpu().numpy()) * depth_span  # the model's rest depth = observed + motion
    motion = Motion(time_bins_s=start_s + params.time_bin_s * (np.arange(num_time_bins) + 0.5),
                    depth_bins_um=depth_lo + depth_span * np.linspace(0.0, 1.0, params.num_depth_bins),
                    displacement_um=displacement)
    seconds = time.perf_counter() - started
    log.info("MEDiCINe motion: %d peaks, %d time bins x %d depth levels, %d steps on %s in %.1f s", len(times),
             num_time_bins, params.num_depth_bins, steps, device, seconds)
    return MotionFit(motion=motion, losses=losses, steps=steps, seconds=seconds, device=str(device),
                     peaks_used=len(times))


@dataclass(frozen=True, eq=False)
class _DevicePeaks:
    times_s: torch.Tensor
    depths: torch.Tensor
    amplitudes: torch.Tensor

    def __init__(self, times_s: np.ndarray, depths: np.ndarray, amplitudes: np.ndarray, device: torch.device):
        for name, values in (("times_s", times_s), ("depths", depths), ("amplitudes", amplitudes)):
            object.__setattr__(self, name, torch.as_tensor(values, dtype=torch.float32, device=device))


def _usable_peaks(times_s, depths_um, amplitudes, threshold_quantile: float) -> tuple[np.ndarray, ...]:
    times, depths, amps = (np.asarray(a, dtype=np.float64).ravel() for a in (times_s, depths_um, amplitudes))
    if not len(times) == len(depths) == len(amps):
        raise BadInputError(f"peak arrays differ in length: {len(times)} times, {len(depths)} depths, "
                            f"{len(amps)} amplitudes")
    finite = np.isfinite(times) & np.isfinite(depths) & np.isfinite(amps)
    if not finite.all():
        raise BadInputError(f"{int((~finite).sum())} peaks have non-finite time, depth or amplitude",
                            fix="drop peaks that could not be localized before estimating motion")
    if threshold_quantile > 0 and len(amps):
        keep = np.abs(amps) > np.quantile(np.abs(amps), threshold_quantile)
        times, depths, amps = times[keep], depths[keep], amps[keep]
    if len(times) < MIN_PEAKS:
        raise BadInputError(f"{len(times)} peaks are too few to estimate motion (need at least {MIN_PEAKS})",
                            fix="lower peaks.threshold_mad, or skip the motion stage for this recording")
    if np.ptp(depths) <= 0:
        raise BadInputError("every peak has the same depth: motion along the probe cannot be estimated",
                            fix="check the channel positions (a single-row probe cannot show drift)")
    return times, depths, amps


def _fit(network: _ActivityNetwork, field: _MotionField, peaks: _DevicePeaks, params: MotionParams,
         generator: torch.Generator, depth_span_um: float,
         progress: Callable[[int, int], None] | None) -> tuple[torch.Tensor, np.ndarray, int]:
    """The training loop; returns (the motion field to report, losses per step, steps run).

    Once the motion noise is gone, the field is also averaged over the last
    ``params.average_steps`` steps (an exponential average; 0: the last step's
    field, as the paper): at the paper's learning rate the field jitters by
    ~0.6 µm (mean over bins) from one check to the next, and the average
    does not. Early stopping compares that average between checks.
    """
    device, batch = peaks.times_s.device, params.batch_size
    optimizer = torch.optim.Adam([*network.parameters(), *field.parameters()], lr=params.learning_rate)
    losses = torch.zeros(params.training_steps, device=device)
    bound = field.bound
    average, previous, steps = None, None, params.training_steps
    for step in range(params.training_steps):
        noise_std = max((params.motion_noise_steps - step) / params.motion_noise_steps, 0.0) \
            * params.initial_motion_noise
        picks = torch.randint(len(peaks.times_s), (2 * batch,), device=device, generator=generator)
        uniform = torch.rand((2, batch), device=device, generator=generator)
        depths = torch.cat([peaks.depths[picks[:batch]], uniform[0] * (1 + 2 * bound) - bound])
        amplitudes = torch.cat([peaks.amplitudes[picks[:batch]], uniform[1]])
        smooth = field.smooth()
        motion = field.at(smooth, peaks.times_s[picks], depths)  # negatives keep real peak times
        if noise_std > 0:
            motion = motion + noise_std * torch.randn(motion.shape, device=device, generator=generator)
        logits = network(depths + motion, amplitudes)
        loss = -(functional.logsigmoid(logits[:batch]).mean() + functional.logsigmoid(-logits[batch:]).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*network.parameters(), *field.parameters()], params.grad_clip)
        optimizer.step()
        losses[step] = loss.detach()
        settled = step - params.motion_noise_steps + 1  # steps since the noise reached 0
        if params.average_steps and settled > 0:
            current = smooth.detach()
            average = current.clone() if average is None else average.lerp_(
                current, max(1.0 / settled, 1.0 / params.average_steps))
        if (step + 1) % CHECK_INTERVAL == 0:
            if progress is not None:
                progress(step + 1, params.training_steps)
            if params.early_stop_tolerance_um > 0 and settled >= params.average_steps:
                latest = (field.smooth().detach() if average is None else average) * depth_span_um
                if previous is not None and float((latest - previous).abs().mean()) < params.early_stop_tolerance_um:
                    steps = step + 1
                    break
                previous = latest.clone()
    reported = field.smooth().detach() if average is None else average
    return reported, losses[:steps].cpu().numpy(), steps
