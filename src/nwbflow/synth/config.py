"""What to simulate: ``SynthConfig``, its validation, indicator kinetics and seeding."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from nwbflow.errors import BadInputError

DRIFT_MODES = {"zigzag": "zigzag", "step": "bump"}  # ours -> SpikeInterface's name
_UUID_NAMESPACE = uuid.UUID("6f3c1a52-2d1e-4a8e-9a51-6e7766c0b1f0")


@dataclass(frozen=True)
class IndicatorKinetics:
    """Approximate in-vivo kinetics of one calcium indicator.

    Parameters
    ----------
    rise_s, decay_s : time constants of the double exponential (s).
    dff_per_spike : peak ΔF/F of one isolated action potential (unitless).
    saturation_spikes : spike-equivalents of calcium at half saturation (Hill, n = 1).
    """

    rise_s: float
    decay_s: float
    dff_per_spike: float
    saturation_spikes: float


INDICATORS: dict[str, IndicatorKinetics] = {
    "GCaMP6f": IndicatorKinetics(rise_s=0.05, decay_s=0.4, dff_per_spike=0.20, saturation_spikes=12.0),
    "GCaMP6s": IndicatorKinetics(rise_s=0.18, decay_s=1.2, dff_per_spike=0.25, saturation_spikes=8.0),
    "jGCaMP8m": IndicatorKinetics(rise_s=0.01, decay_s=0.15, dff_per_spike=0.30, saturation_spikes=15.0),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to simulate. Invalid values raise ``BadInputError`` at construction.

    Parameters
    ----------
    duration_s : session length (s).
    num_channels : probe contacts, NP1.0-like: 4 staggered columns, 20 µm row pitch.
    num_units : ground-truth units.
    sampling_rate_hz : ephys sampling rate (Hz).
    noise_level_uv : ephys noise standard deviation per channel (µV).
    drift : add a vertical probe drift (``drift_mode``, ``drift_amplitude_um``).
    ephys, ophys : which modalities to write.
    num_rois : two-photon ROIs.
    imaging_rate_hz : frame rate (Hz).
    seed : master seed (>= 0); every random stream derives from it.
    firing_rate_range_hz : units' mean rates, drawn log-uniformly (Hz).
    lsb_uv : int16 quantization step (µV per bit).
    drift_mode : "zigzag" (triangle wave) or "step" (random steps).
    drift_amplitude_um : drift peak-to-peak (µm).
    drift_period_s : zigzag period (s); None means ``duration_s / 2``.
    brain_area, imaging_area : Allen CCF locations of the probe / imaging plane.
    indicator : one of ``INDICATORS``.
    roi_rate_range_hz : ROIs' background Poisson rates, log-uniform (Hz).
    burst_fraction : fraction of ROIs that also fire bursts (2-8 spikes, ~100 Hz).
    fov_px : imaging field of view (pixels, square, 2 µm each).
    photon_gain_au : fluorescence units per photon; shot noise sd = sqrt(gain * F).
    compression : gzip the large datasets.
    adc_shifts : sample channel ``c`` ``inter_sample_shift[c]`` of a sample period late, in the Neuropixels 1.0
        pattern (:func:`nwbflow.ephys.phase_shift.neuropixels_1_shifts`), and write the shifts in the electrodes
        table's ``inter_sample_shift`` column, as NeuroConv does.
    common_noise_uv : RMS (µV) of a common-mode signal reaching every channel in the brain (12 sinusoids,
        300-6000 Hz, seeded), sampled at each channel's own time (with ``adc_shifts``, staggered): the shared
        background a probe's channels in the brain carry.
    dead_channels : channels that record nothing but 1 µV of their own noise (no spikes, no shared signal).
    noisy_channels : channels with their own white noise at 4x ``noise_level_uv`` added.
    outside_channels : this many contacts at the top of the probe (largest y) lie outside the brain: no spikes,
        no shared signal, their own noise at ``noise_level_uv``.
    saturation_events : this many artifacts (a lick, a cable knock: 2-20 ms, seeded times) drive every channel
        past the amplifier's rails, ``saturation_rail_uv``, at which all samples are clipped
        (:func:`nwbflow.synth.ephys.saturation_periods` gives their sample ranges).
    saturation_rail_uv : where the amplifier clips (µV, both signs); Neuropixels 1.0: 512 steps of 2.34 µV.
    shanks : 1 (a Neuropixels 1.0-like shank), or a Neuropixels 2.0-like probe of this many shanks 250 µm apart
        (channels split evenly; one ElectrodeGroup per shank and a ``shank_ids`` column, as NeuroConv writes).
    """

    duration_s: float = 30.0
    num_channels: int = 32
    num_units: int = 10
    sampling_rate_hz: float = 30000.0
    noise_level_uv: float = 10.0
    drift: bool = False
    ephys: bool = True
    ophys: bool = True
    num_rois: int = 20
    imaging_rate_hz: float = 30.0
    seed: int = 0
    firing_rate_range_hz: tuple[float, float] = (2.0, 12.0)
    lsb_uv: float = 0.195
    drift_mode: str = "zigzag"
    drift_amplitude_um: float = 30.0
    drift_period_s: float | None = None
    brain_area: str = "CA1"
    imaging_area: str = "VISp"
    indicator: str = "GCaMP6f"
    roi_rate_range_hz: tuple[float, float] = (0.2, 3.0)
    burst_fraction: float = 0.3
    fov_px: int = 64
    photon_gain_au: float = 2.0
    compression: bool = True
    adc_shifts: bool = False
    common_noise_uv: float = 0.0
    dead_channels: tuple[int, ...] = ()
    noisy_channels: tuple[int, ...] = ()
    outside_channels: int = 0
    saturation_events: int = 0
    saturation_rail_uv: float = 1200.0
    shanks: int = 1

    def __post_init__(self) -> None:
        for name in ("firing_rate_range_hz", "roi_rate_range_hz"):  # JSON gives lists; keep tuples
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("dead_channels", "noisy_channels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = _config_problems(self)
        if problems:
            raise BadInputError(f"invalid SynthConfig: {'; '.join(problems)}",
                                fix="pass values within the documented ranges")

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON-ready builtins."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthConfig:
        """Rebuild a config from ``as_dict()`` output (unknown keys are refused)."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadInputError(f"unknown SynthConfig keys {sorted(unknown)}")
        return cls(**values)


# name: (minimum, maximum, must be an integer); closed intervals, units as in the field names
_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "duration_s": (1e-3, 86_400.0, False), "num_channels": (1, 4096, True), "num_units": (1, 2000, True),
    "sampling_rate_hz": (1000.0, 100_000.0, False), "noise_level_uv": (0.0, 1000.0, False),
    "num_rois": (1, 1000, True), "imaging_rate_hz": (0.5, 1000.0, False), "seed": (0, 2**32 - 1, True),
    "lsb_uv": (0.01, 100.0, False), "drift_amplitude_um": (1.0, 200.0, False),
    "burst_fraction": (0.0, 1.0, False), "fov_px": (16, 1024, True), "photon_gain_au": (0.0, 1000.0, False),
    "common_noise_uv": (0.0, 1000.0, False), "saturation_events": (0, 100_000, True),
    "saturation_rail_uv": (10.0, 100_000.0, False), "shanks": (1, 16, True),
}


def _out_of_bounds(name: str, value: Any) -> str | None:
    low, high, integer = _BOUNDS[name]
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high:
        return None
    kind, bounds = ("an int", f"[{int(low)}, {int(high)}]") if integer else ("a number", f"[{low:g}, {high:g}]")
    return f"{name} must be {kind} in {bounds}, got {value!r}"


def _range_problem(name: str, value: Any, high: float) -> str | None:
    ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value)
          and 0 < value[0] <= value[1] <= high)
    return None if ok else f"{name} must be (low, high) with 0 < low <= high <= {high:g} Hz, got {value!r}"


def _config_problems(c: SynthConfig) -> list[str]:
    """Every violated constraint of a config, as short sentences (empty when valid)."""
    problems = [_out_of_bounds(name, getattr(c, name)) for name in _BOUNDS]
    problems += [_range_problem("firing_rate_range_hz", c.firing_rate_range_hz, 200.0),
                 _range_problem("roi_rate_range_hz", c.roi_rate_range_hz, 50.0)]
    if any(problems):
        return [p for p in problems if p]
    period_ok = c.drift_period_s is None or (isinstance(c.drift_period_s, (int, float)) and c.drift_period_s > 0)
    checks = [
        (c.ephys or c.ophys, "at least one of ephys and ophys must be True"),
        (not c.drift or c.ephys, "drift=True needs ephys=True"),
        (not c.drift or c.duration_s >= 2.0, f"drift needs duration_s >= 2 s, got {c.duration_s}"),
        (c.drift_mode in DRIFT_MODES, f"drift_mode must be one of {sorted(DRIFT_MODES)}, got {c.drift_mode!r}"),
        (period_ok, f"drift_period_s must be > 0 s or None, got {c.drift_period_s!r}"),
        (c.indicator in INDICATORS, f"indicator must be one of {sorted(INDICATORS)}, got {c.indicator!r}"),
        (not c.ophys or c.duration_s * c.imaging_rate_hz >= 2, "ophys needs duration_s * imaging_rate_hz >= 2"),
        (all(isinstance(a, str) and a.strip() for a in (c.brain_area, c.imaging_area)),
         "brain_area and imaging_area must be non-empty strings (Allen CCF terms)"),
        (all(0 <= ch < c.num_channels for ch in (*c.dead_channels, *c.noisy_channels)),
         f"dead_channels and noisy_channels must lie in [0, {c.num_channels})"),
        (c.num_channels % (2 * c.shanks) == 0 or c.shanks == 1,
         f"num_channels must split into {c.shanks} shanks of an even count, got {c.num_channels}"),
        (isinstance(c.outside_channels, int) and 0 <= c.outside_channels < c.num_channels,
         f"outside_channels must be a whole number in [0, {c.num_channels}), got {c.outside_channels!r}"),
    ]
    return [message for ok, message in checks if not ok]


def _stream_seed(seed: int, stream: str) -> int:
    """An independent, reproducible seed for one named random stream."""
    state = np.random.SeedSequence([seed, zlib.crc32(stream.encode())]).generate_state(1)
    return int(state[0])


def session_identifier(config: SynthConfig) -> str:
    """A UUID derived from the whole config (seed included): same config, same identifier."""
    canonical = json.dumps(config.as_dict(), sort_keys=True)
    return str(uuid.uuid5(_UUID_NAMESPACE, canonical))
