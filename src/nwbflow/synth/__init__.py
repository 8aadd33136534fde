"""Seeded synthetic NWB sessions with ground truth kept in sidecar files.

One call writes an NWB file holding a Neuropixels-like extracellular recording
and/or a two-photon ROI fluorescence recording, plus the ground truth that
produced them, *next to* the file (never inside it):

``OUT.nwb``
    the session, with DANDI-ready metadata and no ground truth inside.
``OUT.groundtruth.json``
    config, seed, NWB identifier and object paths, units (location µm, best
    channel, trough µV, rate), per-ROI indicator parameters, drift description.
``OUT.groundtruth_ephys.parquet``
    one row per spike: unit_id (int64, 0..num_units-1), sample_index (int64),
    time_s (float64, = sample_index / sampling_rate_hz).
``OUT.groundtruth_ophys.parquet``
    one row per spike: roi_index (int64, PlaneSegmentation row), time_s (float64).
``OUT.groundtruth_drift.npz`` (drift=True only)
    time_bins_s (T,), depth_bins_um (D,), displacement_um (T, D).

Ephys comes from SpikeInterface's ground-truth generators
(``generate_ground_truth_recording`` when static, ``generate_drifting_recording``
when ``drift=True``) and is streamed into ``acquisition/ElectricalSeries`` as
int16 with ``conversion = lsb_uv * 1e-6`` V/bit, chunk by chunk, so memory does
not grow with duration (static noise: independent Gaussian per channel; drifting:
spatially correlated, exp(-distance / 25 µm)). Ophys is simulated here: Poisson (+burst) spike trains
-> double-exponential indicator kinetics -> saturation -> baseline F0, bleaching
and slow drift, neuropil, shot and read noise. The fluorescence is computed on a
fine grid (<= 1 ms) and **integrated over each frame's exposure**: frame ``k``
is the mean over ``[k / rate, (k + 1) / rate)`` s and its NWB time is ``k / rate``.

Drift sign follows SpikeInterface ``Motion``: a unit at depth ``y`` appears at
``y + displacement_um(t)``.

Examples
--------
>>> from nwbflow.synth import ground_truth_paths
>>> ground_truth_paths("session.nwb").metadata.name
'session.groundtruth.json'

Modules: ``config`` (SynthConfig and its checks), ``ephys`` (probe, recording,
int16 streaming, electrodes), ``ophys`` (calcium model, imaging objects),
``groundtruth`` (sidecar names, writing and reading), ``session`` (the NWB file
and ``write_synthetic_session``).
"""

from nwbflow.synth.config import DRIFT_MODES, INDICATORS, IndicatorKinetics, SynthConfig, session_identifier
from nwbflow.synth.ephys import (
    ELECTRICAL_SERIES_PATH,
    ELECTRODES_PATH,
    ROW_PITCH_UM,
    DriftTruth,
    SynthRecording,
    make_ephys_recording,
    make_probe,
    traces_iterator,
)
from nwbflow.synth.groundtruth import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    GroundTruth,
    GroundTruthPaths,
    ground_truth_paths,
    load_ground_truth,
)
from nwbflow.synth.ophys import (
    PLANE_SEGMENTATION_PATH,
    ROI_RESPONSE_SERIES_PATH,
    OphysTruth,
    indicator_dff,
    simulate_ophys,
)
from nwbflow.synth.session import write_synthetic_session

__all__ = [
    "DRIFT_MODES",
    "ELECTRICAL_SERIES_PATH",
    "ELECTRODES_PATH",
    "INDICATORS",
    "PLANE_SEGMENTATION_PATH",
    "ROI_RESPONSE_SERIES_PATH",
    "ROW_PITCH_UM",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "DriftTruth",
    "GroundTruth",
    "GroundTruthPaths",
    "IndicatorKinetics",
    "OphysTruth",
    "SynthConfig",
    "SynthRecording",
    "ground_truth_paths",
    "indicator_dff",
    "load_ground_truth",
    "make_ephys_recording",
    "make_probe",
    "session_identifier",
    "simulate_ophys",
    "traces_iterator",
    "write_synthetic_session",
]
