"""Synthetic sessions: reproducible, valid NWB, and ground truth that matches the data."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import h5py
import numpy as np
import pytest

from nwbflow.errors import BadInputError
from nwbflow.synth import (
    ELECTRICAL_SERIES_PATH,
    INDICATORS,
    PLANE_SEGMENTATION_PATH,
    ROI_RESPONSE_SERIES_PATH,
    SynthConfig,
    ground_truth_paths,
    indicator_dff,
    load_ground_truth,
    make_ephys_recording,
    traces_iterator,
    write_synthetic_session,
)

SMALL = SynthConfig(duration_s=8.0, num_channels=32, num_units=8, num_rois=12, seed=7)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One small ephys + ophys session shared by the read-only tests."""
    path = tmp_path_factory.mktemp("synth") / "session.nwb"
    write_synthetic_session(path, SMALL)
    return path


@pytest.fixture(scope="module")
def drift_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("drift") / "drift.nwb"
    config = SynthConfig(duration_s=6.0, num_channels=16, num_units=5, drift=True, ophys=False, seed=3)
    write_synthetic_session(path, config)
    return path


def _arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            "ephys": f[ELECTRICAL_SERIES_PATH]["data"][:],
            "ophys": f[ROI_RESPONSE_SERIES_PATH]["data"][:],
            "masks": f[PLANE_SEGMENTATION_PATH]["image_mask"][:],
            "identifier": np.array(f["identifier"][()]),
        }


def test_same_config_gives_identical_data_and_ground_truth(session, tmp_path):
    again = tmp_path / "again.nwb"
    write_synthetic_session(again, SMALL)
    first, second = _arrays(session), _arrays(again)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    gt1, gt2 = load_ground_truth(session), load_ground_truth(again)
    for field in ("ephys_unit_id", "ephys_sample_index", "ephys_time_s", "unit_locations_um",
                  "ophys_roi_index", "ophys_time_s"):
        np.testing.assert_array_equal(getattr(gt1, field), getattr(gt2, field), err_msg=field)
    meta1, meta2 = (dict(gt.metadata, nwb_file=None) for gt in (gt1, gt2))
    assert meta1 == meta2


def test_another_seed_gives_other_data(session, tmp_path):
    other = tmp_path / "other.nwb"
    write_synthetic_session(other, dataclasses.replace(SMALL, seed=8))
    assert not np.array_equal(_arrays(session)["ephys"], _arrays(other)["ephys"])
    assert _arrays(session)["identifier"] != _arrays(other)["identifier"]


def test_ephys_is_int16_and_matches_the_spikeinterface_traces(session):
    traces_uv = make_ephys_recording(SMALL).recording.get_traces()
    probe_xy = make_ephys_recording(SMALL).probe.contact_positions
    with h5py.File(session, "r") as f:
        series = f[ELECTRICAL_SERIES_PATH]
        data = series["data"]
        assert data.dtype == np.int16 and data.shape == traces_uv.shape
        assert data.chunks is not None and data.compression == "gzip"
        conversion = data.attrs["conversion"]
        assert conversion == pytest.approx(SMALL.lsb_uv * 1e-6) and data.attrs["offset"] == 0.0
        assert series["starting_time"][()] == 0.0
        assert series["starting_time"].attrs["rate"] == SMALL.sampling_rate_hz
        assert "timestamps" not in series
        error_uv = np.abs(data[:].astype(np.float64) * conversion * 1e6 - traces_uv)
        electrodes = f["general/extracellular_ephys/electrodes"]
        xy = np.column_stack([electrodes["rel_x"][:], electrodes["rel_y"][:]])
        locations = {v.decode() for v in electrodes["location"][:]}
    assert error_uv.max() <= SMALL.lsb_uv
    np.testing.assert_allclose(xy, probe_xy)
    assert np.allclose(np.diff(np.unique(xy[:, 1])), 20.0)
    assert locations == {"CA1"}


def test_ground_truth_spikes_line_up_with_the_traces(session):
    gt = load_ground_truth(session)
    units = gt.metadata["ephys"]["units"]
    largest = min(units, key=lambda unit: unit["trough_uv"])
    channel = largest["best_channel_index"]
    with h5py.File(session, "r") as f:
        data = f[ELECTRICAL_SERIES_PATH]["data"]
        trace_uv = data[:, channel].astype(np.float64) * data.attrs["conversion"] * 1e6
    noise_uv = np.median(np.abs(trace_uv - np.median(trace_uv))) / 0.6745
    samples = gt.spike_trains(largest["unit_id"], in_samples=True)
    samples = samples[(samples > 100) & (samples < trace_uv.size - 100)]
    assert samples.size >= 5
    mean_waveform = np.mean([trace_uv[s - 30:s + 30] for s in samples], axis=0)
    assert mean_waveform.min() < -3.0 * noise_uv
    assert abs(int(np.argmin(mean_waveform)) - 30) <= 5  # trough within ~0.2 ms of the GT time
    np.testing.assert_allclose(gt.ephys_time_s, gt.ephys_sample_index / SMALL.sampling_rate_hz)


def test_ophys_rises_after_ground_truth_spikes(session):
    gt = load_ground_truth(session)
    with h5py.File(session, "r") as f:
        series = f[ROI_RESPONSE_SERIES_PATH]
        fluorescence = series["data"][:]
        assert fluorescence.dtype == np.float32 and series["data"].attrs["unit"] == "a.u."
        assert series["starting_time"].attrs["rate"] == SMALL.imaging_rate_hz
    assert fluorescence.shape == (int(SMALL.duration_s * SMALL.imaging_rate_hz), SMALL.num_rois)
    f0 = np.percentile(fluorescence, 20, axis=0)
    dff = (fluorescence - f0) / f0
    windows = []
    for roi in range(SMALL.num_rois):
        frames = (gt.roi_spike_trains(roi) * SMALL.imaging_rate_hz).astype(int)
        for frame in frames[(frames >= 5) & (frames < dff.shape[0] - 15)]:
            windows.append(dff[frame - 5:frame + 15, roi] - dff[frame - 5:frame, roi].mean())
    triggered = np.mean(windows, axis=0)
    assert len(windows) >= 20
    assert triggered[6:12].mean() > 0.05  # frames 1-6 after the spike: ΔF/F clearly up
    assert triggered[6:12].mean() > 5 * abs(triggered[:5].mean())


def test_indicator_kinetics_rise_after_the_spike_and_saturate():
    dt_s, n = 1e-3, 4000
    for name, kinetics in INDICATORS.items():
        dff = indicator_dff(np.array([1.0]), kinetics.rise_s, kinetics.decay_s, kinetics.dff_per_spike,
                            kinetics.saturation_spikes, dt_s, n)
        assert np.all(dff[:1001] == 0.0), name
        assert dff.max() == pytest.approx(kinetics.dff_per_spike, rel=0.02), name
    slow = indicator_dff(np.array([0.0]), 0.18, 1.2, 0.2, 8.0, dt_s, n)
    fast = indicator_dff(np.array([0.0]), 0.05, 0.4, 0.2, 8.0, dt_s, n)
    assert slow[1500] > fast[1500]
    many = indicator_dff(np.zeros(40), 0.05, 0.4, 0.2, 8.0, dt_s, n)
    assert 0.2 * 5 < many.max() < 0.5 * 0.2 * 40  # 40 coincident spikes: well below 40x one spike


def _inspector_problems(path) -> list[str]:
    from nwbinspector import Importance, inspect_nwbfile

    blocking = {Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION}
    return [f"{m.importance.name} {m.check_function_name}: {m.message}"
            for m in inspect_nwbfile(nwbfile_path=path) if m.importance in blocking]


@pytest.mark.parametrize("which", ["session", "drift_session"])
def test_file_passes_pynwb_validation_and_nwbinspector(which, request):
    import pynwb

    path = request.getfixturevalue(which)
    assert list(pynwb.validate(path=str(path))) == []
    assert _inspector_problems(path) == []


def test_dandi_metadata_is_complete(session):
    import pynwb

    with pynwb.NWBHDF5IO(str(session), mode="r") as io:
        nwbfile = io.read()
        subject = nwbfile.subject
        assert subject.species == "Mus musculus" and subject.sex in {"M", "F", "U", "O"}
        assert subject.age == "P90D" and subject.subject_id and subject.description
        assert isinstance(nwbfile.session_start_time, datetime)
        assert nwbfile.session_start_time.tzinfo is not None
        assert nwbfile.identifier == load_ground_truth(session).metadata["nwb_identifier"]
        assert nwbfile.session_id and nwbfile.experimenter and nwbfile.lab and nwbfile.institution
        assert len(nwbfile.keywords[:]) >= 2 and nwbfile.experiment_description
        assert nwbfile.units is None  # ground truth lives in sidecars only
        assert nwbfile.imaging_planes["ImagingPlane"].indicator == SMALL.indicator


def test_drift_is_non_trivial_and_recorded(drift_session):
    gt = load_ground_truth(drift_session)
    displacement = gt.drift_displacement_um
    assert displacement.shape == (gt.drift_time_bins_s.size, gt.drift_depth_bins_um.size)
    assert np.ptp(displacement) > 10.0
    assert gt.drift_time_bins_s.min() >= 0 and gt.drift_time_bins_s.max() < gt.config.duration_s
    meta = gt.metadata["drift"]
    assert meta["mode"] == "zigzag" and meta["peak_to_peak_um"] == pytest.approx(np.ptp(displacement))
    assert gt.paths.drift is not None and gt.paths.drift.is_file()
    assert gt.ophys_roi_index is None and gt.paths.ophys_spikes is None


def test_sidecar_names_and_no_leftovers(session):
    paths = ground_truth_paths(session)
    assert paths.metadata.name == "session.groundtruth.json"
    assert paths.ephys_spikes.name == "session.groundtruth_ephys.parquet"
    assert paths.ophys_spikes.name == "session.groundtruth_ophys.parquet"
    assert paths.drift.name == "session.groundtruth_drift.npz"
    assert not paths.drift.exists()
    assert not list(session.parent.glob(".*partial"))
    meta = json.loads(paths.metadata.read_text())
    assert meta["ephys"]["electrical_series_path"] == ELECTRICAL_SERIES_PATH
    assert meta["ophys"]["roi_response_series_path"] == ROI_RESPONSE_SERIES_PATH
    assert len(meta["ophys"]["rois"]) == SMALL.num_rois and meta["config"]["seed"] == SMALL.seed


def test_ground_truth_as_spikeinterface_sorting(session):
    gt = load_ground_truth(session)
    sorting = gt.to_sorting()
    assert sorting.get_num_units() == SMALL.num_units
    for unit_id in sorting.unit_ids:
        np.testing.assert_array_equal(sorting.get_unit_spike_train(unit_id),
                                      gt.spike_trains(unit_id, in_samples=True))
    assert gt.config == SMALL


def test_single_modality_sessions(tmp_path):
    config = SynthConfig(duration_s=3.0, ephys=False, num_rois=4, seed=1)
    written = write_synthetic_session(tmp_path / "ophys.nwb", config)
    assert written.ephys_spikes is None and written.drift is None and written.ophys_spikes.is_file()
    gt = load_ground_truth(tmp_path / "ophys.nwb")
    with pytest.raises(BadInputError, match="no ephys"):
        gt.to_sorting()


@pytest.mark.parametrize("changes", [
    dict(num_channels=0), dict(duration_s=0.0), dict(duration_s=-1.0), dict(num_units=0),
    dict(sampling_rate_hz=10.0), dict(noise_level_uv=-1.0), dict(seed=-1), dict(indicator="GFP"),
    dict(ephys=False, ophys=False), dict(drift=True, ephys=False), dict(drift_mode="sine"),
    dict(num_channels=2.5), dict(num_channels=2.0), dict(duration_s="10"), dict(firing_rate_range_hz=(5.0, 1.0)), dict(fov_px=8),
])
def test_bad_config_is_refused(changes):
    with pytest.raises(BadInputError):
        SynthConfig(**changes)


def test_bad_targets_are_refused(session, tmp_path):
    with pytest.raises(BadInputError, match="exists"):
        write_synthetic_session(session, SMALL)
    with pytest.raises(BadInputError, match=".nwb"):
        write_synthetic_session(tmp_path / "session.h5", SMALL)
    with pytest.raises(BadInputError, match="ground truth"):
        load_ground_truth(tmp_path / "none.nwb")


def test_streaming_buffer_is_bounded_for_long_wide_sessions():
    long_wide = SynthConfig(duration_s=600.0, num_channels=384, num_units=10, ophys=False)
    recording = make_ephys_recording(long_wide).recording  # lazy: nothing sampled yet
    iterator = traces_iterator(recording, long_wide.lsb_uv)
    assert iterator.maxshape == (18_000_000, 384)
    assert np.prod(iterator.buffer_shape) * 4 <= 64 * 2**20  # float32 working set per step
    assert np.prod(iterator.chunk_shape) * 2 <= 4 * 2**20


def test_int16_conversion_clips_instead_of_wrapping():
    from spikeinterface.core import NumpyRecording

    values = np.array([[1e7, -1e7, 0.0, 100.0]], dtype=np.float32).repeat(10, axis=0)
    iterator = traces_iterator(NumpyRecording([values], sampling_frequency=30000.0), lsb_uv=0.195)
    chunk = np.concatenate([c.data for c in iterator])
    assert chunk.dtype == np.int16
    np.testing.assert_array_equal(chunk[0], [32767, -32767, 0, 513])
    assert iterator.num_clipped == 20
