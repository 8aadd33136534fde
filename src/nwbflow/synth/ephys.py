"""Synthetic extracellular ephys: NP1.0-like probe, ground-truth recording, int16 streaming, electrodes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from nwbflow.synth._nwb import _create_device, _data_io
from nwbflow.synth.config import DRIFT_MODES, SynthConfig, _stream_seed

logger = logging.getLogger(__name__)

ELECTRICAL_SERIES_PATH = "acquisition/ElectricalSeries"
ELECTRODES_PATH = "general/extracellular_ephys/electrodes"
ROW_PITCH_UM = 20.0
_NP1_COLUMNS_X_UM = ((43.0, 11.0), (59.0, 27.0))  # (even rows, odd rows), as NP1.0
_MS_BEFORE, _MS_AFTER = 1.5, 3.0
_UNIT_LOCATION_KWARGS = dict(margin_um=20.0, minimum_z=5.0, maximum_z=45.0, minimum_distance=18.0,
                             max_iteration=100, distance_strict=False)


@dataclass(frozen=True, eq=False)
class DriftTruth:
    """Ground-truth probe motion, SpikeInterface ``Motion`` layout (rigid, vertical).

    Attributes
    ----------
    time_bins_s : (T,) bin centres (s); bin i spans [i / f, (i + 1) / f).
    depth_bins_um : (D,) depth bin centres (µm), the probe's row depths.
    displacement_um : (T, D) displacement (µm); a unit at y appears at y + displacement.
    """

    time_bins_s: np.ndarray
    depth_bins_um: np.ndarray
    displacement_um: np.ndarray


@dataclass(frozen=True, eq=False)
class SynthRecording:
    """A lazy SpikeInterface ground-truth recording and what made it.

    Attributes
    ----------
    recording : traces in µV (float32; raw traces are already µV).
    sorting : the ground-truth spike trains.
    probe : probeinterface Probe, positions (num_channels, 2) in µm.
    unit_locations_um : (num_units, 3) x, y, z (µm).
    templates_uv : (num_units, num_samples, num_channels) templates at zero drift (µV).
    drift : the imposed motion, or None.
    """

    recording: Any
    sorting: Any
    probe: Any
    unit_locations_um: np.ndarray
    templates_uv: np.ndarray
    drift: DriftTruth | None


#: Neuropixels 2.0 four-shank layout: shank pitch, the two columns' x on a shank, row pitch (µm).
NP2_SHANK_PITCH_UM, NP2_COLUMNS_X_UM, NP2_ROW_PITCH_UM = 250.0, (0.0, 32.0), 15.0


def make_probe(num_channels: int, shanks: int = 1):
    """A Neuropixels-1.0-like shank (2 contacts per row alternating between column pairs), or with ``shanks`` > 1
    a Neuropixels-2.0-like multi-shank probe (channels split evenly, shank by shank).

    Parameters
    ----------
    num_channels : contacts; one shank: rows 20 µm apart, x in {11, 27, 43, 59} µm; several: per shank two
        columns (x = 0 and 32 µm from the shank's edge), rows 15 µm apart, shanks 250 µm apart.
    shanks : 1, or a number of shanks dividing ``num_channels`` into an even count each.

    Returns
    -------
    probeinterface.Probe with 12 µm square contacts, device indices 0..n-1 and shank ids "0", "1", ...
    """
    from probeinterface import Probe

    index = np.arange(num_channels)
    if shanks == 1:
        row = index // 2
        x = np.array([_NP1_COLUMNS_X_UM[r % 2][i % 2] for r, i in zip(row, index)])
        positions = np.column_stack([x, row * ROW_PITCH_UM])
        shank = np.zeros(num_channels, np.int64)
    else:
        per_shank = num_channels // shanks
        shank, within = index // per_shank, index % per_shank
        x = shank * NP2_SHANK_PITCH_UM + np.asarray(NP2_COLUMNS_X_UM)[within % 2]
        positions = np.column_stack([x, (within // 2) * NP2_ROW_PITCH_UM])
    probe = Probe(ndim=2, si_units="um", name="NP1-like" if shanks == 1 else "NP2-4shank-like",
                  manufacturer="nwbflow-synthetic")
    probe.set_contacts(positions=positions, shapes="square", shape_params={"width": 12.0},
                       shank_ids=shank.astype(str))
    probe.create_auto_shape(probe_type="tip")
    probe.set_device_channel_indices(index)
    return probe


def _draw_sorting(config: SynthConfig):
    from spikeinterface.core import generate_sorting

    rng = np.random.default_rng(_stream_seed(config.seed, "firing_rates"))
    low, high = config.firing_rate_range_hz
    rates = np.exp(rng.uniform(np.log(low), np.log(high), config.num_units))
    return generate_sorting(num_units=config.num_units, sampling_frequency=config.sampling_rate_hz,
                            durations=[config.duration_s], firing_rates=rates, refractory_period_ms=2.0,
                            seed=_stream_seed(config.seed, "spikes"))


def make_ephys_recording(config: SynthConfig) -> SynthRecording:
    """Build the (lazy) ground-truth recording of ``config``; nothing is computed per sample yet."""
    from spikeinterface.core import generate_ground_truth_recording

    probe, sorting = make_probe(config.num_channels, config.shanks), _draw_sorting(config)
    seed = _stream_seed(config.seed, "ephys")
    if config.drift or config.shanks > 1:  # the drifting generator takes unit locations: on the shanks
        return _make_drifting(config, probe, sorting, seed)
    recording, sorting = generate_ground_truth_recording(
        durations=[config.duration_s], sampling_frequency=config.sampling_rate_hz, sorting=sorting,
        probe=probe, ms_before=_MS_BEFORE, ms_after=_MS_AFTER,
        noise_kwargs=dict(noise_levels=config.noise_level_uv, strategy="on_the_fly"),
        generate_unit_locations_kwargs=dict(_UNIT_LOCATION_KWARGS), seed=seed)
    return SynthRecording(recording=recording, sorting=sorting, probe=probe,
                          unit_locations_um=np.asarray(sorting.get_property("gt_unit_locations"), float),
                          templates_uv=np.asarray(recording.templates, np.float32), drift=None)


def _shank_unit_locations(config: SynthConfig, probe, seed: int) -> np.ndarray | None:
    """(num_units, 3) µm: unit ``i`` beside shank ``i % shanks`` (SpikeInterface's ``generate_unit_locations``
    over that shank's contacts), so that a multi-shank probe records every unit; None for one shank."""
    if config.shanks == 1:
        return None
    from spikeinterface.core.generate import generate_unit_locations

    shank_of = np.asarray(probe.shank_ids).astype(int)
    locations = np.zeros((config.num_units, 3))
    for shank in range(config.shanks):
        units = np.arange(shank, config.num_units, config.shanks)
        if len(units):
            locations[units] = generate_unit_locations(len(units), probe.contact_positions[shank_of == shank],
                                                       seed=seed + shank, **_UNIT_LOCATION_KWARGS)
    return locations


def _make_drifting(config: SynthConfig, probe, sorting, seed: int) -> SynthRecording:
    """The drifting generator's recording (``config.drift``), or its static one (no drift: a multi-shank probe)."""
    from spikeinterface.generation import generate_drifting_recording

    half = config.drift_amplitude_um / 2.0 if config.drift else 0.0
    period = config.drift_period_s or config.duration_s / 2.0
    motion = dict(drift_mode=DRIFT_MODES[config.drift_mode], non_rigid_gradient=None, t_start_drift=0.0,
                  t_end_drift=None, period_s=period,
                  bump_interval_s=(config.duration_s / 6.0, config.duration_s / 3.0))
    _, recording, sorting, extra = generate_drifting_recording(
        duration=config.duration_s, sampling_frequency=config.sampling_rate_hz, probe=probe,
        sorting=sorting, unit_locations=_shank_unit_locations(config, probe, seed),
        generate_unit_locations_kwargs=dict(_UNIT_LOCATION_KWARGS),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0.0, half], drift_stop_um=[0.0, -half],
            drift_step_um=1.0, motion_list=[motion]),
        generate_templates_kwargs=dict(ms_before=_MS_BEFORE, ms_after=_MS_AFTER, mode="ellipsoid",
                                       unit_params=dict(alpha=(100.0, 500.0), spatial_decay=(10, 45),
                                                        ellipse_shrink=(0.4, 1), ellipse_angle=(0, 2 * np.pi))),
        generate_noise_kwargs=dict(noise_levels=config.noise_level_uv, spatial_decay=25.0),
        extra_outputs=True, seed=seed)
    vertical = np.asarray(extra["displacement_vectors"])[:, 1, :].sum(axis=1)  # (T,) µm, rigid
    rate = float(extra["displacement_sampling_frequency"])
    depths = np.unique(probe.contact_positions[:, 1]).astype(float)
    drift = DriftTruth(time_bins_s=(np.arange(vertical.size) + 0.5) / rate, depth_bins_um=depths,
                       displacement_um=np.repeat(vertical[:, None], depths.size, axis=1).astype(float))
    return SynthRecording(recording=recording, sorting=sorting, probe=probe,
                          unit_locations_um=np.asarray(extra["unit_locations"], float),
                          templates_uv=np.asarray(extra["templates"].templates_array, np.float32),
                          drift=drift if config.drift else None)


def _int16_iterator_class():
    """Defined lazily so importing this module does not import hdmf."""
    from hdmf.data_utils import GenericDataChunkIterator

    class Int16TraceIterator(GenericDataChunkIterator):
        """Streams ``recording.get_traces`` (µV) as int16 counts of ``lsb_uv``, clipped to int16."""

        def __init__(self, recording, lsb_uv: float, alter=None, **kwargs):
            self._recording, self._lsb_uv, self._alter, self.num_clipped = recording, float(lsb_uv), alter, 0
            super().__init__(**kwargs)

        def _get_data(self, selection: tuple[slice, ...]) -> np.ndarray:
            rows, cols = selection
            traces = self._recording.get_traces(start_frame=rows.start, end_frame=rows.stop)
            if self._alter is not None:
                traces = self._alter(rows.start, rows.stop, traces)
            traces = traces[:, cols]
            counts = np.rint(traces.astype(np.float32) / np.float32(self._lsb_uv))
            limit = np.iinfo(np.int16).max
            clipped = int(np.count_nonzero(np.abs(counts) > limit))
            if clipped:
                self.num_clipped += clipped
                logger.warning("clipped %d samples to int16 in frames [%d, %d)", clipped, rows.start, rows.stop)
            return np.clip(counts, -limit, limit).astype(np.int16)

        def _get_maxshape(self) -> tuple[int, int]:
            return (int(self._recording.get_num_samples()), int(self._recording.get_num_channels()))

        def _get_dtype(self) -> np.dtype:
            return np.dtype(np.int16)

    return Int16TraceIterator


def traces_iterator(recording, lsb_uv: float, buffer_mb: float = 32.0, alter=None):
    """A bounded-memory int16 chunk iterator over ``recording`` (HDF5 chunks <= ~2 MB, buffer ~buffer_mb).

    Parameters
    ----------
    recording : SpikeInterface recording whose raw traces are µV.
    lsb_uv : µV per int16 count.
    buffer_mb : int16 megabytes pulled from the recording per step (all channels).
    alter : callable, optional
        ``alter(start, stop, traces)`` -> traces: what the probe does to samples ``[start, stop)`` (µV, all
        channels) before they are stored (:func:`probe_effects`).
    """
    num_samples, num_channels = recording.get_num_samples(), recording.get_num_channels()
    chunk_channels = min(num_channels, 64)
    chunk_frames = int(min(num_samples, max(1024, 2**20 // chunk_channels)))
    per_chunk_row = chunk_frames * num_channels * 2
    buffer_frames = int(min(num_samples, chunk_frames * max(1, int(buffer_mb * 2**20 // per_chunk_row))))
    return _int16_iterator_class()(recording, lsb_uv, alter, chunk_shape=(chunk_frames, chunk_channels),
                                   buffer_shape=(buffer_frames, num_channels))


#: Sinusoids in the synthetic common-mode signal, and their band (Hz).
COMMON_MODE_TONES, COMMON_MODE_BAND_HZ = 12, (300.0, 6000.0)


def common_mode(config: SynthConfig, shifts: np.ndarray):
    """``f(start, stop)`` -> (stop - start, num_channels) µV: a seeded sum of ``COMMON_MODE_TONES`` sinusoids of RMS
    ``config.common_noise_uv``, channel ``c`` sampled at ``(n + shifts[c]) / rate`` (shifts in samples)."""
    rng = np.random.default_rng([config.seed, 7])
    frequencies = np.exp(rng.uniform(*np.log(COMMON_MODE_BAND_HZ), COMMON_MODE_TONES))
    phases = rng.uniform(0, 2 * np.pi, COMMON_MODE_TONES)
    amplitude = config.common_noise_uv * np.sqrt(2.0 / COMMON_MODE_TONES)  # RMS of the sum = common_noise_uv
    shifts = np.asarray(shifts, np.float64)

    def signal(start: int, stop: int) -> np.ndarray:
        times_s = (np.arange(start, stop)[:, None] + shifts[None, :]) / config.sampling_rate_hz
        out = np.zeros(times_s.shape)
        for frequency, phase in zip(frequencies, phases):
            out += np.sin(2 * np.pi * frequency * times_s + phase)
        return (amplitude * out).astype(np.float32)

    return signal


def outside_channel_indices(config: SynthConfig, positions_um: np.ndarray) -> np.ndarray:
    """The ``config.outside_channels`` contacts at the top of the probe (largest y, then x), ascending."""
    order = np.lexsort((positions_um[:, 0], positions_um[:, 1]))
    return np.sort(order[len(order) - config.outside_channels:]) if config.outside_channels else order[:0]


#: Synthetic saturation events: duration range (ms), peak of the artifact before clipping (µV), its rise (ms).
SATURATION_MS, SATURATION_PEAK_UV, SATURATION_RISE_MS = (2.0, 20.0), 4000.0, 0.5


def saturation_periods(config: SynthConfig) -> np.ndarray:
    """The ``config.saturation_events`` artifacts' ``[start, end)`` samples, (k, 2) int64, sorted, seeded, apart
    by at least 50 ms and 50 ms from either end (fewer where the recording is too short for them)."""
    rate, total = config.sampling_rate_hz, int(round(config.duration_s * config.sampling_rate_hz))
    rng = np.random.default_rng([config.seed, 13])
    lengths = np.rint(rng.uniform(*SATURATION_MS, config.saturation_events) * rate / 1000).astype(np.int64)
    gap = int(0.05 * rate)
    slots = max((total - gap) // (int(SATURATION_MS[1] * rate / 1000) + gap), 0)
    starts = np.sort(rng.choice(slots, min(slots, config.saturation_events), replace=False))
    starts = gap + starts * (int(SATURATION_MS[1] * rate / 1000) + gap)
    return np.stack([starts, starts + lengths[:len(starts)]], axis=1).astype(np.int64).reshape(-1, 2)


def _saturation(config: SynthConfig):
    """``f(start, stop, traces)``: the artifacts of :func:`saturation_periods` added (each channel its own gain,
    0.7-1.3, a random sign per event, raised-cosine edges) and every sample clipped at the rails."""
    periods = saturation_periods(config)
    rng = np.random.default_rng([config.seed, 17])
    gains = rng.uniform(0.7, 1.3, (len(periods), config.num_channels)).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], len(periods)).astype(np.float32)
    rise = max(int(SATURATION_RISE_MS * config.sampling_rate_hz / 1000), 1)
    rail = np.float32(config.saturation_rail_uv)

    def apply(start: int, stop: int, traces: np.ndarray) -> np.ndarray:
        for (first, last), gain, sign in zip(periods, gains, signs):
            if last <= start or first >= stop:
                continue
            t = np.arange(max(first, start), min(last, stop))
            edge = np.minimum(np.minimum(t - first, last - 1 - t) / rise, 1.0)
            shape = (0.5 - 0.5 * np.cos(np.pi * edge)).astype(np.float32) * sign * SATURATION_PEAK_UV
            traces[t - start] += shape[:, None] * gain[None, :]
        return np.clip(traces, -rail, rail, out=traces)

    return apply


def probe_effects(config: SynthConfig, shifts: np.ndarray, positions_um: np.ndarray):
    """``alter(start, stop, traces)``: the common-mode signal on the channels in the brain, then the dead,
    noisy and outside channels of ``config`` (their noise seeded by ``config.seed`` and ``start``), then the
    saturation events and the rails; None when the config asks for none of these."""
    outside = outside_channel_indices(config, positions_um)
    if not (config.common_noise_uv or config.dead_channels or config.noisy_channels or outside.size
            or config.saturation_events):
        return None
    saturate = _saturation(config) if config.saturation_events else None
    common = common_mode(config, shifts) if config.common_noise_uv > 0 else None
    in_brain = np.ones(config.num_channels, bool)
    in_brain[outside] = False

    def alter(start: int, stop: int, traces: np.ndarray) -> np.ndarray:
        traces = np.array(traces, dtype=np.float32)
        rng = np.random.default_rng([config.seed, 11, start])
        if common is not None:
            traces[:, in_brain] += common(start, stop)[:, in_brain]
        for channels, sd_uv in ((outside, config.noise_level_uv), (list(config.dead_channels), 1.0)):
            if len(channels):
                traces[:, channels] = rng.normal(0.0, sd_uv, (stop - start, len(channels)))
        if config.noisy_channels:
            traces[:, list(config.noisy_channels)] += rng.normal(0.0, 4 * config.noise_level_uv,
                                                                 (stop - start, len(config.noisy_channels)))
        return traces if saturate is None else saturate(start, stop, traces)

    return alter


def _add_ephys(nwbfile, synth: SynthRecording, config: SynthConfig):
    """Device, ElectrodeGroup, electrodes (rel_x/rel_y µm) and a streamed int16 ElectricalSeries."""
    from pynwb.ecephys import ElectricalSeries

    device = _create_device(nwbfile, "Probe", "Simulated Neuropixels-1.0-like silicon probe "
                                              "(SpikeInterface ground-truth generator).")
    if config.shanks == 1:
        groups = [nwbfile.create_electrode_group(
            name="probe0", device=device, location=config.brain_area,
            description="Single shank, 4 staggered columns (x = 11, 27, 43, 59 µm), 20 µm row pitch, "
                        "12 µm square contacts; rel_x/rel_y in µm.")]
    else:  # one group per shank and a shank_ids column, as NeuroConv writes a multi-shank probe
        groups = [nwbfile.create_electrode_group(
            name=f"probe0shank{k}", device=device, location=config.brain_area,
            description=f"Shank {k} of {config.shanks} ({NP2_SHANK_PITCH_UM:g} µm apart), 2 columns 32 µm apart, "
                        f"15 µm row pitch, 12 µm square contacts; rel_x/rel_y in µm (x from shank 0's edge).")
            for k in range(config.shanks)]
        nwbfile.add_electrode_column(name="shank_ids", description="Shank of each contact.")
    from nwbflow.ephys.phase_shift import neuropixels_1_shifts
    from nwbflow.nwb_io._series import SAMPLE_SHIFT_COLUMN

    nwbfile.add_electrode_column(name="channel_name", description="Channel id in the recording.")
    shifts = neuropixels_1_shifts(config.num_channels) if config.adc_shifts else np.zeros(config.num_channels)
    extra = {}
    if config.adc_shifts:
        nwbfile.add_electrode_column(name=SAMPLE_SHIFT_COLUMN, description="Time-delay of each channel's sampling "
                                     "as a fraction of the sample period (Neuropixels 1.0 ADC pattern).")
    shank_of = np.asarray(synth.probe.shank_ids).astype(int) if config.shanks > 1 else np.zeros(len(shifts), int)
    for index, (x_um, y_um) in enumerate(synth.probe.contact_positions):
        if config.adc_shifts:
            extra[SAMPLE_SHIFT_COLUMN] = float(shifts[index])
        if config.shanks > 1:
            extra["shank_ids"] = str(shank_of[index])
        nwbfile.add_electrode(group=groups[shank_of[index]], location=config.brain_area, rel_x=float(x_um),
                              rel_y=float(y_um), channel_name=str(index), **extra)
    region = nwbfile.create_electrode_table_region(region=list(range(config.num_channels)),
                                                   description="All probe contacts.")
    recording = synth.recording
    if config.adc_shifts:  # channel c's sample n taken at (n + shift_c) / rate: an advance of shift_c samples
        from spikeinterface.preprocessing import phase_shift

        recording = phase_shift(recording, inter_sample_shift=-shifts)
    alter = probe_effects(config, shifts, np.asarray(synth.probe.contact_positions, np.float64))
    iterator = traces_iterator(recording, config.lsb_uv, alter=alter)
    series = ElectricalSeries(
        name="ElectricalSeries", data=_data_io(iterator, config), electrodes=region,
        starting_time=0.0, rate=float(config.sampling_rate_hz), conversion=config.lsb_uv * 1e-6, offset=0.0,
        filtering="None: synthetic wideband (noise plus spike templates), no filter applied.",
        description=f"Synthetic extracellular voltage, int16 counts of {config.lsb_uv} µV "
                    f"({'drifting' if config.drift else 'static'} probe).")
    nwbfile.add_acquisition(series)
    return iterator
