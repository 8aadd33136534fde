"""Build small NWB files the way real writers do, for reader tests.

pynwb writes the well-formed parts; ``edit_h5`` and ``replace_dataset`` then
make, with raw h5py, what pynwb refuses to write but other writers produce
(regions longer than the data columns, 1-based indices, zero rates, broken
timestamps, files without offsets or object ids).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from pathlib import Path

import h5py
import numpy as np
from pynwb import NWBHDF5IO, NWBFile
from pynwb.ecephys import LFP, ElectricalSeries
from pynwb.file import Subject
from pynwb.testing.mock.ophys import mock_RoiResponseSeries

SESSION_START = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def make_nwbfile(*, subject: bool = True, identifier: str = "nwbflow-test") -> NWBFile:
    """An empty NWBFile, with or without a Subject."""
    nwbfile = NWBFile(session_description="reader test", identifier=identifier,
                      session_start_time=SESSION_START)
    if subject:
        nwbfile.subject = Subject(subject_id="m1", species="Mus musculus", sex="M", age="P90D")
    return nwbfile


def probe_positions_um(num_electrodes: int) -> np.ndarray:
    """(num_electrodes, 2) µm: a two-column staggered probe, 16 µm apart, 20 µm pitch."""
    rows = np.arange(num_electrodes)
    return np.stack([16.0 * (rows % 2), 20.0 * (rows // 2)], axis=1)


def add_electrodes(nwbfile: NWBFile, num_electrodes: int, *, positions: bool = True) -> None:
    """Add a device, one electrode group and ``num_electrodes`` table rows."""
    device = nwbfile.create_device(name="probe", description="test probe")
    group = nwbfile.create_electrode_group(name="shank0", description="shank",
                                           location="CA1", device=device)
    xy = probe_positions_um(num_electrodes)
    for row in range(num_electrodes):
        extra = {"rel_x": xy[row, 0], "rel_y": xy[row, 1]} if positions else {}
        nwbfile.add_electrode(group=group, location="CA1", **extra)


def add_series(nwbfile: NWBFile, name: str, data: np.ndarray, *, rows=None,
               in_lfp: bool = False, **kwargs) -> ElectricalSeries:
    """Add an ElectricalSeries over electrode ``rows`` (default: the first columns).

    ``kwargs`` go to ElectricalSeries (rate, timestamps, conversion, offset,
    channel_conversion, starting_time). ``in_lfp`` puts it in
    ``processing/ecephys/LFP`` instead of acquisition.
    """
    rows = list(range(data.shape[1])) if rows is None else list(rows)
    region = nwbfile.create_electrode_table_region(rows, f"electrodes of {name}")
    series = ElectricalSeries(name=name, data=data, electrodes=region, **kwargs)
    if in_lfp:
        module = nwbfile.processing.get("ecephys") or nwbfile.create_processing_module(
            "ecephys", "processed extracellular data")
        lfp = LFP()
        module.add(lfp)
        lfp.add_electrical_series(series)
    else:
        nwbfile.add_acquisition(series)
    return series


def add_roi_series(nwbfile: NWBFile, num_frames: int = 40, num_rois: int = 3) -> None:
    """Add a Fluorescence-like RoiResponseSeries (50 Hz) under processing/ophys."""
    data = np.random.default_rng(0).random((num_frames, num_rois))
    mock_RoiResponseSeries(name="RoiResponseSeries", data=data, nwbfile=nwbfile)


def write(nwbfile: NWBFile, path: Path) -> Path:
    """Write ``nwbfile`` to ``path`` with pynwb and return the path."""
    with NWBHDF5IO(path, "w") as io:
        io.write(nwbfile)
    return path


def ephys_traces(num_samples: int = 3000, num_channels: int = 4, *, seed: int = 0,
                 dtype=np.int16) -> np.ndarray:
    """(num_samples, num_channels) random samples of ``dtype`` (ADC counts or volts)."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-2000, 2000, size=(num_samples, num_channels)).astype(dtype)
    return (rng.standard_normal((num_samples, num_channels)) * 50e-6).astype(dtype)


def write_ephys_file(path: Path, data: np.ndarray | None = None, *, num_electrodes=None,
                     rows=None, positions: bool = True, subject: bool = True,
                     name: str = "ElectricalSeries", **kwargs) -> Path:
    """One-series NWB file; ``kwargs`` as in :func:`add_series` (rate defaults to 30 kHz)."""
    data = ephys_traces() if data is None else data
    nwbfile = make_nwbfile(subject=subject)
    add_electrodes(nwbfile, num_electrodes or data.shape[1], positions=positions)
    if "timestamps" not in kwargs:
        kwargs.setdefault("rate", 30_000.0)
    add_series(nwbfile, name, data, rows=rows, **kwargs)
    return write(nwbfile, path)


@contextlib.contextmanager
def edit_h5(path: Path):
    """Open an NWB file for raw h5py edits (what pynwb refuses to write)."""
    with h5py.File(path, "r+") as handle:
        yield handle


def replace_dataset(group: h5py.Group, name: str, values) -> h5py.Dataset:
    """Replace ``group[name]`` by ``values``, keeping its attributes (e.g. ``table``)."""
    attrs = dict(group[name].attrs) if name in group else {}
    if name in group:
        del group[name]
    dataset = group.create_dataset(name, data=values)
    for key, value in attrs.items():
        dataset.attrs[key] = value
    return dataset


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
