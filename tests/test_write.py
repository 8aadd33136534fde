"""Write-back: new ids, provenance rows, peaks table, atomicity under SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pynwb import NWBHDF5IO
from pynwb.testing.mock.ecephys import mock_ElectricalSeries
from pynwb.testing.mock.file import mock_NWBFile

from conftest import sha256_of
from nwbflow.errors import BadInputError
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.provenance import ProvenanceRecord, read_provenance
from nwbflow.nwb_io.results import MotionForNwb, PeaksForNwb, SessionResults
from nwbflow.nwb_io.validate import validate_file
from nwbflow.nwb_io.write import check_target, write_processed


def _record(stage: str) -> ProvenanceRecord:
    return ProvenanceRecord(stage=stage, parameters=json.dumps({"threshold_mad": 5.0}),
                            inputs=({"file": "in.nwb", "identifier": "raw-1", "object": "acquisition/ElectricalSeries",
                                     "sha256": "sha256:abc"},),
                            outputs=("processing/ecephys/peaks",), start_time_utc="2026-01-01T00:00:00+00:00",
                            end_time_utc="2026-01-01T00:00:01+00:00", host="test", device="cpu",
                            flow_run_id="flow-1", task_run_id="task-1")


def _write_input(path: Path, num_samples: int = 3000, num_channels: int = 8) -> Path:
    nwbfile = mock_NWBFile()
    data = np.random.default_rng(0).integers(-500, 500, (num_samples, num_channels), dtype=np.int16)
    mock_ElectricalSeries(nwbfile=nwbfile, data=data, rate=30000.0, conversion=0.195e-6)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def test_processed_file_has_new_ids_provenance_and_input_is_unchanged(tmp_path):
    src = _write_input(tmp_path / "in.nwb")
    before = sha256_of(src)
    out = write_processed(src, tmp_path / "out.nwb", SessionResults((_record("preprocess"), _record("peaks"))),
                          copy_raw=True).path
    assert sha256_of(src) == before
    with NWBHDF5IO(str(src), "r") as io_in, NWBHDF5IO(str(out), "r") as io_out:
        raw, processed = io_in.read(), io_out.read()
        assert processed.object_id != raw.object_id
        assert processed.identifier != raw.identifier
        assert ["nwbflow", processed.was_generated_by[-1][1]] == [str(v) for v in processed.was_generated_by[-1]]
        rows = read_provenance(processed)
        assert [r["stage"] for r in rows] == ["preprocess", "peaks"]
        assert rows[0]["parameters"] == {"threshold_mad": 5.0}
        assert rows[1]["inputs"][0]["sha256"] == "sha256:abc"
        assert {r["flow_run_id"] for r in rows} == {"flow-1"}
        (name,) = raw.acquisition  # pynwb's mock names series uniquely per process
        np.testing.assert_array_equal(processed.acquisition[name].data[:], raw.acquisition[name].data[:])
    assert not list(tmp_path.glob(".*.partial.nwb")), "temporary file left behind"


def test_peaks_written_as_events_table(tmp_path):
    src = _write_input(tmp_path / "in.nwb")
    peaks = pa.table({"sample_index": np.array([10, 200], dtype=np.int64),
                      "time_s": np.array([10, 200]) / 30000.0,
                      "channel_index": np.array([1, 3], dtype=np.int32),
                      "amplitude": np.array([-7.5, -9.0], dtype=np.float32),
                      "x_um": np.array([0.0, 16.0], dtype=np.float32),
                      "y_um": np.array([20.0, 60.0], dtype=np.float32)})
    pq.write_table(peaks, tmp_path / "peaks.parquet")
    results = SessionResults((_record("peaks"),), peaks=(PeaksForNwb(
        tmp_path / "peaks.parquet", "acquisition/ElectricalSeries", 30000.0, "µV"),))
    out = write_processed(src, tmp_path / "out.nwb", results).path
    with NWBHDF5IO(str(out), "r") as io:
        table = io.read().processing[layout.ECEPHYS_MODULE][layout.PEAKS]
        np.testing.assert_allclose(table["timestamp"][:], [10 / 30000.0, 200 / 30000.0])
        np.testing.assert_array_equal(table["channel_index"][:], [1, 3])
        np.testing.assert_allclose(table["y_um"][:], [20.0, 60.0])
        assert table["timestamp"].resolution == pytest.approx(1 / 30000.0)


def test_refuses_to_overwrite_input_and_missing_directory(tmp_path):
    src = _write_input(tmp_path / "in.nwb")
    with pytest.raises(BadInputError, match="input"):
        check_target(src, src)
    with pytest.raises(BadInputError, match="does not exist"):
        check_target(src, tmp_path / "missing" / "out.nwb")


def test_refuses_an_already_processed_input(tmp_path):
    src = _write_input(tmp_path / "in.nwb")
    once = write_processed(src, tmp_path / "once.nwb", SessionResults((_record("peaks"),))).path
    with pytest.raises(BadInputError, match="processing/nwbflow/provenance"):
        write_processed(once, tmp_path / "twice.nwb", SessionResults((_record("peaks"),)))


WRITER = textwrap.dedent("""
    import sys
    from nwbflow.nwb_io.provenance import ProvenanceRecord
    from nwbflow.nwb_io.results import SessionResults
    from nwbflow.nwb_io.write import write_processed
    rows = tuple(ProvenanceRecord(stage=s, parameters="{}", inputs=(), outputs=(), start_time_utc="", end_time_utc="",
                                  host="test", device="cpu") for s in ("preprocess", "peaks"))
    # A self-contained copy: the 25 MB of samples make the export long enough to be killed in the middle.
    write_processed(sys.argv[1], sys.argv[2], SessionResults(rows), copy_raw=True)
""")


def _start_writer(src: Path, out: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(out)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _group_ends(pgid: int, timeout_s: float = 60) -> bool:
    """Whether every process of group ``pgid`` (a killed writer's fork server, its export child) ends in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 1:
            return True
        time.sleep(0.2)
    return False


def _assert_complete(out: Path) -> None:
    with NWBHDF5IO(str(out), "r") as io:
        assert [r["stage"] for r in read_provenance(io.read())] == ["preprocess", "peaks"]


def test_sigkill_at_any_point_leaves_input_intact_and_output_absent_or_complete(tmp_path):
    src = _write_input(tmp_path / "in.nwb", num_samples=400_000, num_channels=32)  # ~25 MB
    before = sha256_of(src)
    clock = time.perf_counter()
    assert _start_writer(src, tmp_path / "full.nwb").wait(timeout=300) == 0
    full_s = time.perf_counter() - clock
    _assert_complete(tmp_path / "full.nwb")
    outcomes = []
    for fraction in (0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        out = tmp_path / f"killed_{fraction}.nwb"
        writer = _start_writer(src, out)
        time.sleep(full_s * fraction)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        # Nothing of it lives on: a pool's idle export worker used to wait forever on its own queue, and keep
        # the fork server (two processes of ~100-200 MB) alive with it.
        assert _group_ends(writer.pid), f"processes of the writer killed at {fraction:.0%} live on"
        assert sha256_of(src) == before, f"input changed after a kill at {fraction:.0%}"
        if out.exists():
            _assert_complete(out)
        outcomes.append(out.exists())
    # The kills must have landed on both sides of the rename to test anything.
    assert not outcomes[0], "the earliest kill should leave no output"
