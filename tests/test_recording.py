"""The preprocessed-recording record: written once by preprocess, read by every later ephys stage."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from nwb_writers import write_ephys_file
from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.ephys.recording import PreprocessedRecording, SessionClock, copy_timestamps
from nwbflow.params import PreprocessParams, SessionParams

FS_HZ = 30_000.0


def _traces(num_samples: int = 60_000, num_channels: int = 6, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(num_samples, num_channels)) * 10.0).astype(np.float32)


def test_record_round_trip_keeps_every_fact(tmp_path):
    positions = np.c_[np.zeros(6), np.arange(6) * 20.0]
    clock = SessionClock(FS_HZ, starting_time_s=3.25)
    recording = preprocess_to_binary(ArraySource(_traces(), FS_HZ), PreprocessParams(), tmp_path / "pre.bin",
                                     channel_positions_um=positions, clock=clock)
    assert recording.save(tmp_path) == tmp_path / "recording.json"
    loaded = PreprocessedRecording.load(tmp_path)
    for name in ("binary_path", "dtype", "num_samples", "num_channels", "sampling_rate_hz", "clock", "margin_samples",
                 "bad_channels", "device"):
        assert getattr(loaded, name) == getattr(recording, name), name
    for name in ("channel_positions_um", "whitening", "whitening_inverse", "offsets_uv"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(recording, name), err_msg=name)
    np.testing.assert_allclose(loaded.whitening_inverse @ loaded.whitening, np.eye(6), atol=1e-9)
    np.testing.assert_array_equal(loaded.open().get_traces(100, 200), recording.open().get_traces(100, 200))
    assert loaded.clock.times_s(np.array([0, 30_000])).tolist() == [3.25, 4.25]


def test_a_timestamped_clock_is_copied_and_found_from_another_folder(tmp_path):
    timestamps = 12.5 + np.arange(5_000) / FS_HZ + np.random.default_rng(1).uniform(-1e-7, 1e-7, 5_000)
    (tmp_path / "pre").mkdir()
    (tmp_path / "motion").mkdir()
    clock = SessionClock(FS_HZ, 12.5, copy_timestamps(timestamps, tmp_path / "pre" / "timestamps.npy"))
    indices = np.array([[4_999, 0], [17, 17]])
    np.testing.assert_array_equal(clock.times_s(indices), timestamps[indices])
    recording = preprocess_to_binary(ArraySource(_traces(5_000), FS_HZ), PreprocessParams(whiten=False),
                                     tmp_path / "pre" / "pre.bin", clock=clock)
    recording.with_binary(tmp_path / "pre" / "pre.bin").save(tmp_path / "motion")  # a record in another folder
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))  # relative paths: the folder may move
    loaded = PreprocessedRecording.load(moved / "motion")
    np.testing.assert_array_equal(loaded.clock.times_s(indices), timestamps[indices])
    assert loaded.whitening is None and loaded.whitening_inverse is None
    assert loaded.open().num_samples == 5_000


def test_a_timestamped_series_gives_peak_times_from_its_timestamps(prefect_server, tmp_path):
    from nwbflow.flows.session import process_session

    rng = np.random.default_rng(2)
    data = (rng.normal(size=(30_000, 8)) * 10e-6).astype(np.float32)  # volts, 10 µV noise
    spikes = np.arange(300, 29_700, 600)
    for sample in spikes:
        data[sample - 3:sample + 4, 2:5] -= 200e-6 * np.hanning(7)[:, None]
    timestamps = 100.0 + np.arange(30_000) / FS_HZ + rng.uniform(-1e-7, 1e-7, 30_000)  # within the 1 % jitter
    path = write_ephys_file(tmp_path / "stamped.nwb", data, timestamps=timestamps)
    params = SessionParams(stages=("preprocess", "peaks"), execution={"device": "cpu"})
    summary = process_session(str(path), str(tmp_path / "out.nwb"), params, str(tmp_path / "work"))
    peaks = pq.read_table(next(s for s in summary["stages"] if s["stage"] == "peaks")["artifacts"]["peaks"])
    samples = peaks["sample_index"].to_numpy()
    assert len(np.intersect1d(samples, spikes)) >= 0.9 * len(spikes)
    np.testing.assert_array_equal(peaks["time_s"].to_numpy(), timestamps[samples])


@pytest.mark.parametrize("sorter, stages", [("simple", ("sorting",)),
                                            ("nwbflow", ("preprocess", "peaks", "motion", "sorting"))])
def test_a_spikeinterface_sorter_needs_none_of_our_ephys_stages(small_session, sorter, stages):
    from nwbflow.tasks.plan import check_input

    params = SessionParams(stages=("sorting",), sorting={"sorter": sorter})
    assert check_input(small_session, params)[0] == stages
