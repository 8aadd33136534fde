"""nwbflow.nwb_io.read: files as real writers make them -> a correct result or one clear error."""

from __future__ import annotations

import json
import logging
import re
import shutil

import h5py
import numpy as np
import pytest
from hdmf.backends.hdf5 import H5DataIO

from nwbflow.errors import BadInputError
from nwbflow.nwb_io import _hdf5, _series, read
from nwbflow.nwb_io.read import describe, open_session
from nwb_writers import (add_electrodes, add_roi_series, add_series, edit_h5, ephys_traces,
                         make_nwbfile, probe_positions_um, replace_dataset, sha256_file, write,
                         write_ephys_file)

ES = "acquisition/ElectricalSeries"


def expected_uv(data, conversion=1.0, offset=0.0, channel_conversion=None):
    """Independent NWB scaling: volts = data * conversion * channel_conversion + offset."""
    gain = np.ones(data.shape[1]) if channel_conversion is None else channel_conversion
    return (data.astype(np.float64) * conversion * gain + offset) * 1e6


def check_names_file(excinfo, path):
    assert str(path) in str(excinfo.value)


# --- opening -------------------------------------------------------------------------------

def test_open_reports_file_identity(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    with open_session(path) as session:
        assert session.path == path
        assert session.identifier == "nwbflow-test"
        assert len(session.object_id) == 36
        assert session.nwb_version.startswith("2.")
    assert session.closed


@pytest.mark.parametrize("make, says", [
    ("missing", "not found"), ("directory", "is a directory"), ("text", "not an HDF5 file"),
    ("hdf5_not_nwb", "not an NWB file"), ("truncated", "truncated or corrupt"),
])
def test_unreadable_inputs_raise_bad_input_naming_the_file(tmp_path, make, says):
    path = tmp_path / "input.nwb"
    if make == "directory":
        path.mkdir()
    elif make == "text":
        path.write_text("not an HDF5 file\n" * 100)
    elif make == "hdf5_not_nwb":
        with h5py.File(path, "w") as handle:
            handle["x"] = np.arange(10)
    elif make == "truncated":
        valid = write_ephys_file(tmp_path / "valid.nwb")
        shutil.copyfile(valid, path)
        with open(path, "r+b") as handle:
            handle.truncate(valid.stat().st_size // 2)
    with pytest.raises(BadInputError, match=says) as excinfo:
        open_session(path)
    check_names_file(excinfo, path)
    assert excinfo.value.fix


def test_nwb1_file_is_refused(tmp_path):
    path = tmp_path / "old.nwb"
    with h5py.File(path, "w") as handle:
        handle["nwb_version"] = "NWB-1.0.6"
        handle["identifier"] = "x"
    with pytest.raises(BadInputError, match="NWB 1.x"):
        open_session(path)


def test_file_without_subject_reads(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", subject=False)
    with open_session(path) as session:
        assert session.select_ephys().num_channels == 4


def test_old_layout_without_object_ids_or_offset_reads(tmp_path):
    data = ephys_traces()
    path = write_ephys_file(tmp_path / "s.nwb", data, conversion=2e-7)
    with edit_h5(path) as handle:  # as schema 2.0-2.1 writers left them
        handle.attrs["nwb_version"] = "2.0b"
        del handle.attrs["object_id"]
        del handle[f"{ES}/data"].attrs["offset"]
    with open_session(path) as session:
        assert session.object_id == "" and session.nwb_version == "2.0b"
        traces = session.select_ephys().get_traces(0, 100)
    np.testing.assert_allclose(traces, expected_uv(data[:100], 2e-7), rtol=1e-6)


def test_schema_newer_than_pynwb_and_extension_subtype(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    spec = {"groups": [{"neurodata_type_def": "ProbeSeries", "neurodata_type_inc":
                        "ElectricalSeries", "doc": "an extension subtype"}]}
    with edit_h5(path) as handle:
        handle.attrs["nwb_version"] = "2.99.0"
        handle[ES].attrs["neurodata_type"] = "ProbeSeries"
        handle[ES].attrs["namespace"] = "ndx-probe"
        handle["specifications/ndx-probe/0.1.0/ndx-probe.extensions"] = json.dumps(spec)
    with open_session(path) as session:
        assert [s.object_path for s in session.electrical_series()] == [ES]


# --- selection -----------------------------------------------------------------------------

def ap_lf_file(tmp_path, lf_rate=2500.0):
    nwbfile = make_nwbfile()
    add_electrodes(nwbfile, 4)
    add_series(nwbfile, "ElectricalSeriesAP", ephys_traces(), rate=30_000.0)
    add_series(nwbfile, "ElectricalSeriesLF", ephys_traces(300), rate=lf_rate, in_lfp=True)
    return write(nwbfile, tmp_path / "ap_lf.nwb")


def test_raw_band_series_is_chosen_over_lfp(tmp_path):
    with open_session(ap_lf_file(tmp_path)) as session:
        paths = [s.object_path for s in session.electrical_series()]
        assert paths == ["acquisition/ElectricalSeriesAP",
                         "processing/ecephys/LFP/ElectricalSeriesLF"]
        assert session.select_ephys().object_path == "acquisition/ElectricalSeriesAP"
        lf = session.select_ephys("/processing/ecephys/LFP/ElectricalSeriesLF")
        assert lf.sampling_rate_hz == 2500.0 and lf.num_samples == 300


def test_two_raw_band_series_is_an_error_listing_both(tmp_path):
    path = ap_lf_file(tmp_path, lf_rate=30_000.0)
    with open_session(path) as session:
        with pytest.raises(BadInputError) as excinfo:
            session.select_ephys()
        assert session.select_ephys("acquisition/ElectricalSeriesAP").num_samples == 3000
    message = str(excinfo.value)
    assert "acquisition/ElectricalSeriesAP" in message and "ElectricalSeriesLF" in message
    assert "electrical_series" in message and str(path) in message


def test_only_lfp_is_an_error_and_unknown_path_lists_candidates(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", rate=1000.0)
    with open_session(path) as session:
        with pytest.raises(BadInputError, match="no ElectricalSeries is sampled at >= 10000"):
            session.select_ephys()
        with pytest.raises(BadInputError, match=f"does not exist.*{ES}"):
            session.select_ephys("acquisition/Nope")
        with pytest.raises(BadInputError, match="is of type ElectrodesTable"):
            session.select_ephys("general/extracellular_ephys/electrodes")


def test_file_without_series_opens_but_select_fails(tmp_path):
    nwbfile = make_nwbfile()
    path = write(nwbfile, tmp_path / "empty.nwb")
    with open_session(path) as session:
        assert session.electrical_series() == [] and session.roi_response_series() == []
        with pytest.raises(BadInputError, match="no ElectricalSeries"):
            session.select_ephys()


def test_roi_response_series_are_listed(tmp_path):
    nwbfile = make_nwbfile()
    add_roi_series(nwbfile, num_frames=40, num_rois=3)
    path = write(nwbfile, tmp_path / "ophys.nwb")
    with open_session(path) as session:
        (info,) = session.roi_response_series()
        assert info.object_path == "processing/ophys/RoiResponseSeries"
        assert info.shape == (40, 3) and info.rate_hz == 50.0
        np.testing.assert_array_equal(info.roi_indices, [0, 1, 2])
        # pynwb's mocks number their tables after the first in a process: PlaneSegmentation, PlaneSegmentation2, ...
        assert re.fullmatch(r"processing/ophys/PlaneSegmentation\d*", info.rois_table_path), info.rois_table_path
        assert session.read_roi_traces(info.object_path, 5, 9).shape == (4, 3)
        with pytest.raises(BadInputError, match="no ElectricalSeries"):
            session.select_ephys()


def test_describe_summarises_series(tmp_path):
    summary = describe(ap_lf_file(tmp_path))
    assert summary["raw_band_series"] == ["acquisition/ElectricalSeriesAP"]
    rates = {e["object_path"]: e["rate_hz"] for e in summary["electrical_series"]}
    assert rates == {"acquisition/ElectricalSeriesAP": 30_000.0,
                     "processing/ecephys/LFP/ElectricalSeriesLF": 2500.0}
    assert summary["electrical_series"][0]["shape"] == (3000, 4)


# --- scaling -------------------------------------------------------------------------------

def test_int16_with_conversion_offset_and_channel_conversion(tmp_path):
    data = ephys_traces(dtype=np.int16)
    channel_conversion = np.array([1.0, 0.5, 2.0, 1.25], dtype=np.float32)
    path = write_ephys_file(tmp_path / "s.nwb", data, conversion=0.195e-6, offset=-1e-4,
                            channel_conversion=channel_conversion)
    with open_session(path) as session:
        series = session.select_ephys()
        traces = series.get_traces(0, series.num_samples)
    assert traces.dtype == np.float32 and traces.shape == (3000, 4)
    want = expected_uv(data, 0.195e-6, -1e-4, channel_conversion.astype(np.float64))
    np.testing.assert_allclose(traces, want, rtol=1e-6, atol=1e-4)


def test_traces_agree_with_spikeinterface(tmp_path):
    se = pytest.importorskip("spikeinterface.extractors")
    channel_conversion = np.array([1.0, 0.5, 2.0, 1.25])
    path = write_ephys_file(tmp_path / "s.nwb", conversion=0.195e-6, offset=2e-5,
                            channel_conversion=channel_conversion)
    # SpikeInterface holds the file open with HDF5's default locking; ours must still open.
    recording = se.read_nwb_recording(path, electrical_series_path=ES)
    theirs = recording.get_traces(start_frame=100, end_frame=600, return_in_uV=True)
    with open_session(path) as session:
        series = session.select_ephys()
        np.testing.assert_allclose(series.get_traces(100, 600), theirs, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(series.channel_positions_um, recording.get_channel_locations())
        assert series.sampling_rate_hz == recording.get_sampling_frequency()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_data_in_volts(tmp_path, dtype):
    data = ephys_traces(dtype=dtype)
    path = write_ephys_file(tmp_path / "s.nwb", data)
    with open_session(path) as session:
        traces = session.select_ephys().get_traces(10, 20)
    np.testing.assert_allclose(traces, data[10:20].astype(np.float64) * 1e6, rtol=1e-6)


def test_chunked_reads_equal_one_whole_read(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", conversion=1e-6)
    with open_session(path) as session:
        series = session.select_ephys()
        whole = series.get_traces(0, series.num_samples)
        bounds = [0, 1, 7, 500, 1023, 1024, 2999, 3000]
        pieces = [series.get_traces(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        assert series.get_traces(5, 5).shape == (0, 4)
        with pytest.raises(IndexError):
            series.get_traces(10, 3001)
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_single_channel_1d_data(tmp_path):
    data = ephys_traces(num_channels=1)[:, 0]
    path = write_ephys_file(tmp_path / "s.nwb", data[:, None], conversion=1e-6)
    with edit_h5(path) as handle:  # the schema allows (num_times,) data
        replace_dataset(handle[ES], "data", data)
    with open_session(path) as session:
        traces = session.select_ephys().get_traces(0, 50)
    np.testing.assert_allclose(traces[:, 0], data[:50] * 1.0, rtol=1e-6)


def test_unit_other_than_volts_is_an_error(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    with edit_h5(path) as handle:
        handle[f"{ES}/data"].attrs["unit"] = "uV"
    with open_session(path) as session, pytest.raises(BadInputError, match="'uV'"):
        session.select_ephys()


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_compressed_data_reads_like_plain_data_and_hashes_by_kind(tmp_path, monkeypatch, dtype):
    # Integer samples in gzip chunks are hashed by their stored bytes (nothing decoded; the digest names
    # how, "sha256-stored:"); float samples, which may hold NaN, by their decoded values, as plain data.
    data = ephys_traces().astype(dtype)
    plain = write_ephys_file(tmp_path / "plain.nwb", data, conversion=1e-6)
    packed = write_ephys_file(tmp_path / "packed.nwb", conversion=1e-6,
                              data=H5DataIO(data, compression="gzip", chunks=(256, 4)))
    hashes = {}
    for path in (plain, packed):
        with open_session(path) as session:
            series = session.select_ephys()
            np.testing.assert_array_equal(series.get_traces(100, 700), data[100:700])
            hashes[path.name] = series.content_hash()
    monkeypatch.setattr(read, "HASH_BLOCK_BYTES", 1000)  # many small blocks, same digest
    with open_session(packed) as session:
        assert session.select_ephys().content_hash() == hashes["packed.nwb"]
    assert hashes["plain.nwb"].startswith("sha256:")
    if dtype == "int16":
        assert hashes["packed.nwb"].startswith("sha256-stored:")
    else:
        assert hashes["plain.nwb"] == hashes["packed.nwb"]


def test_missing_compression_filter_is_named(tmp_path, monkeypatch):
    path = write_ephys_file(tmp_path / "s.nwb", H5DataIO(ephys_traces(), compression="gzip"))
    monkeypatch.setattr(_hdf5.h5py.h5z, "filter_avail", lambda code: False)
    monkeypatch.setattr(_hdf5, "_load_hdf5plugin", lambda: False)
    with open_session(path) as session, pytest.raises(BadInputError, match="hdf5plugin"):
        session.select_ephys()


# --- geometry and regions ------------------------------------------------------------------

def test_region_on_a_subset_of_electrodes_gives_their_positions(tmp_path):
    rows = [2, 3, 5, 7]
    path = write_ephys_file(tmp_path / "s.nwb", num_electrodes=8, rows=rows)
    with open_session(path) as session:
        series = session.select_ephys()
        np.testing.assert_array_equal(series.electrode_indices, rows)
        np.testing.assert_array_equal(series.channel_positions_um, probe_positions_um(8)[rows])
        assert not series.positions_are_fallback


def test_region_longer_than_data_columns_is_an_error(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", num_electrodes=8)
    with edit_h5(path) as handle:  # what SpikeInterface's extractor silently misreports
        replace_dataset(handle[ES], "electrodes", np.arange(8))
    with open_session(path) as session, pytest.raises(BadInputError) as excinfo:
        session.select_ephys()
    message = str(excinfo.value)
    assert "8 rows" in message and "4 channels" in message and ES in message
    assert str(path) in message


def test_transposed_data_is_named(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    with edit_h5(path) as handle:  # (channels, samples), as some MATLAB exports are
        replace_dataset(handle[ES], "data", ephys_traces().T.copy())
    with open_session(path) as session, pytest.raises(BadInputError, match="transposed"):
        session.select_ephys()


def test_one_based_region_is_an_error(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    with edit_h5(path) as handle:  # MATLAB-style indices 1..4 into a 4-row table
        replace_dataset(handle[ES], "electrodes", np.arange(1, 5))
    with open_session(path) as session, pytest.raises(BadInputError, match="1-based") as exc:
        session.select_ephys()
    assert "electrodes" in str(exc.value) and str(path) in str(exc.value)


def test_missing_rel_positions_fall_back_with_warning(tmp_path, caplog):
    path = write_ephys_file(tmp_path / "s.nwb", positions=False)
    with caplog.at_level(logging.WARNING, logger="nwbflow.nwb_io"):
        with open_session(path) as session:
            series = session.select_ephys()
    assert series.positions_are_fallback
    np.testing.assert_array_equal(series.channel_positions_um,
                                  [[0, 0], [0, 20], [0, 40], [0, 60]])
    assert "fallback" in caplog.text


def test_allensdk_probe_position_columns(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", positions=False)
    table = "general/extracellular_ephys/electrodes"
    with edit_h5(path) as handle:
        handle[f"{table}/probe_horizontal_position"] = [11.0, 43.0, 27.0, 59.0]
        handle[f"{table}/probe_vertical_position"] = [20.0, 20.0, 40.0, 40.0]
    with open_session(path) as session:
        series = session.select_ephys()
    assert not series.positions_are_fallback
    np.testing.assert_array_equal(series.channel_positions_um[:, 1], [20, 20, 40, 40])


# --- time base -----------------------------------------------------------------------------

def test_timestamps_instead_of_rate(tmp_path):
    rng = np.random.default_rng(1)
    timestamps = 12.5 + np.arange(3000) / 20_000.0 + rng.uniform(-2e-7, 2e-7, 3000)
    path = write_ephys_file(tmp_path / "s.nwb", timestamps=timestamps)
    with open_session(path) as session:
        series = session.select_ephys()
        assert series.has_timestamps
        assert series.sampling_rate_hz == pytest.approx(1 / np.median(np.diff(timestamps)))
        assert series.starting_time_s == timestamps[0]
        picks = np.array([[2999, 0], [17, 17]])
        np.testing.assert_array_equal(series.sample_times_s(picks), timestamps[picks])


def test_rate_based_sample_times(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb", rate=25_000.0, starting_time=3.0)
    with open_session(path) as session:
        series = session.select_ephys()
        np.testing.assert_allclose(series.sample_times_s(np.array([0, 25_000 // 10])),
                                   [3.0, 3.1])
        assert not series.has_timestamps


def test_sample_times_read_block_by_block(tmp_path, monkeypatch):
    timestamps = np.arange(3000) / 30_000.0
    path = write_ephys_file(tmp_path / "s.nwb", timestamps=timestamps)
    monkeypatch.setattr(_series, "TIMESTAMP_CHUNK", 256)
    with open_session(path) as session:
        picks = np.array([2999, 5, 255, 256, 1000, 5])
        np.testing.assert_array_equal(session.select_ephys().sample_times_s(picks),
                                      timestamps[picks])


@pytest.mark.parametrize("where, value, match", [
    (1700, np.nan, "not finite"),
    (1024, -1.0, "not strictly increasing at sample 1024"),  # first sample of a block
])
def test_bad_timestamps_are_found_in_any_block(tmp_path, monkeypatch, where, value, match):
    timestamps = np.arange(3000) / 30_000.0
    timestamps[where] = value
    path = write_ephys_file(tmp_path / "s.nwb", timestamps=np.arange(3000) / 30_000.0)
    with edit_h5(path) as handle:
        replace_dataset(handle[ES], "timestamps", timestamps)
    monkeypatch.setattr(_series, "TIMESTAMP_CHUNK", 256)
    with open_session(path) as session, pytest.raises(BadInputError, match=match) as exc:
        session.select_ephys(ES)
    assert f"{ES}/timestamps" in str(exc.value)


def test_a_gap_or_jitter_is_processed_with_the_timestamps_and_reported_once(tmp_path, monkeypatch, caplog):
    """Real clocks have gaps (dropped buffers) and host-clock jitter: the series is read at 1 / median interval,
    its times are the timestamps themselves, and the irregularity is reported once per file version."""
    rng = np.random.default_rng(0)
    timestamps = np.arange(3000) / 30_000.0
    timestamps[2000:] += 0.01  # a 10 ms gap, in the second block
    timestamps[:500] += rng.uniform(0, 0.2, 500) / 30_000.0  # jitter of up to 20 % of an interval
    path = write_ephys_file(tmp_path / "s.nwb", timestamps=np.arange(3000) / 30_000.0)
    with edit_h5(path) as handle:
        replace_dataset(handle[ES], "timestamps", timestamps)
    monkeypatch.setattr(_series, "TIMESTAMP_CHUNK", 256)
    with caplog.at_level("WARNING", logger="nwbflow"):
        for _ in range(2):
            with open_session(path) as session:
                series = session.select_ephys(ES)
    assert series.sampling_rate_hz == pytest.approx(30_000.0, rel=0.01)
    assert "ending at sample 2000" in series.irregular and "longest 0.0100333" in series.irregular
    warnings = [r.getMessage() for r in caplog.records if "irregular" in r.getMessage()]
    assert len(warnings) == 1 and ES in warnings[0] and str(path) in warnings[0]
    with open_session(path) as session:
        picks = np.array([0, 1999, 2000, 2999])
        np.testing.assert_array_equal(session.select_ephys(ES).sample_times_s(picks), timestamps[picks])


def test_jitter_tolerance_is_one_percent(tmp_path):
    timestamps = np.arange(3000) / 30_000.0
    timestamps[1500:] += 0.009 / 30_000.0  # one interval 0.9 % long: accepted
    path = write_ephys_file(tmp_path / "s.nwb", timestamps=timestamps)
    with open_session(path) as session:
        assert session.select_ephys().sampling_rate_hz == pytest.approx(30_000.0)
        assert session.select_ephys().irregular == ""


@pytest.mark.parametrize("rate", [0.0, -30_000.0, np.nan])
def test_non_positive_rate_is_an_error(tmp_path, rate):
    path = write_ephys_file(tmp_path / "s.nwb")
    with edit_h5(path) as handle:
        handle[f"{ES}/starting_time"].attrs["rate"] = rate
    with open_session(path) as session:
        with pytest.raises(BadInputError, match="positive") as excinfo:
            session.select_ephys(ES)
        with pytest.raises(BadInputError):
            session.select_ephys()
    check_names_file(excinfo, path)


@pytest.mark.parametrize("num_samples", [0, 1])
def test_empty_or_single_sample_series_is_an_error(tmp_path, num_samples):
    path = write_ephys_file(tmp_path / "s.nwb")
    with edit_h5(path) as handle:
        replace_dataset(handle[ES], "data", np.zeros((num_samples, 4), dtype=np.int16))
    with open_session(path) as session:
        with pytest.raises(BadInputError, match=f"{num_samples} samples"):
            session.select_ephys(ES)


# --- identity and safety -------------------------------------------------------------------

def test_content_hash_is_stable_and_sees_one_sample(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    copy = tmp_path / "copy.nwb"
    shutil.copyfile(path, copy)
    with edit_h5(copy) as handle:
        handle[f"{ES}/data"][1234, 2] += 1
    hashes = []
    for each in (path, path, copy):
        with open_session(each) as session:
            series = session.select_ephys()
            hashes.append(series.content_hash())
            assert series.content_hash() == hashes[-1]  # cached
    assert hashes[0] == hashes[1] != hashes[2]
    assert hashes[0].startswith("sha256:") and len(hashes[0]) == 7 + 64


def test_reading_never_modifies_the_input(tmp_path):
    nwbfile = make_nwbfile()
    add_electrodes(nwbfile, 4)
    add_series(nwbfile, "ElectricalSeries", ephys_traces(), rate=30_000.0, conversion=1e-6)
    add_roi_series(nwbfile)
    path = write(nwbfile, tmp_path / "s.nwb")
    before = sha256_file(path)
    describe(path)
    with open_session(path) as session:
        series = session.select_ephys()
        series.get_traces(0, series.num_samples)
        series.sample_times_s(np.arange(10))
        series.content_hash()
        session.read_roi_traces(session.roi_response_series()[0].object_path)
    assert sha256_file(path) == before


def test_series_of_a_closed_session_cannot_read(tmp_path):
    path = write_ephys_file(tmp_path / "s.nwb")
    with open_session(path) as session:
        series = session.select_ephys()
    with pytest.raises(RuntimeError, match="closed"):
        series.get_traces(0, 10)


def test_spikeinterface_copies_of_a_recording_share_its_file_and_close_with_it(tmp_path):
    """SpikeInterface copies a recording from its arguments and leaves the copies to the garbage collector;
    a copy's own handle would outlive the sorter, and a later open of the file with pynwb's default HDF5
    locking in this process would then fail ("Could not find an IO to read the file")."""
    import gc

    import pynwb

    from nwbflow.nwb_io.si_recording import NwbSeriesRecording

    path = write_ephys_file(tmp_path / "s.nwb")
    gc.disable()  # the copy below must not be collected before the check
    try:
        original = NwbSeriesRecording(str(path), ES)
        copy = original.clone()
        np.testing.assert_array_equal(copy.get_traces(0, 0, 10), original.get_traces(0, 0, 10))
        original.close()
        assert h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE) == []  # the copy's file went with it
        assert pynwb.NWBHDF5IO.can_read(str(path))
        del copy
    finally:
        gc.enable()
