"""Write/read roundtrip, validation and spec-drift tests of the ndx-nwbflow extension."""

from __future__ import annotations

import dataclasses

import importlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, validate
from pynwb.testing.mock.file import mock_NWBFile
from pynwb.file import Subject
from pynwb.testing.mock.ecephys import mock_ElectricalSeries
from pynwb.testing.mock.file import mock_NWBFile

import nwbflow.extensions as ext
from nwbflow.extensions import (
    NAMESPACE,
    PROVENANCE_COLUMNS,
    MotionEstimate,
    ProvenanceTable,
    build_spec,
)
from nwbflow.nwb_io.provenance import ProvenanceRecord, read_provenance

import nwbinspector  # noqa: E402  (test extra: a hard dependency of the suite)

logger = logging.getLogger(__name__)

PROVENANCE_PATH = "/processing/nwbflow/provenance"
MOTION_PATH = "/processing/ecephys/motion"
OUR_TYPES = {"ProvenanceTable", "MotionEstimate"}

EXPECTED_COLUMNS = (
    "stage", "software", "software_version", "git_revision", "parameter_names", "parameter_values",
    "input_files", "input_identifiers", "input_objects", "input_sha256", "outputs", "start_time_utc", "end_time_utc",
    "host", "device", "flow_run_id", "task_run_id", "status", "error",
)
#: Added in ndx-nwbflow 0.2.0, optional in the spec (files of 0.1.0 still read): created by the first row.
ADDED_COLUMNS = ("input_identifiers", "status", "error")  # since 0.2.0
OPTIONAL_COLUMNS = (*ADDED_COLUMNS, "outputs")

PEAKS_INPUT = {"file": "sub-1_ses-1.nwb", "identifier": "raw-session-1", "object": "acquisition/ElectricalSeries",
               "sha256": "sha256:" + "ab" * 32}


def _provenance_records() -> list[ProvenanceRecord]:
    """Two stage runs: one under Prefect on a GPU, one outside Prefect on CPU."""
    return [
        ProvenanceRecord(
            stage="preprocess", git_revision="0123456789abcdef0123456789abcdef01234567",
            parameters=json.dumps({"freq_min_hz": 300.0, "whiten": True, "nested": {"mode": "global"}}),
            inputs=(PEAKS_INPUT,), outputs=(),
            start_time_utc="2024-05-01T12:00:00.000000+00:00",
            end_time_utc="2024-05-01T12:03:10.250000+00:00", host="node-01", device="cuda:0",
            flow_run_id="6c1f2d1e-6a4a-4b8e-9a43-6f1f6f3c2a10",
            task_run_id="0b7d7c1e-3e0f-4a43-8c5e-2f6f0b5b9e21"),
        ProvenanceRecord(
            stage="motion", parameters=json.dumps({"time_bin_s": 1.0, "depth_bins": [100.0, 300.0]}),
            inputs=(PEAKS_INPUT,), outputs=("processing/ecephys/motion",),
            start_time_utc="2024-05-01T12:03:11.000000+00:00",
            end_time_utc="2024-05-01T12:04:00.500000+00:00", host="laptop", device="cpu", status="failed",
            error="BadInputError: the series' clock goes backwards"),
    ]


def _motion_arrays() -> dict[str, np.ndarray]:
    """A 10 time bins x 3 depth bins estimate, seeded."""
    rng = np.random.default_rng(0)
    return {
        "displacement": rng.normal(scale=5.0, size=(10, 3)).astype(np.float32),
        "time_bin_centers": np.arange(10, dtype=np.float64) + 0.5,
        "depth_bin_centers": np.array([100.0, 300.0, 500.0]),
    }


MOTION_ATTRIBUTES = {
    "method": "medicine",
    "parameters": json.dumps({"time_bin_s": 1.0, "depth_bin_um": 200.0}),
    "direction": "y",
    "description": "MEDiCINe motion estimate from detected peaks.",
}


def _build_nwbfile():
    """A mock session with the provenance table and motion estimate added."""
    nwbfile = mock_NWBFile(
        session_start_time=datetime(2024, 5, 1, 11, 0, tzinfo=timezone.utc),
        subject=Subject(subject_id="mouse-1", species="Mus musculus", sex="M", age="P90D",
                        description="Synthetic test subject."),
    )
    series = mock_ElectricalSeries(nwbfile=nwbfile)

    table = ProvenanceTable(description="Stage runs that produced this file.")
    for record in _provenance_records():
        table.add_row(**record.as_row())
    nwbfile.create_processing_module("nwbflow", "nwbflow provenance.").add(table)

    motion = MotionEstimate(**_motion_arrays(), **MOTION_ATTRIBUTES,
                            source_electrical_series=series)
    nwbfile.create_processing_module("ecephys", "Processed ecephys.").add(motion)
    return nwbfile


@pytest.fixture(scope="module")
def nwb_path(tmp_path_factory) -> Path:
    """Path of the written test file (written once for the module)."""
    path = tmp_path_factory.mktemp("extension") / "roundtrip.nwb"
    with NWBHDF5IO(path, "w") as io:
        io.write(_build_nwbfile())
    return path


def test_provenance_columns_come_from_spec_in_order():
    assert PROVENANCE_COLUMNS == EXPECTED_COLUMNS
    assert tuple(col["name"] for col in ProvenanceTable.__columns__) == PROVENANCE_COLUMNS
    assert ext.NAMESPACE == NAMESPACE == "ndx-nwbflow"


def test_a_file_of_version_0_1_0_still_reads(tmp_path):
    """Files written before the columns of 0.2.0 (and MotionEstimate's source attributes) existed: their own
    cached spec is older; rows read as completed, with empty identifiers."""
    path = tmp_path / "v010.nwb"
    nwbfile = mock_NWBFile()
    module = nwbfile.create_processing_module("nwbflow", "provenance")
    table = ProvenanceTable(description="old")
    table.add_row(**{k: v for k, v in _provenance_records()[0].as_row().items() if k not in ADDED_COLUMNS})
    module.add(table)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    with h5py.File(path, "r") as handle:  # what 0.1.0 wrote: none of the added columns
        assert not set(ADDED_COLUMNS) & set(handle["processing/nwbflow/provenance"])
    with NWBHDF5IO(str(path), "r") as io:
        (row,) = read_provenance(io.read())
    assert (row["status"], row["error"], row["inputs"][0]["identifier"]) == ("completed", "", "")


def test_new_table_has_the_required_columns_and_no_rows():
    table = ProvenanceTable(description="empty")
    assert table.name == "provenance"
    assert tuple(table.colnames) == tuple(c for c in PROVENANCE_COLUMNS if c not in OPTIONAL_COLUMNS)
    assert len(table) == 0


def test_rows_without_any_output_leave_the_column_out_and_pass_nwbinspector(tmp_path):
    """A ragged column with no value at all crashes nwbinspector's table checks (its issue #712): when no
    stage put anything in the file, ``outputs`` is left out, and reads back as empty lists."""
    from nwbflow.nwb_io.results import add_provenance
    from nwbflow.nwb_io.validate import validate_file

    path = tmp_path / "no_outputs.nwb"
    nwbfile = mock_NWBFile()
    records = tuple(dataclasses.replace(r, outputs=()) for r in _provenance_records())
    add_provenance(nwbfile, records, path)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    with h5py.File(path, "r") as handle:
        assert "outputs" not in handle["processing/nwbflow/provenance"]
    with NWBHDF5IO(str(path), "r") as io:
        assert [row["outputs"] for row in read_provenance(io.read())] == [[]] * len(records)
    report = validate_file(path, ("nwbinspector",))
    assert report.not_run == () and not [f for f in report.findings if "Traceback" in f.message]


def test_import_twice_is_idempotent():
    reloaded = importlib.reload(ext)
    assert reloaded.ProvenanceTable is ProvenanceTable
    assert reloaded.MotionEstimate is MotionEstimate
    assert reloaded.PROVENANCE_COLUMNS == PROVENANCE_COLUMNS


def test_motion_rejects_wrong_shape():
    arrays = _motion_arrays()
    arrays["displacement"] = arrays["displacement"].ravel()
    with pytest.raises(ValueError, match="displacement"):
        MotionEstimate(**arrays, **MOTION_ATTRIBUTES)


def test_roundtrip_provenance(nwb_path):
    with NWBHDF5IO(nwb_path, "r") as io:
        table = io.read().processing["nwbflow"]["provenance"]
        assert isinstance(table, ProvenanceTable)
        assert set(table.colnames) == set(PROVENANCE_COLUMNS)
        assert table.description == "Stage runs that produced this file."
        assert len(table) == 2
        rows = read_provenance(io.read())
    for row, record in zip(rows, _provenance_records()):
        assert row["parameters"] == json.loads(record.parameters)
        assert row["inputs"] == list(record.inputs)
        assert row["outputs"] == list(record.outputs)
        for name in ("stage", "software", "software_version", "git_revision", "start_time_utc",
                     "end_time_utc", "host", "device", "flow_run_id", "task_run_id", "status", "error"):
            assert row[name] == getattr(record, name), name


def test_roundtrip_motion(nwb_path):
    expected = _motion_arrays()
    with NWBHDF5IO(nwb_path, "r") as io:
        nwbfile = io.read()
        motion = nwbfile.processing["ecephys"]["motion"]
        assert isinstance(motion, MotionEstimate)
        for name, values in expected.items():
            read = getattr(motion, name)
            assert read.dtype == values.dtype, name
            np.testing.assert_array_equal(read[:], values, err_msg=name)
        for name, value in MOTION_ATTRIBUTES.items():
            assert getattr(motion, name) == value, name
        assert motion.displacement__unit == "um"
        source = nwbfile.acquisition["ElectricalSeries"]
        assert motion.source_electrical_series is source


def test_file_layout_links_and_cached_namespace(nwb_path):
    with h5py.File(nwb_path, "r") as f:
        assert f"specifications/{NAMESPACE}/{build_spec.VERSION}" in f
        assert f[MOTION_PATH]["displacement"].attrs["unit"] == "um"
        link = f[MOTION_PATH].get("source_electrical_series", getlink=True)
        assert isinstance(link, h5py.SoftLink)
        assert link.path == "/acquisition/ElectricalSeries"
        assert f[PROVENANCE_PATH].attrs["neurodata_type"] == "ProvenanceTable"
        assert f[PROVENANCE_PATH].attrs["namespace"] == NAMESPACE


def test_pynwb_validation_passes(nwb_path):
    assert validate(path=str(nwb_path)) == []


def _concerns_us(message) -> bool:
    """Whether an nwbinspector message is about our types or their columns.

    nwbinspector 0.7.2 gives ``location=None`` for objects inside processing
    modules, so the object type and name are used as well as the location.
    """
    location = message.location or ""
    return (message.object_type in OUR_TYPES
            or location.startswith((PROVENANCE_PATH, MOTION_PATH))
            or (message.object_type in {"VectorData", "VectorIndex"}
                and message.object_name in PROVENANCE_COLUMNS))


def _serious_messages_about_us(nwb_path: Path, config_name: str | None) -> list[tuple]:
    """(importance, check, object, message) of each BEST_PRACTICE_VIOLATION or worse about us."""
    config = None if config_name is None else nwbinspector.load_config(config_name)
    messages = list(nwbinspector.inspect_nwbfile(nwbfile_path=nwb_path, config=config))
    for message in messages:
        logger.info("nwbinspector[%s] %s %s %s/%s: %s", config_name, message.importance.name,
                    message.check_function_name, message.object_type, message.object_name,
                    message.message)
    threshold = nwbinspector.Importance.BEST_PRACTICE_VIOLATION.value  # Importance is not ordered
    return [
        (m.importance.name, m.check_function_name, m.object_name, m.message)
        for m in messages
        if _concerns_us(m) and m.importance.value >= threshold
    ]


@pytest.mark.parametrize("config_name", [None, "dandi"])
def test_nwbinspector_finds_nothing_serious_in_our_types(nwb_path, config_name):
    assert _serious_messages_about_us(nwb_path, config_name) == []


def test_builder_regenerates_committed_yaml(tmp_path):
    written = build_spec.main(tmp_path)
    assert written == tmp_path / build_spec.NAMESPACE_FILE
    for name in (build_spec.NAMESPACE_FILE, build_spec.EXTENSIONS_FILE):
        committed = (build_spec.SPEC_DIR / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, (
            f"{name} is out of date: run `python -m nwbflow.extensions.build_spec`")
