"""Bad inputs through ``nwbflow run``: each gives exit code 2 and one line naming file, object and fix.

Every case is built with pynwb/h5py and run through the CLI entry point in this process. A bad input
must give exactly one ``nwbflow: bad input:`` line (file, NWB object where there is one, ``Fix:``), no
traceback (unless ``--debug``), no output file or hidden partial file, no artifact, and leave the
input byte-identical. Cases found inside the flow (the content-hash pass that reads every value)
need the Prefect server; the others fail before Prefect starts.

Inputs that are not errors are tested as such: one channel (with the common reference off) runs
preprocess, peaks and sorting and leaves motion out with a warning; missing channel positions fall
back to the documented layout (a vertical line, x = 0 µm, y = 0, 20, 40, ... µm) with a warning; NaN
frames of ROI traces are gaps the calcium stage interpolates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from hdmf.backends.hdf5 import H5DataIO
from pynwb import NWBHDF5IO

from conftest import sha256_of
from nwb_writers import (add_roi_series, edit_h5, ephys_traces, make_nwbfile, replace_dataset, write,
                         write_ephys_file)
from nwbflow import cli

ES = "acquisition/ElectricalSeries"
RRS = "processing/ophys/RoiResponseSeries"
ELECTRODES = "general/extracellular_ephys/electrodes"


# --- inputs ---------------------------------------------------------------------------------

def ephys_file(folder: Path, data=None, **kwargs) -> Path:
    return write_ephys_file(folder / "session.nwb", data, **kwargs)


def ophys_file(folder: Path, num_frames: int = 200) -> Path:
    """A 50 Hz RoiResponseSeries of 3 ROIs (positive fluorescence) under processing/ophys."""
    nwbfile = make_nwbfile()
    add_roi_series(nwbfile, num_frames=num_frames, num_rois=3)
    return write(nwbfile, folder / "session.nwb")


def edited(path: Path, edit: Callable[[h5py.File], None]) -> Path:
    with edit_h5(path) as handle:
        edit(handle)
    return path


def attribute(build: Callable[[Path], Path], obj: str, name: str, value) -> Callable[[Path], Path]:
    """``build``, then ``obj@name = value``."""
    def edit(handle):
        handle[obj].attrs[name] = value
    return lambda folder: edited(build(folder), edit)


def roi_rate_zero_and_no_imaging_rate(folder: Path) -> Path:
    """Rate 0 (as CaImAn through optinist writes it) and an ImagingPlane without imaging_rate: no clock at all.
    (With the plane's rate, the series takes it: tests/test_lab_sessions.py.)"""
    def edit(handle):
        handle[f"{RRS}/starting_time"].attrs["rate"] = 0.0
        for plane in handle["general/optophysiology"].values():
            del plane["imaging_rate"]
    return edited(ophys_file(folder), edit)


def overwrite_bytes(path: Path, offset: int, count: int = 16) -> Path:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * count)
    return path


def missing(folder: Path) -> Path:
    return folder / "absent.nwb"


def directory(folder: Path) -> Path:
    (folder / "session.nwb").mkdir()
    return folder / "session.nwb"


def text_file(folder: Path) -> Path:
    (folder / "session.nwb").write_text("not an HDF5 file\n" * 100)
    return folder / "session.nwb"


def hdf5_not_nwb(folder: Path) -> Path:
    with h5py.File(folder / "session.nwb", "w") as handle:
        handle["x"] = np.arange(10)
    return folder / "session.nwb"


def truncated(folder: Path) -> Path:
    path = ephys_file(folder)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return path


def corrupt_header(folder: Path) -> Path:
    """The object header of the series' data overwritten (a bad copy, a failing disk)."""
    path = ephys_file(folder)
    with h5py.File(path, "r") as handle:
        address = h5py.h5o.get_info(handle[f"{ES}/data"].id).addr
    return overwrite_bytes(path, address)


def corrupt_chunk(folder: Path) -> Path:
    """One gzip chunk of the series' data damaged: found when the data are first read."""
    path = ephys_file(folder, H5DataIO(ephys_traces(), compression="gzip", chunks=(500, 4)), conversion=1e-6)
    with h5py.File(path, "r") as handle:
        chunk = handle[f"{ES}/data"].id.get_chunk_info(3)
    return overwrite_bytes(path, chunk.byte_offset + chunk.size // 2)


def no_series(folder: Path) -> Path:
    return write(make_nwbfile(), folder / "session.nwb")


def ephys_samples(count: int) -> Callable[[Path], Path]:
    return lambda folder: edited(ephys_file(folder), lambda h: replace_dataset(
        h[ES], "data", np.zeros((count, 4), dtype=np.int16)))


def roi_frames(count: int) -> Callable[[Path], Path]:
    return lambda folder: edited(ophys_file(folder), lambda h: replace_dataset(h[RRS], "data", np.ones((count, 3))))


def one_channel(folder: Path) -> Path:
    return ephys_file(folder, ephys_traces(num_channels=1))


def ephys_value(value: float) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        data = ephys_traces(dtype=np.float32)
        data[1500, 2] = value
        return ephys_file(folder, data)
    return build


def flat_ephys(folder: Path) -> Path:
    return ephys_file(folder, np.zeros((3000, 4), dtype=np.int16))


def roi_values(where: tuple, value: float) -> Callable[[Path], Path]:
    def edit(handle):
        handle[f"{RRS}/data"][where] = value
    return lambda folder: edited(ophys_file(folder), edit)


def region(rows: np.ndarray, num_electrodes: int) -> Callable[[Path], Path]:
    return lambda folder: edited(ephys_file(folder, num_electrodes=num_electrodes),
                                 lambda h: replace_dataset(h[ES], "electrodes", rows))


def ephys_backwards_timestamps(folder: Path) -> Path:
    timestamps = np.arange(3000) / 30_000.0
    timestamps[1024] = timestamps[1022]
    path = ephys_file(folder, timestamps=np.arange(3000) / 30_000.0)
    return edited(path, lambda h: replace_dataset(h[ES], "timestamps", timestamps))


def roi_backwards_timestamps(folder: Path) -> Path:
    def edit(handle):
        del handle[f"{RRS}/starting_time"]
        timestamps = np.arange(200) / 50.0
        timestamps[120] = 0.0
        handle[f"{RRS}/timestamps"] = timestamps
    return edited(ophys_file(folder), edit)


def duplicate_roi_ids(folder: Path) -> Path:
    def edit(handle):
        table = handle[handle[f"{RRS}/rois"].attrs["table"]]
        replace_dataset(table, "id", np.array([0, 0, 1]))
    return edited(ophys_file(folder), edit)


def nwb1(folder: Path) -> Path:
    with h5py.File(folder / "session.nwb", "w") as handle:
        handle["nwb_version"] = "NWB-1.0.6"
        handle["identifier"] = "old"
        handle["acquisition/timeseries/raw/data"] = ephys_traces()
    return folder / "session.nwb"


def nwb2_prerelease_region(folder: Path) -> Path:
    """A 2.0 pre-release layout (before pynwb 1.0): the electrodes region as HDF5 object references."""
    def edit(handle):
        refs = np.array([handle[ELECTRODES].ref] * 4, dtype=h5py.ref_dtype)
        replace_dataset(handle[ES], "electrodes", refs)
    return edited(ephys_file(folder), edit)


@dataclass(frozen=True)
class Case:
    """A bad input: how to build it, what the message says (regex) and about which object (regex)."""

    build: Callable[[Path], Path]
    says: str
    obj: str | None = None
    params: dict | None = None
    stages: str | None = None
    #: Found by the content-hash pass inside the flow, so the Prefect server must be up.
    in_flow: bool = False


CASES = {
    "missing file": Case(missing, "file not found"),
    "not a file (a directory)": Case(directory, "is a directory"),
    "not HDF5": Case(text_file, "not an HDF5 file"),
    "HDF5 but not NWB": Case(hdf5_not_nwb, "not an NWB file"),
    "truncated NWB": Case(truncated, "truncated or corrupt"),
    "corrupt object header": Case(corrupt_header, "cannot be decoded: the file is corrupt here", f"{ES}/data"),
    "corrupt compressed chunk": Case(corrupt_chunk, "rows 1500:2000 of .* cannot be decoded, so the file is "
                                                    "corrupt", f"{ES}/data", in_flow=True),  # that chunk's rows
    "no ElectricalSeries and no RoiResponseSeries": Case(no_series, "nothing to run: no built stage applies"),
    "ElectricalSeries with 0 samples": Case(ephys_samples(0), "data has 0 samples", f"{ES}/data"),
    "ElectricalSeries with 1 sample": Case(ephys_samples(1), "data has 1 samples", f"{ES}/data"),
    "RoiResponseSeries with 0 frames": Case(roi_frames(0), "data has 0 samples", f"{RRS}/data"),
    "RoiResponseSeries with 1 frame": Case(roi_frames(1), "data has 1 samples", f"{RRS}/data"),
    "one channel, common reference on": Case(one_channel, "has one channel: the common reference", ES),
    "one channel, motion asked for": Case(one_channel, "motion along the probe cannot be estimated: its 1 channel",
                                          ES, params={"preprocess": {"common_reference": False}},
                                          stages="preprocess,peaks,motion"),
    "NaN in ElectricalSeries data": Case(ephys_value(np.nan), "data holds nan at sample 1500, channel 2", f"{ES}/data",
                                         in_flow=True),
    "Inf in ElectricalSeries data": Case(ephys_value(-np.inf), "data holds -inf at sample 1500, channel 2",
                                         f"{ES}/data", in_flow=True),
    "flat ElectricalSeries (all zeros)": Case(flat_ephys, "every channel is constant", f"{ES}/data", in_flow=True),
    "conversion out of the float32 range": Case(attribute(ephys_file, f"{ES}/data", "conversion", 1e300),
                                                r"data \* conversion \+ offset reaches inf µV, beyond the float32",
                                                f"{ES}/data", in_flow=True),
    "Inf in RoiResponseSeries data": Case(roi_values((7, 1), np.inf), "data holds inf at frame 7, ROI column 1",
                                          f"{RRS}/data", in_flow=True),
    "ROI with no finite value": Case(roi_values((slice(None), 2), np.nan),
                                     r"ROI column\(s\) \[2\] hold no finite value", f"{RRS}/data", in_flow=True),
    "electrodes region shorter than data columns": Case(region(np.arange(3), 4), "lists 3 rows but data has 4 "
                                                                                 "channels", ES),
    "electrodes region longer than data columns": Case(region(np.arange(8), 8), "lists 8 rows but data has 4 "
                                                                                "channels", ES),
    "non-monotonic timestamps (ElectricalSeries)": Case(ephys_backwards_timestamps, "not strictly increasing at "
                                                                                    "sample 1024", f"{ES}/timestamps"),
    "non-monotonic timestamps (RoiResponseSeries)": Case(roi_backwards_timestamps, "not strictly increasing at "
                                                                                   "sample 120", f"{RRS}/timestamps"),
    "sampling rate 0 (ElectricalSeries)": Case(attribute(ephys_file, f"{ES}/starting_time", "rate", 0.0),
                                               "sampling rate must be a positive number of Hz, found 0.0",
                                               f"{ES}/starting_time"),
    "sampling rate below the band-pass (10 kHz)": Case(lambda folder: ephys_file(folder, rate=10_000.0),
                                                       r"sampled at 10000 Hz: freq_max_hz \(6000.0 Hz\) must be "
                                                       "below Nyquist", ES),
    "sampling rate 0 (RoiResponseSeries)": Case(roi_rate_zero_and_no_imaging_rate,
                                                "sampling rate must be a positive number of Hz, found 0.0",
                                                f"{RRS}/starting_time"),
    "duplicate ROI ids": Case(duplicate_roi_ids, r"ids \[0\] are each shared by several rows",
                              r"processing/ophys/PlaneSegmentation\w*/id"),
    "NWB 1.x (older than pynwb reads)": Case(nwb1, "NWB 1.x file"),
    "NWB 2.0 pre-release layout": Case(nwb2_prerelease_region, "pre-release NWB 2.0 layout", f"{ES}/electrodes"),
}


# --- running the CLI ----------------------------------------------------------------------------

def run_cli(folder: Path, input_path: Path, *, params: dict | None = None, stages: str | None = None,
            debug: bool = False) -> tuple[int, Path]:
    """``nwbflow run INPUT -o folder/out/out.nwb`` in this process; (exit code, output path)."""
    out_dir = folder / "out"
    out_dir.mkdir(exist_ok=True)
    args = ["run", str(input_path), "-o", str(out_dir / "out.nwb"), "--device", "cpu"]
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
        args += ["--params", str(folder / "params.json")]
    if stages is not None:
        args += ["--stages", stages]
    return cli.main(args + (["--debug"] if debug else [])), out_dir / "out.nwb"


def assert_nothing_written(out: Path) -> None:
    """No output, no hidden partial file beside it, no artifact in the default work directory."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*.partial*"))
    assert not [p for p in (out.parent / ".nwbflow-work").rglob("*") if p.is_file()]


@pytest.fixture
def folder(tmp_path) -> Path:
    """Inputs go to ``folder/in``, outputs to ``folder/out`` (resolved: messages name resolved paths)."""
    (tmp_path / "in").mkdir()
    return tmp_path.resolve()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exit_2_one_clear_line_nothing_written(name, folder, capsys, request):
    case = CASES[name]
    if case.in_flow:
        request.getfixturevalue("prefect_server")
    input_path = case.build(folder / "in")
    before = sha256_of(input_path) if input_path.is_file() else None
    capsys.readouterr()
    code, out = run_cli(folder, input_path, params=case.params, stages=case.stages)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("nwbflow: bad input:")]
    assert len(lines) == 1, err[-3000:]
    where = re.escape(str(input_path)) + (f": {case.obj}: " if case.obj else ": ")
    assert re.search(where, lines[0]), lines[0]
    assert re.search(case.says, lines[0]) and "Fix: " in lines[0], lines[0]
    if not case.in_flow:  # inside the flow, this process's stderr also carries the test server's logs
        assert "Traceback" not in err
    assert_nothing_written(out)
    if before is not None:
        assert sha256_of(input_path) == before


def test_bad_input_found_inside_the_flow_shows_no_traceback(prefect_server, folder):
    """What a user sees: ``nwbflow run`` in its own process (on the test server), failing in the flow."""
    from prefect.settings import PREFECT_API_URL

    input_path = CASES["NaN in ElectricalSeries data"].build(folder / "in")
    before = sha256_of(input_path)
    (folder / "out").mkdir()
    out = folder / "out" / "out.nwb"
    result = subprocess.run([sys.executable, "-m", "nwbflow.cli", "run", str(input_path), "-o", str(out),
                             "--device", "cpu"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("nwbflow: bad input:")]
    assert len(lines) == 1 and f"{input_path}: {ES}/data: data holds nan at sample 1500" in lines[0]
    assert "Flow run encountered an exception: BadInputError" in result.stderr  # Prefect's log, one line
    assert "Traceback" not in result.stderr
    assert_nothing_written(out)
    assert sha256_of(input_path) == before


def test_debug_shows_the_traceback(folder, capsys):
    input_path = text_file(folder / "in")
    code, out = run_cli(folder, input_path, debug=True)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "BadInputError" in err
    assert len([line for line in err.splitlines() if line.startswith("nwbflow: bad input:")]) == 1
    assert_nothing_written(out)


# --- inputs that are not errors ---------------------------------------------------------------

def synth_session(folder: Path, **config) -> Path:
    from nwbflow.synth import SynthConfig, write_synthetic_session

    path = folder / "session.nwb"
    write_synthetic_session(path, SynthConfig(**{"num_units": 2, "seed": 0, "ophys": False, **config}))
    return path


def provenance_stages(nwbfile) -> list[str]:
    return list(nwbfile.processing["nwbflow"]["provenance"].to_dataframe()["stage"])


def test_one_channel_runs_preprocess_peaks_sorting_and_leaves_motion_out(prefect_server, folder, caplog):
    input_path = synth_session(folder / "in", num_channels=1, duration_s=10.0)  # ~50 spikes of one unit
    before = sha256_of(input_path)
    with caplog.at_level(logging.WARNING, logger="nwbflow"):
        code, out = run_cli(folder, input_path, params={"preprocess": {"common_reference": False}})
    assert code == 0, caplog.text[-3000:]
    assert "motion stage skipped: motion along the probe cannot be estimated: its 1 channel(s)" in caplog.text
    with NWBHDF5IO(out, "r") as io:
        nwbfile = io.read()
        assert provenance_stages(nwbfile) == ["preprocess", "peaks", "sorting"]
        assert len(nwbfile.units) >= 1
    assert sha256_of(input_path) == before


def test_missing_channel_positions_use_the_documented_fallback(prefect_server, folder, caplog):
    input_path = synth_session(folder / "in", num_channels=8, duration_s=3.0)

    def drop_positions(handle):
        table = handle[ELECTRODES]
        for column in ("rel_x", "rel_y"):
            del table[column]
        table.attrs["colnames"] = [c for c in table.attrs["colnames"] if c not in ("rel_x", "rel_y")]

    edited(input_path, drop_positions)
    before = sha256_of(input_path)
    with caplog.at_level(logging.WARNING, logger="nwbflow"):
        code, out = run_cli(folder, input_path, stages="preprocess,peaks", params={"peaks": {"write_to_nwb": True}})
    assert code == 0, caplog.text[-3000:]
    assert "no rel_x/rel_y columns; using fallback channel positions (a vertical line, 20 µm pitch)" in caplog.text
    with NWBHDF5IO(out, "r") as io:
        peaks = io.read().processing["ecephys"]["peaks"].to_dataframe()
    assert len(peaks) > 0
    np.testing.assert_array_equal(peaks["x_um"], 0.0)  # every contact on the line x = 0
    assert peaks["y_um"].between(0.0, 7 * 20.0).all() and peaks["y_um"].nunique() > 1
    assert sha256_of(input_path) == before


def test_nan_frames_of_roi_traces_are_gaps_not_errors(prefect_server, folder, caplog):
    def add_gaps(handle):
        handle[f"{RRS}/data"][50:53, 0] = np.nan
        handle[f"{RRS}/data"][0, 1] = np.nan

    input_path = edited(ophys_file(folder / "in"), add_gaps)
    before = sha256_of(input_path)
    with caplog.at_level(logging.WARNING, logger="nwbflow"):
        code, out = run_cli(folder, input_path)
    assert code == 0, caplog.text[-3000:]
    assert "4 NaN values (missing frames), the first at frame 0, ROI column 1" in caplog.text
    with NWBHDF5IO(out, "r") as io:
        rate = io.read().processing["ophys"]["Deconvolved"]["inferred_spike_rate"].data[()]
    assert rate.shape == (200, 3) and np.all(np.isfinite(rate)) and np.all(rate >= 0)
    assert sha256_of(input_path) == before
