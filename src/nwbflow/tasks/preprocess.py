"""Prefect task of the preprocess stage: the raw series -> the preprocessed binary and its record."""

from __future__ import annotations

import numpy as np
from prefect import task

from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.ephys.recording import TIMESTAMPS_FILE, SessionClock, copy_timestamps
from nwbflow.nwb_io.read import open_session
from nwbflow.params import PreprocessParams
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

PREPROCESSED = "preprocessed.bin"


@task(name="preprocess", **STAGE_TASK)
def preprocess_task(spec: StageSpec, params: PreprocessParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """Offset, median CAR, zero-phase band-pass, whitening -> float16/float32 binary + ``recording.json``."""
    with StageRun(spec) as run, open_session(spec.nwb_path, decode_threads=spec.policy.cpu_threads()) as session:
        series = session.select_ephys(spec.series)
        clock = SessionClock(series.sampling_rate_hz, series.starting_time_s,
                             copy_timestamps(series.timestamps_s, run.directory / TIMESTAMPS_FILE)
                             if series.has_timestamps else None)
        recording = preprocess_to_binary(series, params, run.directory / PREPROCESSED,
                                         chunk_duration_s=spec.policy.chunks.preprocess_s, seed=spec.policy.seed,
                                         progress=run.progress(series.num_samples), device=run.device,
                                         channel_positions_um=series.channel_positions_um,
                                         sample_shifts=series.inter_sample_shift, clock=clock)
        record = recording.save(run.directory)
        duration_s = recording.num_samples / recording.sampling_rate_hz
        summary = {"channels": recording.num_channels, "sampling_rate_hz": recording.sampling_rate_hz,
                   "recording_s": round(duration_s, 3), "adc_phase_shift": recording.phase_shifted,
                   "bad_channels": len(recording.bad_channels),
                   "saturated_periods": len(recording.saturated_periods)}
        return run.finish({"preprocessed": recording.binary_path, "recording": record}, summary,
                          recording_s=duration_s, notes=_notes(recording))


def _notes(recording) -> tuple[str, ...]:
    """What preprocess found in the data and acted on, for the provenance row (channel indices: data columns)."""
    notes = [f"bad channels, {label}: {channels}" for label, channels in recording.bad_channel_labels.items()
             if channels]
    if recording.phase_shifted:
        notes.append("ADC sample shifts (electrodes inter_sample_shift) undone before the common reference")
    if recording.shank_ids:
        notes.append(f"{len(set(recording.shank_ids))} shanks (electrodes shank or group): motion estimated per "
                     "shank; no template or unit's electrodes span two")
    if recording.saturated_periods:
        notes.append(_saturation_note(recording))
    return tuple(notes)


#: Saturated periods named one by one in the provenance note (all of them are in ``recording.json``).
NOTED_PERIODS = 50


def _saturation_note(recording) -> str:
    periods = np.asarray(recording.saturated_periods, np.int64)
    rate = recording.sampling_rate_hz
    bounds = recording.clock.times_s(periods[:NOTED_PERIODS] - [0, 1])  # first and last sample zeroed
    seconds = ", ".join(f"[{a:.4f}, {b:.4f}]" for a, b in bounds)
    more = f" and {len(periods) - NOTED_PERIODS} more" if len(periods) > NOTED_PERIODS else ""
    return (f"saturated or artifact periods zeroed after preprocessing: {len(periods)}, "
            f"{np.sum(periods[:, 1] - periods[:, 0]) / rate:.3f} s in all; session times (s) {seconds}{more}")
