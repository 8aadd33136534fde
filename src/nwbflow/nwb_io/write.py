"""Write-back: export the input session to a new, processed NWB file, atomically.

The input is opened read-only and never changed. The processed file is
exported under a temporary name beside the target, re-opened and validated
against the cached schema, fsynced, and only then renamed into place; the
directory is fsynced after the rename. A process killed at any instant
leaves the target either absent (or as it was) or complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pynwb
from hdmf.common import VectorData
from pynwb import NWBHDF5IO
from pynwb.event import EventsTable, TimestampVectorData

from nwbflow import __version__
from nwbflow.atomic import atomic_path, remove_stale_partials
from nwbflow.errors import BadInputError, NwbflowError, OutputWriteError
from nwbflow.extensions import NAMESPACE, MotionEstimate, ProvenanceTable
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.nwb_io.validate import validate_file

log = logging.getLogger(__name__)

_EXPORT_CONTEXT = multiprocessing.get_context("forkserver")
_EXPORT_CONTEXT.set_forkserver_preload([__name__])


@dataclass(frozen=True)
class PeaksForNwb:
    """Detected peaks to write as a core EventsTable (``processing/ecephys/peaks``).

    ``parquet_path`` holds columns time_s, channel_index, amplitude, x_um, y_um;
    ``electrical_series`` is the object path of the series they came from.
    """

    parquet_path: Path
    electrical_series: str
    sampling_rate_hz: float
    amplitude_unit: str


@dataclass(frozen=True)
class MotionForNwb:
    """A motion estimate to write as ``processing/ecephys/motion`` (ndx-nwbflow MotionEstimate).

    ``npz_path`` holds ``time_bins_s`` (T,), ``depth_bins_um`` (D,) and
    ``displacement_um`` (T, D) (observed depth = rest depth + displacement);
    ``electrical_series`` is the object path of the series it was estimated
    from (linked from the estimate); ``parameters_json`` the resolved parameters.
    """

    npz_path: Path
    electrical_series: str
    method: str
    parameters_json: str
    description: str


@dataclass(frozen=True)
class CalciumForNwb:
    """Inferred spike rates to write as ``processing/ophys/Deconvolved/inferred_spike_rate``.

    ``npy_path`` holds (num_frames, num_rois) float32 spike rates in Hz, one
    row per frame of ``roi_series`` (the object path of the RoiResponseSeries
    they were inferred from, whose clock and ROI rows the result shares);
    ``description`` names the method and the model checksum.
    """

    npy_path: Path
    roi_series: str
    description: str


@dataclass(frozen=True)
class UnitsForNwb:
    """Sorted units to write as the file's Units table (or ``processing/ecephys/units_nwbflow`` when the
    input already has one).

    ``spikes_path``: parquet with columns time_s (session clock, s) and unit (0..U-1);
    ``units_path``: npz with unit_channels (U, K) (columns of ``electrical_series``),
    waveform_mean_uv / waveform_sd_uv (U, T, K) µV, before (samples before the trough),
    sampling_rate_hz, and one (U,) array per name in ``metric_descriptions``.
    """

    spikes_path: Path
    units_path: Path
    electrical_series: str
    sorter: str
    metric_descriptions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SessionResults:
    """Everything one run adds to the processed file."""

    provenance: tuple[ProvenanceRecord, ...]
    peaks: PeaksForNwb | None = None
    motion: MotionForNwb | None = None
    calcium: CalciumForNwb | None = None
    units: UnitsForNwb | None = None
    extra_was_generated_by: tuple[tuple[str, str], ...] = field(default=())

    def files(self) -> list[Path]:
        """The work-directory files whose contents go into the processed file."""
        files = [self.peaks.parquet_path] if self.peaks else []
        files += [self.motion.npz_path] if self.motion else []
        files += [self.calcium.npy_path] if self.calcium else []
        files += [self.units.spikes_path, self.units.units_path] if self.units else []
        return files


def write_processed(input_path: str | Path, output_path: str | Path, results: SessionResults) -> Path:
    """Export ``input_path`` with ``results`` added to ``output_path``, atomically.

    The output gets a new object id and a new identifier, so DANDI sees it as
    its own asset. Returns the output path.
    """
    input_path, output_path = Path(input_path).resolve(), Path(output_path).absolute()
    check_target(input_path, output_path)
    remove_stale_partials(output_path)  # what a killed run left takes space too
    _check_free_space(input_path, output_path, results)
    try:
        with atomic_path(output_path, suffix=".nwb") as tmp_path:
            _export_in_child(input_path, tmp_path, results)
            _validate(tmp_path, output_path)
    except OSError as exc:  # disk full, quota, I/O error: the temporary is gone, the input untouched
        raise OutputWriteError(f"{output_path}: writing the processed file failed ({exc}); nothing was "
                               f"written there and the input is unchanged. Free space in {output_path.parent} "
                               "(or choose another output) and run again: finished stages are reused") from exc
    log.info("wrote %s", output_path)
    return output_path


def check_target(input_path: str | Path, output_path: str | Path) -> None:
    """BadInputError unless ``output_path`` can be written: its folder exists and is writable, not the input."""
    input_path, output_path = Path(input_path).resolve(), Path(output_path).absolute()
    if not output_path.parent.is_dir():
        raise BadInputError("output directory does not exist", path=output_path,
                            fix=f"create {output_path.parent} first")
    if not os.access(output_path.parent, os.W_OK | os.X_OK):
        raise BadInputError("output directory is not writable", path=output_path,
                            fix=f"choose an output in a folder you can write, or fix the permissions of "
                                f"{output_path.parent}")
    if output_path.exists() and output_path.samefile(input_path):
        raise BadInputError("output path is the input file; the input is never modified",
                            path=output_path, fix="choose another output path")


def _check_free_space(input_path: Path, output_path: Path, results: SessionResults) -> None:
    """OutputWriteError when the output's disk has clearly too little room, before anything is written.

    The need is estimated as the input's size (the export copies it) plus twice the result files (parquet and
    npz are denser than HDF5), plus 16 MiB of headroom.
    """
    need = input_path.stat().st_size + 2 * sum(Path(f).stat().st_size for f in results.files()) + (16 << 20)
    free = shutil.disk_usage(output_path.parent).free
    if free < need:
        raise OutputWriteError(f"{output_path}: not enough free space for the processed file: about "
                               f"{need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free in {output_path.parent}; "
                               "nothing was written and the input is unchanged. Free space (or choose another "
                               "output) and run again: finished stages are reused")


def _export_in_child(input_path: Path, tmp_path: Path, results: SessionResults) -> None:
    """``_export`` in a child process: HDF5 can abort its process when a write fails (a full disk during
    pynwb's export ends in 'double free or corruption'), which must fail this write, not the whole run.

    The child comes from a fork server that has the NWB stack imported, so each export starts in milliseconds
    after the first; an error raised in the child is raised here.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=_EXPORT_CONTEXT) as pool:
        try:
            pool.submit(_export, input_path, tmp_path, results).result()
        except BrokenProcessPool as exc:
            raise OSError(f"the export process died while writing {tmp_path.name} (HDF5 aborts on a failed "
                          "write, e.g. on a full disk)") from exc


def _export(input_path: Path, tmp_path: Path, results: SessionResults) -> None:
    with NWBHDF5IO(str(input_path), mode="r", load_namespaces=True) as src_io:
        try:
            nwbfile = src_io.read()
        except Exception as exc:  # pynwb raises many types for unreadable content
            raise BadInputError(f"pynwb cannot read this file for export ({type(exc).__name__}: {exc})",
                                path=input_path, fix="check the file with `pynwb.validate`") from exc
        _add_provenance(nwbfile, results.provenance, input_path)
        if results.peaks is not None:
            _add_peaks(nwbfile, results.peaks, input_path)
        if results.motion is not None:
            _add_motion(nwbfile, results.motion, input_path)
        if results.calcium is not None:
            _add_calcium(nwbfile, results.calcium, input_path)
        if results.units is not None:
            _add_units(nwbfile, results.units, input_path)
        _mark_generated_by(nwbfile, results.extra_was_generated_by)
        nwbfile.generate_new_id()
        # NWBFile.identifier has no setter; an exported asset needs its own identifier.
        nwbfile.fields["identifier"] = str(uuid.uuid4())
        nwbfile.set_modified()
        with NWBHDF5IO(str(tmp_path), mode="w") as out_io:
            out_io.export(src_io=src_io, nwbfile=nwbfile)


def _module(nwbfile: pynwb.NWBFile, name: str, description: str) -> pynwb.ProcessingModule:
    if name in nwbfile.processing:
        return nwbfile.processing[name]
    return nwbfile.create_processing_module(name=name, description=description)


def _refuse_existing(module: pynwb.ProcessingModule, name: str, input_path: Path) -> None:
    if name in module.data_interfaces:
        raise BadInputError("the input already holds this result (it looks processed already)",
                            path=input_path, obj=layout.object_path(module.name, name),
                            fix="run nwbflow on the raw session file")


def _add_provenance(nwbfile: pynwb.NWBFile, records: tuple[ProvenanceRecord, ...], input_path: Path) -> None:
    module = _module(nwbfile, layout.PROVENANCE_MODULE, layout.PROVENANCE_MODULE_DESCRIPTION)
    _refuse_existing(module, layout.PROVENANCE_TABLE, input_path)
    table = ProvenanceTable(name=layout.PROVENANCE_TABLE,
                            description="One row per nwbflow stage run that produced this file.")
    for record in records:
        table.add_row(**record.as_row())
    module.add(table)


def _add_peaks(nwbfile: pynwb.NWBFile, peaks: PeaksForNwb, input_path: Path) -> None:
    module = _module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
    _refuse_existing(module, layout.PEAKS, input_path)
    columns = pq.read_table(peaks.parquet_path,
                            columns=["time_s", "channel_index", "amplitude", "x_um", "y_um"])
    data = {name: columns[name].to_numpy() for name in columns.column_names}
    table = EventsTable(
        name=layout.PEAKS,
        description=f"Threshold-crossing peaks detected by nwbflow on {peaks.electrical_series} "
                    "after preprocessing; one row per peak.",
        source_description=f"nwbflow peak detection on {peaks.electrical_series}",
        columns=[
            TimestampVectorData(name="timestamp", description="Peak time on the session clock (s).",
                                data=data["time_s"].astype(np.float64),
                                resolution=1.0 / peaks.sampling_rate_hz),
            VectorData(name="channel_index", data=data["channel_index"].astype(np.int32),
                       description=f"Column of {peaks.electrical_series} where the peak is largest."),
            VectorData(name="amplitude", data=data["amplitude"].astype(np.float32),
                       description=f"Signed peak value ({peaks.amplitude_unit})."),
            VectorData(name="x_um", data=data["x_um"].astype(np.float32),
                       description="Estimated x position on the probe (µm)."),
            VectorData(name="y_um", data=data["y_um"].astype(np.float32),
                       description="Estimated y (depth) position on the probe (µm)."),
        ],
    )
    module.add(table)


def _add_motion(nwbfile: pynwb.NWBFile, motion: MotionForNwb, input_path: Path) -> None:
    module = _module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
    _refuse_existing(module, layout.MOTION, input_path)
    with np.load(motion.npz_path) as arrays:
        estimate = MotionEstimate(
            name=layout.MOTION, displacement=arrays["displacement_um"].astype(np.float32),
            time_bin_centers=arrays["time_bins_s"].astype(np.float64),
            depth_bin_centers=arrays["depth_bins_um"].astype(np.float64),
            method=motion.method, parameters=motion.parameters_json, direction="y",
            description=motion.description,
            source_electrical_series=_object_at(nwbfile, motion.electrical_series, input_path))
    module.add(estimate)


def _add_calcium(nwbfile: pynwb.NWBFile, calcium: CalciumForNwb, input_path: Path) -> None:
    """A RoiResponseSeries (Hz) in a core Fluorescence container named Deconvolved, on the source's clock and ROIs."""
    from pynwb.ophys import Fluorescence

    module = _module(nwbfile, layout.OPHYS_MODULE, layout.OPHYS_MODULE_DESCRIPTION)
    _refuse_existing(module, layout.DECONVOLVED, input_path)
    source = _object_at(nwbfile, calcium.roi_series, input_path)
    rates = np.load(calcium.npy_path)
    if rates.shape[0] != source.data.shape[0]:
        raise NwbflowError(f"{calcium.npy_path}: {rates.shape[0]} frames, but {calcium.roi_series} has "
                           f"{source.data.shape[0]}")
    rois = source.rois.table.create_roi_table_region(
        region=[int(i) for i in source.rois.data[:]], name="rois",
        description=f"The ROIs of {calcium.roi_series}, in the same order.")
    clock = ({"timestamps": source} if source.timestamps is not None
             else {"starting_time": source.starting_time, "rate": source.rate})
    container = Fluorescence(name=layout.DECONVOLVED)
    container.create_roi_response_series(name=layout.SPIKE_RATE, data=rates.astype(np.float32), unit="Hz",
                                         rois=rois, description=calcium.description, **clock)
    module.add(container)


def _add_units(nwbfile: pynwb.NWBFile, units: UnitsForNwb, input_path: Path) -> None:
    """A Units table as NeuroConv writes one: spike times (s), electrodes, µV waveforms, metric columns."""
    from pynwb.misc import Units

    spikes = pq.read_table(units.spikes_path, columns=["time_s", "unit"])
    times, labels = spikes["time_s"].to_numpy(), spikes["unit"].to_numpy()
    series = _object_at(nwbfile, units.electrical_series, input_path)
    electrode_rows = np.asarray(series.electrodes.data[:], dtype=np.int64)
    in_processing = nwbfile.units is not None
    if in_processing:
        module = _module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
        _refuse_existing(module, layout.UNITS_IN_PROCESSING, input_path)
    with np.load(units.units_path) as arrays:
        rate = float(arrays["sampling_rate_hz"])
        table = Units(name=layout.UNITS_IN_PROCESSING if in_processing else layout.UNITS,
                      description=f"{layout.UNITS_DESCRIPTION} ({units.sorter}) from {units.electrical_series}.",
                      electrode_table=nwbfile.electrodes, waveform_rate=rate, waveform_unit="microvolts",
                      waveform_time_before_peak_in_ms=float(arrays["before"]) * 1000.0 / rate, resolution=1.0 / rate)
        table.add_column("unit_name", "Name of the unit given by the sorter.")
        for name, description in units.metric_descriptions:
            table.add_column(name, description)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(arrays["unit_channels"]) + 1))
        for unit, channels in enumerate(arrays["unit_channels"]):
            table.add_unit(spike_times=np.sort(times[order[bounds[unit]:bounds[unit + 1]]]),
                           electrodes=electrode_rows[channels].tolist(),
                           waveform_mean=arrays["waveform_mean_uv"][unit].astype(np.float32),
                           waveform_sd=arrays["waveform_sd_uv"][unit].astype(np.float32),
                           unit_name=f"{units.sorter}_{unit}", id=unit,
                           **{name: float(arrays[name][unit]) for name, _ in units.metric_descriptions})
    if in_processing:
        module.add(table)
    else:
        nwbfile.units = table


def _object_at(nwbfile: pynwb.NWBFile, object_path: str, input_path: Path):
    """The container at an in-file path, e.g. ``acquisition/ElectricalSeries`` or ``processing/ecephys/LFP/X``.

    Containers know their name and parent, not their group path: the path's
    names after its top group are matched against each container's chain of
    names up to the file.
    """
    wanted = object_path.strip("/").split("/")[1:]
    for candidate in nwbfile.objects.values():
        chain, node = [], candidate
        while node is not None and node is not nwbfile:
            chain.append(node.name)
            node = node.parent
        if chain[::-1] == wanted:
            return candidate
    raise BadInputError("the series the results were computed from is not in the file", path=input_path,
                        obj=object_path)


def _mark_generated_by(nwbfile: pynwb.NWBFile, extra: tuple[tuple[str, str], ...]) -> None:
    existing = [] if nwbfile.was_generated_by is None else [
        [_text(a), _text(b)] for a, b in nwbfile.was_generated_by[:]]
    entries = existing + [[layout.SOFTWARE_NAME, __version__]] + [list(e) for e in extra]
    # The field is set-once on read containers; export writes whatever the field holds.
    nwbfile.fields["was_generated_by"] = entries


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _validate(tmp_path: Path, output_path: Path) -> None:
    blocking = validate_file(tmp_path, validators=("pynwb",)).blocking()
    if blocking:
        raise NwbflowError(f"{output_path}: the processed file fails NWB schema validation, so it was not written: "
                           + "; ".join(f"{f.location}: {f.message}" for f in blocking[:5]))
    with h5py.File(tmp_path, "r") as h5:
        if f"specifications/{NAMESPACE}" not in h5:
            raise NwbflowError(f"{output_path}: the ndx-nwbflow spec was not cached in the file")
