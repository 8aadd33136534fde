"""What one run adds to the processed file, and how each result becomes NWB objects (names: ``layout``).

Per series (probe, imaging plane): peaks (a core EventsTable, optional), a motion estimate (ndx-nwbflow
MotionEstimate), inferred spike rates (a core RoiResponseSeries); for the session: one Units table with
every probe's units (an ``electrical_series`` column names each unit's source series, as NeuroConv
writes multi-probe sessions) and the provenance table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pynwb
from hdmf.common import VectorData
from pynwb.event import EventsTable, TimestampVectorData

from nwbflow import __version__
from nwbflow.errors import BadInputError, NwbflowError
from nwbflow.extensions import MotionEstimate, ProvenanceTable
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.provenance import ProvenanceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeaksForNwb:
    """Detected peaks of one series as a core EventsTable (``processing/ecephys/<name>``).

    ``parquet_path`` holds columns time_s, channel_index, amplitude, x_um, y_um;
    ``electrical_series`` is the object path of the series they came from.
    """

    parquet_path: Path
    electrical_series: str
    sampling_rate_hz: float
    amplitude_unit: str
    name: str = layout.PEAKS


@dataclass(frozen=True)
class MotionForNwb:
    """A motion estimate of one series as ``processing/ecephys/<name>`` (ndx-nwbflow MotionEstimate).

    ``npz_path`` holds ``time_bins_s`` (T,), ``depth_bins_um`` (D,) and ``displacement_um`` (T, D)
    (observed depth = rest depth + displacement); ``electrical_series`` is the object path of the series it
    was estimated from, named with the raw file's identifier (and linked when the file holds the series).
    """

    npz_path: Path
    electrical_series: str
    method: str
    parameters_json: str
    description: str
    name: str = layout.MOTION


@dataclass(frozen=True)
class CalciumForNwb:
    """Inferred spike rates of one ROI series as ``processing/ophys/Deconvolved/<name>``.

    ``npy_path`` holds (num_frames, num_rois) float32 spike rates in Hz, one row per frame of
    ``roi_series`` (the object path of the RoiResponseSeries they were inferred from, whose ROI rows the
    result shares, and its timestamps when it has them); ``frame_rate_hz`` is the frame rate the reader
    settled on (the series' own, or its ImagingPlane's when the series has none); ``description`` names
    the method and the model checksum.
    """

    npy_path: Path
    roi_series: str
    frame_rate_hz: float
    description: str
    name: str = layout.SPIKE_RATE


@dataclass(frozen=True)
class UnitsForNwb:
    """One series' sorted units, rows of the file's Units table.

    ``spikes_path``: parquet with columns time_s (session clock, s) and unit (0..U-1);
    ``units_path``: npz with unit_channels (U, K) (columns of ``electrical_series``),
    waveform_mean_uv / waveform_sd_uv (U, T, K) µV, before (samples before the trough),
    sampling_rate_hz, and one (U,) array per name in ``metric_descriptions``; ``label``
    prefixes the unit names when the session has several probes.
    """

    spikes_path: Path
    units_path: Path
    electrical_series: str
    sorter: str
    metric_descriptions: tuple[tuple[str, str], ...]
    label: str = ""


@dataclass(frozen=True)
class SessionResults:
    """Everything one run adds to the processed file."""

    provenance: tuple[ProvenanceRecord, ...]
    peaks: tuple[PeaksForNwb, ...] = ()
    motion: tuple[MotionForNwb, ...] = ()
    calcium: tuple[CalciumForNwb, ...] = ()
    units: tuple[UnitsForNwb, ...] = ()
    extra_was_generated_by: tuple[tuple[str, str], ...] = field(default=())

    def files(self) -> list[Path]:
        """The work-directory files whose contents go into the processed file."""
        return ([p.parquet_path for p in self.peaks] + [m.npz_path for m in self.motion]
                + [c.npy_path for c in self.calcium] + [f for u in self.units for f in (u.spikes_path, u.units_path)])


def add_results(nwbfile: pynwb.NWBFile, results: SessionResults, input_path: Path, source_identifier: str,
                electrode_rows: dict[str, np.ndarray]) -> None:
    """Add every result of ``results`` to a read NWBFile (``electrode_rows``: each sorted series' electrodes
    table rows, read before the series may have been dropped)."""
    add_provenance(nwbfile, results.provenance, input_path)
    for peaks in results.peaks:
        add_peaks(nwbfile, peaks, input_path)
    for motion in results.motion:
        add_motion(nwbfile, motion, input_path, source_identifier)
    if results.calcium:
        container = deconvolved(nwbfile, input_path)
        for calcium in results.calcium:
            add_calcium(nwbfile, container, calcium, input_path)
    if results.units:
        add_units(nwbfile, results.units, input_path, electrode_rows)
    mark_generated_by(nwbfile, results.extra_was_generated_by)


def module(nwbfile: pynwb.NWBFile, name: str, description: str) -> pynwb.ProcessingModule:
    if name in nwbfile.processing:
        return nwbfile.processing[name]
    return nwbfile.create_processing_module(name=name, description=description)


def _refuse_existing(where, name: str, input_path: Path, obj: str) -> None:
    if name in where:
        raise BadInputError("the input already holds this result (it looks processed already)",
                            path=input_path, obj=obj, fix="run nwbflow on the raw session file")


def add_provenance(nwbfile: pynwb.NWBFile, records: tuple[ProvenanceRecord, ...], input_path: Path) -> None:
    target = module(nwbfile, layout.PROVENANCE_MODULE, layout.PROVENANCE_MODULE_DESCRIPTION)
    _refuse_existing(target.data_interfaces, layout.PROVENANCE_TABLE, input_path, layout.PROVENANCE_PATH)
    table = ProvenanceTable(name=layout.PROVENANCE_TABLE,
                            description="One row per nwbflow stage run that produced this file.")
    rows = [record.as_row() for record in records]
    if not any(row["outputs"] for row in rows):  # a ragged column without a single value: left out (spec)
        for row in rows:
            del row["outputs"]
    for row in rows:
        table.add_row(**row)
    target.add(table)


def add_peaks(nwbfile: pynwb.NWBFile, peaks: PeaksForNwb, input_path: Path) -> None:
    target = module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
    _refuse_existing(target.data_interfaces, peaks.name, input_path, layout.object_path(target.name, peaks.name))
    columns = pq.read_table(peaks.parquet_path, columns=["time_s", "channel_index", "amplitude", "x_um", "y_um"])
    data = {name: columns[name].to_numpy() for name in columns.column_names}
    target.add(EventsTable(
        name=peaks.name,
        description=f"Threshold-crossing peaks detected by nwbflow on {peaks.electrical_series} "
                    "after preprocessing; one row per peak.",
        source_description=f"nwbflow peak detection on {peaks.electrical_series}",
        columns=[
            TimestampVectorData(name="timestamp", description="Peak time on the session clock (s).",
                                data=data["time_s"].astype(np.float64), resolution=1.0 / peaks.sampling_rate_hz),
            VectorData(name="channel_index", data=data["channel_index"].astype(np.int32),
                       description=f"Column of {peaks.electrical_series} where the peak is largest."),
            VectorData(name="amplitude", data=data["amplitude"].astype(np.float32),
                       description=f"Signed peak value ({peaks.amplitude_unit})."),
            VectorData(name="x_um", data=data["x_um"].astype(np.float32),
                       description="Estimated x position on the probe (µm)."),
            VectorData(name="y_um", data=data["y_um"].astype(np.float32),
                       description="Estimated y (depth) position on the probe (µm)."),
        ]))


def add_motion(nwbfile: pynwb.NWBFile, motion: MotionForNwb, input_path: Path, source_identifier: str) -> None:
    """The estimate, naming its series by the raw file's identifier and object path (and linking it when the
    processed file holds it)."""
    target = module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
    _refuse_existing(target.data_interfaces, motion.name, input_path, layout.object_path(target.name, motion.name))
    source = object_at(nwbfile, motion.electrical_series)
    with np.load(motion.npz_path) as arrays:
        target.add(MotionEstimate(
            name=motion.name, displacement=arrays["displacement_um"].astype(np.float32),
            time_bin_centers=arrays["time_bins_s"].astype(np.float64),
            depth_bin_centers=arrays["depth_bins_um"].astype(np.float64),
            method=motion.method, parameters=motion.parameters_json, direction="y", description=motion.description,
            source_file_identifier=source_identifier, source_object_path=motion.electrical_series,
            source_electrical_series=source))


def deconvolved(nwbfile: pynwb.NWBFile, input_path: Path):
    """The container of the inferred spike rates: ``processing/ophys/Deconvolved``, a core Fluorescence
    container (one a writer left there is shared, unless it holds our results already: processed input)."""
    from pynwb.ophys import Fluorescence

    target = module(nwbfile, layout.OPHYS_MODULE, layout.OPHYS_MODULE_DESCRIPTION)
    container = target.data_interfaces.get(layout.DECONVOLVED)
    if container is None:
        container = Fluorescence(name=layout.DECONVOLVED)
        target.add(container)
    ours = [name for name in container.roi_response_series if name.startswith(layout.SPIKE_RATE)]
    _refuse_existing(ours[:1], ours[0] if ours else "", input_path, layout.OPHYS_RESULTS)
    return container


def add_calcium(nwbfile: pynwb.NWBFile, container, calcium: CalciumForNwb, input_path: Path) -> None:
    """A RoiResponseSeries (Hz) in ``container`` (:func:`deconvolved`), on the source's clock and ROIs."""
    source = object_at(nwbfile, calcium.roi_series)
    if source is None:
        raise BadInputError("the series the results were computed from is not in the file", path=input_path,
                            obj=calcium.roi_series)
    rates = np.load(calcium.npy_path)
    rows = [int(i) for i in source.rois.data[:]]
    if rates.ndim != 2 or rates.shape[1] != len(rows) or rates.shape[0] not in source.data.shape[:2]:
        raise NwbflowError(f"{calcium.npy_path}: shape {rates.shape} fits neither the {len(rows)} ROIs nor the "
                           f"frames of {calcium.roi_series} (data {source.data.shape})")
    rois = source.rois.table.create_roi_table_region(
        region=rows, name="rois", description=f"The ROIs of {calcium.roi_series}, in the same order.")
    start = source.starting_time if source.starting_time is not None and np.isfinite(source.starting_time) else 0.0
    clock = ({"timestamps": source} if source.timestamps is not None
             else {"starting_time": start, "rate": calcium.frame_rate_hz})
    container.create_roi_response_series(name=calcium.name, data=rates.astype(np.float32), unit="Hz",
                                         rois=rois, description=calcium.description, **clock)


def add_units(nwbfile: pynwb.NWBFile, units: tuple[UnitsForNwb, ...], input_path: Path,
              electrode_rows: dict[str, np.ndarray]) -> None:
    """One Units table as NeuroConv writes a multi-probe session: spike times (s), electrodes, µV waveforms,
    metric columns, and the source series of each unit (``electrical_series``)."""
    from pynwb.misc import Units

    in_processing = nwbfile.units is not None
    if in_processing:
        target = module(nwbfile, layout.ECEPHYS_MODULE, layout.ECEPHYS_MODULE_DESCRIPTION)
        _refuse_existing(target.data_interfaces, layout.UNITS_IN_PROCESSING, input_path, layout.units_path(True))
    loaded = [(u, dict(np.load(u.units_path))) for u in units]
    rates = {float(arrays["sampling_rate_hz"]) for _, arrays in loaded}
    first = loaded[0][1]
    rate = float(first["sampling_rate_hz"])
    shape = tuple(max(arrays["waveform_mean_uv"].shape[i] for _, arrays in loaded) for i in (1, 2))
    series_names = ", ".join(u.electrical_series for u in units)
    table = Units(name=layout.UNITS_IN_PROCESSING if in_processing else layout.UNITS,
                  description=f"{layout.UNITS_DESCRIPTION} ({', '.join(sorted({u.sorter for u in units}))}) "
                              f"from {series_names}.",
                  electrode_table=nwbfile.electrodes, resolution=1.0 / max(rates), waveform_unit="microvolts",
                  **({"waveform_rate": rate, "waveform_time_before_peak_in_ms": float(first["before"]) * 1000.0 / rate}
                     if len(rates) == 1 else {}))
    if len(rates) > 1:
        log.warning("the probes are sampled at different rates (%s Hz): the units table gives no single "
                    "waveform_rate", sorted(rates))
    table.add_column("unit_name", "Name of the unit given by the sorter.")
    table.add_column(layout.UNITS_SERIES_COLUMN, "Object path of the ElectricalSeries the unit was sorted from.")
    for name, description in units[0].metric_descriptions:
        table.add_column(name, description)
    unit_id = 0
    for source, arrays in loaded:
        spikes = pq.read_table(source.spikes_path, columns=["time_s", "unit"])
        times, labels = spikes["time_s"].to_numpy(), spikes["unit"].to_numpy()
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(arrays["unit_channels"]) + 1))
        prefix = f"{source.label}_" if source.label else ""
        for unit, channels in enumerate(arrays["unit_channels"]):
            table.add_unit(spike_times=np.sort(times[order[bounds[unit]:bounds[unit + 1]]]),
                           electrodes=electrode_rows[source.electrical_series][channels].tolist(),
                           waveform_mean=_padded(arrays["waveform_mean_uv"][unit], shape),
                           waveform_sd=_padded(arrays["waveform_sd_uv"][unit], shape),
                           unit_name=f"{prefix}{source.sorter}_{unit}", id=unit_id,
                           electrical_series=source.electrical_series,
                           **{name: float(arrays[name][unit]) for name, _ in source.metric_descriptions})
            unit_id += 1
    if in_processing:
        target.add(table)
    else:
        nwbfile.units = table


def _padded(waveform: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (T, K) waveform as float32 of ``shape``, NaN where another probe's units are longer or wider (the
    column is one rectangular dataset; each unit's electrodes say how many of its columns are real)."""
    out = np.full(shape, np.nan, np.float32)
    out[:waveform.shape[0], :waveform.shape[1]] = waveform
    return out


def object_at(nwbfile: pynwb.NWBFile, object_path: str):
    """The container at an in-file path (``acquisition/ElectricalSeries``, ``processing/ecephys/LFP/X``), or None.

    Containers know their name and parent, not their group path: the path's names after its top group
    are matched against each container's chain of names up to the file.
    """
    wanted = object_path.strip("/").split("/")[1:]
    for candidate in nwbfile.objects.values():
        chain, node = [], candidate
        while node is not None and node is not nwbfile:
            chain.append(node.name)
            node = node.parent
        if chain[::-1] == wanted and node is nwbfile:
            return candidate
    return None


def mark_generated_by(nwbfile: pynwb.NWBFile, extra: tuple[tuple[str, str], ...]) -> None:
    existing = [] if nwbfile.was_generated_by is None else [
        [_text(a), _text(b)] for a, b in nwbfile.was_generated_by[:]]
    entries = existing + [[layout.SOFTWARE_NAME, __version__]] + [list(e) for e in extra]
    # The field is set-once on read containers; export writes whatever the field holds.
    nwbfile.fields["was_generated_by"] = entries


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
