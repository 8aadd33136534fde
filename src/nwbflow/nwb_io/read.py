"""Open NWB sessions read-only and read their recordings lazily, in chunks.

This is the only code that reads NWB sessions. It works at the HDF5 level
(h5py, no pynwb), finding objects by their ``neurodata_type`` attribute and the
type hierarchy cached in the file, so files from pynwb 1.x-4.x, MatNWB,
NeuroConv, AllenSDK and C++ writers (NWB schema 2.0b-2.11, including versions
newer than the installed pynwb) all read. The input is never written.

Every problem with the input raises :class:`nwbflow.errors.BadInputError`
naming the file, the NWB object and the fix, corrupt bytes included (h5py's
errors are turned into it where the reader looks: ``_hdf5.decoding``). Opening
a series checks its layout; the values are checked on the one full read, the
content hash (NaN or infinities in an ElectricalSeries, infinities or an
all-NaN ROI in a RoiResponseSeries, flat data). Nothing is silently guessed
but two documented fallbacks, each logged as a warning: channel positions,
when the electrodes table has neither rel_x/rel_y nor AllenSDK's
probe_horizontal_position/probe_vertical_position, are a vertical line in
data-column order (x = 0 µm, y = 0, 20, 40, ... µm; ``positions_are_fallback``);
NaN in ROI traces marks missing frames (gaps the calcium stage interpolates).

Examples
--------
>>> with open_session("session.nwb") as session:            # doctest: +SKIP
...     series = session.select_ephys()
...     traces_uv = series.get_traces(0, 30_000)          # (30000, num_channels) float32
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from nwbflow.cpu_threads import default_threads
from nwbflow.errors import BadInputError
from nwbflow.nwb_io import _hdf5, _series, roles
from nwbflow.nwb_io._chunks import StoredChunks, decodable

log = logging.getLogger(__name__)

ELECTRODES_TABLE = "general/extracellular_ephys/electrodes"
#: ``content_hash`` reads ``data`` in blocks of about this many bytes.
HASH_BLOCK_BYTES = 32 << 20
SELECT_FIX = "pass `electrical_series` with the object path of the series to process"


def open_session(path: str | Path, *, decode_threads: int | None = None) -> NwbSession:
    """Open an NWB file read-only; use as a context manager.

    Parameters
    ----------
    path : the NWB 2.x HDF5 file.
    decode_threads : threads that inflate a compressed series' chunks at once (default: this run's share
        of the cores, :func:`nwbflow.cpu_threads.default_threads`; a stage passes its policy's threads).

    Raises
    ------
    BadInputError
        Missing file, not a file, not HDF5, HDF5 but not NWB 2, truncated or corrupt.

    Examples
    --------
    >>> open_session("no/such/session.nwb")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nwbflow.errors.BadInputError: no/such/session.nwb: file not found. Fix: check the path...
    """
    return NwbSession(path, decode_threads=decode_threads)


def describe(path: str | Path) -> dict:
    """Summarise what a file holds, for command-line messages.

    Returns
    -------
    dict with ``path``, ``identifier``, ``object_id``, ``nwb_version``,
    ``electrical_series`` and ``roi_response_series`` (lists of dicts with
    ``object_path``, ``neurodata_type``, ``shape``, ``dtype``, ``rate_hz`` and
    ``problem``: None, or why the series cannot be read) and ``raw_band_series``
    (the object paths of the probes' raw bands a run processes).
    """
    with open_session(path) as session:
        summary = {"path": str(session.path), "identifier": session.identifier,
                   "object_id": session.object_id, "nwb_version": session.nwb_version,
}
        for key, paths, rate_of in (
                ("electrical_series", session.ephys_paths(),
                 lambda p: session.ephys_series(p).sampling_rate_hz),
                ("roi_response_series", session.roi_paths(),
                 lambda p: session.roi_info(p).rate_hz)):
            summary[key] = [_summary(session, p, rate_of) for p in paths]
        summary["raw_band_series"] = roles.raw_band_paths(session)[0]
    return summary


def _summary(session: NwbSession, object_path: str, rate_of) -> dict:
    """One describe() entry; ``rate_of(object_path)`` opens and checks the series."""
    with _hdf5.decoding(session.path, object_path):
        data = session._group(object_path).get("data")
        entry = {"object_path": object_path, "neurodata_type": session._types[object_path],
                 "shape": tuple(getattr(data, "shape", ())),
                 "dtype": str(getattr(data, "dtype", "")), "rate_hz": None, "problem": None}
    try:
        entry["rate_hz"] = rate_of(object_path)
    except BadInputError as exc:
        entry["problem"] = exc.message
    return entry


@dataclass(frozen=True)
class RoiSeriesInfo:
    """One RoiResponseSeries (fluorescence, ΔF/F, ...).

    Attributes
    ----------
    object_path : e.g. "processing/ophys/Fluorescence/RoiResponseSeries".
    shape : shape of ``data``, (num_frames,) or (num_frames, num_rois).
    num_frames, num_rois : frames (time points) and ROIs (columns).
    rate_hz : frame rate in Hz (1 / median interval when timestamped).
    starting_time_s : time of frame 0 in seconds on the session clock.
    has_timestamps : whether the series stores timestamps instead of a rate.
    roi_indices : (num_rois,) int64 rows of the PlaneSegmentation table.
    rois_table_path : object path of that PlaneSegmentation.
    unit : ``data@unit`` as written.
    conversion, offset : ``data@conversion`` and ``data@offset`` (values read are data * conversion + offset).
    rate_source : "series", or "imaging_plane" when the rate is the ImagingPlane's ``imaging_rate`` (the
        series had no usable rate nor timestamps).
    irregular : how its timestamps stray from a regular clock (gaps, jitter), or "".
    transposed : the data is stored (ROIs, frames) (optinist writes it so); ``shape`` is as stored,
        ``num_frames`` and ``num_rois`` as meant, and traces are read (frames, ROIs).
    """

    object_path: str
    shape: tuple[int, ...]
    num_frames: int
    num_rois: int
    rate_hz: float
    starting_time_s: float
    has_timestamps: bool
    roi_indices: np.ndarray
    rois_table_path: str
    unit: str
    conversion: float = 1.0
    offset: float = 0.0
    rate_source: str = "series"
    irregular: str = ""
    transposed: bool = False


class NwbSession:
    """An NWB file opened read-only (no HDF5 file locking).

    Attributes
    ----------
    path : the file.
    identifier : the file's ``identifier``.
    object_id : the NWBFile's object id ("" for files written before object ids).
    nwb_version : the NWB schema version the file declares (e.g. "2.7.0").
    """

    def __init__(self, path: str | Path, *, decode_threads: int | None = None):
        self.path = Path(path).expanduser()
        self._h5: h5py.File | None = _hdf5.open_hdf5(self.path)
        self._readers: list[StoredChunks] = []
        self._decode_threads = decode_threads or default_threads()
        try:
            with _hdf5.decoding(self.path):
                self.nwb_version = _hdf5.nwb_version_of(self._h5, self.path)
                self.identifier = self._root_text("identifier")
                self.object_id = _hdf5.attr_text(self._h5, "object_id")
                self._tree = _hdf5.TypeTree.from_file(self._h5)
                self._types = _hdf5.typed_groups(self._h5, self.path)
        except BaseException:
            self.close()
            raise
        log.debug("Opened %s (NWB %s, identifier %r)", self.path, self.nwb_version,
                  self.identifier)

    def __enter__(self) -> NwbSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the file has been closed (series of this session can no longer read)."""
        return self._h5 is None

    def close(self) -> None:
        """Close the file (and the readers of its chunks); idempotent."""
        while self._readers:
            self._readers.pop().close()
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def ephys_paths(self) -> list[str]:
        """Object paths of every continuous ElectricalSeries (SpikeEventSeries excluded)."""
        return self._paths_of("ElectricalSeries", exclude="SpikeEventSeries")

    def roi_paths(self) -> list[str]:
        """Object paths of every RoiResponseSeries (and subtype)."""
        return self._paths_of("RoiResponseSeries")

    def electrical_series(self) -> list[EphysSeries]:
        """Every ElectricalSeries (and subtype) in the file, acquisition first.

        SpikeEventSeries (waveform snippets, not a continuous recording) are
        left out. Each is checked on creation: BadInputError if any is malformed
        (use ``select_ephys`` to open only the one you need).
        """
        return [EphysSeries(self, object_path) for object_path in self.ephys_paths()]

    def ephys_series(self, object_path: str) -> EphysSeries:
        """The ElectricalSeries at ``object_path`` (e.g. "acquisition/ElectricalSeries")."""
        object_path = object_path.strip("/")
        candidates = self.ephys_paths()
        if object_path not in candidates:
            found = self._types.get(object_path)
            what = f"is of type {found}, not ElectricalSeries" if found else "does not exist"
            raise BadInputError(f"{what}; ElectricalSeries in this file: "
                                f"{', '.join(candidates) or 'none'}", path=self.path,
                                obj=object_path, fix=SELECT_FIX)
        return EphysSeries(self, object_path)

    def roi_response_series(self) -> list[RoiSeriesInfo]:
        """Every RoiResponseSeries (and subtype) with its shape, rate and ROI region."""
        return [self.roi_info(object_path) for object_path in self.roi_paths()]

    def roi_info(self, object_path: str) -> RoiSeriesInfo:
        """Describe and check the RoiResponseSeries at ``object_path``.

        Raises BadInputError for malformed data, clock or ``rois`` region, and
        for ROIs that are not told apart: a region naming one table row twice,
        or rows sharing an id.
        """
        object_path = object_path.strip("/")
        with _hdf5.decoding(self.path, object_path):
            group = self._group(object_path)
            data, frames, rois = _hdf5.series_data(group, path=self.path, obj=object_path,
                                                   columns="rois")
            indices, table = _hdf5.region_indices(group, "rois", path=self.path, obj=object_path,
                                                  default_table=None)
            transposed = _series.roi_data_transposed(indices.size, data.shape, path=self.path, obj=object_path)
            if transposed:
                frames, rois = rois, frames
                _series.warn_once(self.path, object_path, "transposed", "%s: %s: data is stored (ROIs, frames) = "
                                  "%s, the transpose of NWB's (frames, ROIs); read as such", self.path, object_path,
                                  data.shape)
            _hdf5.check_distinct_rows(table, indices, path=self.path, obj=f"{object_path}/rois")
            clock, rate_source = self._roi_clock(group, frames, table, object_path)
            conversion, offset = _series.conversion_offset(data, path=self.path, obj=object_path)
            return RoiSeriesInfo(object_path, tuple(data.shape), frames, rois, clock.rate_hz,
                                 clock.starting_time_s, clock.timestamps is not None, indices,
                                 table.name.lstrip("/"), _hdf5.attr_text(data, "unit"), conversion, offset,
                                 rate_source, clock.irregular, transposed)

    def _roi_clock(self, group: h5py.Group, frames: int, table: h5py.HLObject,
                   object_path: str) -> tuple[_series.Clock, str]:
        """The series' clock and where its rate came from: "series", or "imaging_plane" when the series has
        no usable rate nor timestamps (CaImAn writes rate 0) and its ImagingPlane says ``imaging_rate``."""
        try:
            return _series.read_clock(group, frames, path=self.path, obj=object_path), "series"
        except BadInputError as exc:
            rate = _series.imaging_rate_hz(table) if "timestamps" not in group else None
            if rate is None:
                raise
            _series.warn_once(self.path, object_path, "imaging_rate", "%s: %s: %s; using its ImagingPlane's "
                              "imaging_rate, %g Hz", self.path, object_path, exc.message, rate)
            start = np.asarray(group["starting_time"][()]).reshape(-1) if "starting_time" in group else [0.0]
            start_s = float(start[0]) if len(start) == 1 and np.isfinite(float(start[0])) else 0.0
            return _series.Clock(rate, start_s, None), "imaging_plane"

    def read_roi_traces(self, object_path: str, start_frame: int = 0,
                        end_frame: int | None = None) -> np.ndarray:
        """Frames ``[start_frame, end_frame)`` of a RoiResponseSeries.

        Returns
        -------
        (num_frames, num_rois) float32 in the series' unit (``RoiSeriesInfo.unit``),
        ``data * conversion + offset`` applied.
        """
        info = self.roi_info(object_path)
        end_frame = info.num_frames if end_frame is None else end_frame
        start, end = _series.check_range(start_frame, end_frame, info.num_frames)
        data = self._group(info.object_path)["data"]
        values = self._frames(info, data, slice(start, end)).reshape(end - start, info.num_rois).astype(np.float64)
        values *= info.conversion
        values += info.offset
        return values.astype(np.float32)

    def _frames(self, info: RoiSeriesInfo, data: h5py.Dataset, frames: slice) -> np.ndarray:
        """Stored values of ``frames``, (frames, ROIs) however the series is stored."""
        if info.transposed:
            return _series.read(data, (slice(None), frames), path=self.path, obj=info.object_path).T
        return _series.read(data, frames, path=self.path, obj=info.object_path)

    def select_roi(self, object_path: str | None = None, exclude: tuple[str, ...] = ()) -> RoiSeriesInfo:
        """A RoiResponseSeries: the one at ``object_path``; with None, the ROI traces of the file's only
        segmentation, chosen by role (:func:`nwbflow.nwb_io.roles.rois_to_process`), outside the ``exclude``
        object-path prefixes (e.g. earlier nwbflow results).

        Raises
        ------
        BadInputError
            ``object_path`` is not a RoiResponseSeries; or, with None, no traces, an ambiguous segmentation,
            or several segmentations (each message lists the candidates).
        """
        if object_path is None:
            choices = roles.rois_to_process(self, exclude=exclude)
            if len(choices) > 1:
                raise BadInputError(f"{len(choices)} segmentations' ROI traces to choose from: "
                                    f"{', '.join(c.traces for c in choices)}", path=self.path, fix=roles.ROI_FIX)
            return self.roi_info(choices[0].traces)
        object_path = object_path.strip("/")
        paths = self.roi_paths()
        if object_path not in paths:
            found = self._types.get(object_path)
            what = f"is of type {found}, not RoiResponseSeries" if found else "does not exist"
            raise BadInputError(f"{what}; RoiResponseSeries in this file: {', '.join(paths) or 'none'}",
                                path=self.path, obj=object_path, fix=roles.ROI_FIX)
        return self.roi_info(object_path)

    def roi_content_hash(self, object_path: str) -> str:
        """``"sha256:<hex>"`` of a RoiResponseSeries' data (dtype, shape, raw bytes), read in blocks.

        Also checks every value on the way: BadInputError at the first
        infinity, when a ROI holds no finite value, or when every ROI is flat;
        NaN (missing frames) is allowed and counted in a logged warning.
        """
        info = self.roi_info(object_path)
        data = self._group(info.object_path)["data"]
        scan = _series.ValueScan(info.num_rois, "frame", "ROI column", nan_is_gap=True, path=self.path,
                                 obj=f"{info.object_path}/data")
        digest = _series.content_hash(data, lambda rows: self._frames(info, data, rows), scan, HASH_BLOCK_BYTES,
                                      transposed=info.transposed)
        scan.finish()
        scan.check_scaled(info.conversion, info.offset, info.unit or "(unit)")
        return digest

    def select_ephys(self, object_path: str | None = None) -> EphysSeries:
        """An ElectricalSeries: the one at ``object_path``; with None, the file's only raw band (sampled at
        >= ``roles.RAW_BAND_MIN_RATE_HZ``, 10 kHz: e.g. SpikeGLX AP rather than LF).

        Raises
        ------
        BadInputError
            No ElectricalSeries; ``object_path`` is not one; or, with None, no or several raw-band
            series (the message lists every candidate); a series' own problem (e.g. a rate of 0).
        """
        if object_path is not None:
            return self.ephys_series(object_path)
        raw = roles.ephys_to_process(self, None)
        if len(raw) == 1:
            return EphysSeries(self, raw[0])
        listing = "; ".join(f"{p} ({self.nominal_rate_hz(p)})" for p in raw)
        raise BadInputError(f"{len(raw)} ElectricalSeries are sampled at >= {roles.RAW_BAND_MIN_RATE_HZ:g} Hz "
                            f"(raw band), so none can be chosen; candidates: {listing}", path=self.path,
                            fix=SELECT_FIX)

    def neurodata_types(self) -> dict[str, str]:
        """Every typed group: object path -> neurodata_type."""
        return dict(self._types)

    def is_a(self, object_path: str, base: str) -> bool:
        """Whether the group at ``object_path`` is of neurodata type ``base`` (or extends it)."""
        return self._tree.is_a(self._types.get(object_path.strip("/"), ""), base)

    def nominal_rate_hz(self, object_path: str) -> float | str:
        """Rate (Hz) from ``starting_time@rate`` or the first timestamps (cheap, unchecked); a problem as text."""
        try:
            group = self._group(object_path)
            if isinstance(group.get("timestamps"), h5py.Dataset):
                return 1.0 / _series.head_median_interval(group["timestamps"])
            return _hdf5.attr_float(group["starting_time"], "rate", float("nan"))
        except (ZeroDivisionError, *_hdf5.H5_ERRORS) as exc:
            return f"rate unknown: {exc}"

    def _paths_of(self, base: str, exclude: str | None = None) -> list[str]:
        paths = [p for p, t in self._types.items() if self._tree.is_a(t, base)
                 and not (exclude and self._tree.is_a(t, exclude))]
        return sorted(paths, key=lambda p: (not p.startswith("acquisition/"), p))

    def _chunk_reader(self, dataset: h5py.Dataset, obj: str) -> StoredChunks | None:
        """A reader of ``dataset``'s stored chunks (closed with the session), or None where h5py must read it."""
        if not decodable(dataset):
            return None
        reader = StoredChunks(dataset, threads=self._decode_threads, path=self.path, obj=obj)
        self._readers.append(reader)
        return reader

    def _check_open(self) -> None:
        if self._h5 is None:
            raise RuntimeError(f"the NwbSession of {self.path} is closed; read its series "
                               "inside the `with open_session(...)` block")

    def _group(self, object_path: str) -> h5py.Group:
        self._check_open()
        with _hdf5.decoding(self.path, object_path):
            return self._h5[object_path]

    def _root_text(self, name: str) -> str:
        if isinstance(self._h5.get(name), h5py.Dataset):
            return _hdf5.text(self._h5[name][()])
        log.warning("%s has no root '%s' dataset", self.path, name)
        return ""


class EphysSeries:
    """One ElectricalSeries, read lazily; valid while its session is open.

    Attributes
    ----------
    file_path : the NWB file.
    object_path : e.g. "acquisition/ElectricalSeries".
    num_samples, num_channels : rows and columns of ``data``.
    electrode_indices : (num_channels,) int64 rows of the electrodes table.
    channel_positions_um : (num_channels, 2) float64 (x, y) in µm from the
        electrodes table's rel_x/rel_y (or AllenSDK's probe_horizontal_position/
        probe_vertical_position); when missing or not finite, a vertical line
        (x = 0, y = 0, 20, 40 ... µm) with a logged warning.
    positions_are_fallback : True when the fallback positions are used.
    inter_sample_shift : (num_channels,) float64 or None
        Each channel's ADC sampling delay (fractions of a sample) from the electrodes table's
        ``inter_sample_shift`` (NeuroConv writes it for Neuropixels), or None.
    shank_ids : (num_channels,) str or None
        Each channel's shank: the electrodes' ``shank_ids`` / ``shank_id`` / ``shank`` column, else their
        electrode group; None when all channels share one.
    gains_uv : (num_channels,) float64 µV per raw unit
        (conversion * channel_conversion * 1e6 for data in volts).
    offset_uv : float, µV added after the gain (offset * 1e6).
    """

    def __init__(self, session: NwbSession, object_path: str):
        self._session, self.file_path, self.object_path = session, session.path, object_path
        with _hdf5.decoding(self.file_path, object_path):
            self._check(session._group(object_path))
        self._chunks = session._chunk_reader(self._data, f"{object_path}/data")
        self._hash: str | None = None

    def _check(self, group: h5py.Group) -> None:
        """Read and check data, electrodes region, scaling, clock and positions."""
        where = {"path": self.file_path, "obj": self.object_path}
        self._data, self.num_samples, self.num_channels = _hdf5.series_data(
            group, columns="channels", **where)
        self.electrode_indices, table = _hdf5.region_indices(
            group, "electrodes", default_table=ELECTRODES_TABLE, **where)
        _series.check_columns(self.electrode_indices.size, self._data.shape, "electrodes",
                              "channels", **where)
        self.gains_uv, self.offset_uv = _series.scaling_uv(group, self._data,
                                                           self.num_channels, **where)
        self._gains_uv_f32 = self.gains_uv.astype(np.float32)  # traces are computed in float32, as SpikeInterface
        self._clock = _series.read_clock(group, self.num_samples, **where)
        self.channel_positions_um, self.positions_are_fallback = _series.positions_um(
            table, self.electrode_indices, **where)
        self.inter_sample_shift = _series.sample_shifts(table, self.electrode_indices, **where)
        self.shank_ids = _series.shank_labels(table, self.electrode_indices, **where)

    def __repr__(self) -> str:
        return (f"EphysSeries({self.file_path}:{self.object_path}, {self.num_samples} x "
                f"{self.num_channels}, {self.sampling_rate_hz:g} Hz)")

    @property
    def sampling_rate_hz(self) -> float:
        """Sampling rate in Hz (1 / median interval when timestamped)."""
        return self._clock.rate_hz

    @property
    def starting_time_s(self) -> float:
        """Time of sample 0 in seconds on the session clock."""
        return self._clock.starting_time_s

    @property
    def has_timestamps(self) -> bool:
        """Whether the series stores timestamps instead of a rate."""
        return self._clock.timestamps is not None

    @property
    def irregular(self) -> str:
        """How the timestamps stray from a regular clock (gaps, jitter), or ""."""
        return self._clock.irregular

    @property
    def timestamps_s(self):
        """The timestamps dataset (s; 1-D, sliceable, read lazily while the session is open), or None."""
        return self._clock.timestamps

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype of ``data`` (e.g. int16)."""
        return self._data.dtype

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        """Samples ``[start_sample, end_sample)`` in microvolts.

        Returns
        -------
        (end_sample - start_sample, num_channels) float32 µV, i.e.
        ``(data * conversion * channel_conversion[ch] + offset) * 1e6``.
        """
        start, end = _series.check_range(start_sample, end_sample, self.num_samples)
        raw = self._read(slice(start, end)).reshape(end - start, self.num_channels)
        traces = raw.astype(np.float32)
        traces *= self._gains_uv_f32
        if self.offset_uv:
            traces += np.float32(self.offset_uv)
        return traces

    def sample_times_s(self, sample_indices: np.ndarray) -> np.ndarray:
        """Times in seconds on the session clock of ``sample_indices`` (any shape, ints).

        Timestamps when the series has them, else ``starting_time + i / rate``.
        Timestamps are read one block of ``_series.TIMESTAMP_CHUNK`` at a time.
        """
        indices = np.asarray(sample_indices)
        if indices.size and indices.dtype.kind not in "iu":
            raise TypeError(f"sample indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"sample indices must lie in [0, {self.num_samples}) for "
                             f"{self.file_path}:{self.object_path}")
        if self._clock.timestamps is None:
            return self.starting_time_s + indices / self.sampling_rate_hz
        self._session._check_open()
        return _series.gather(self._clock.timestamps, indices, path=self.file_path,
                              obj=self.object_path)

    def content_hash(self) -> str:
        """The series' content hash, after checking its values; cached per instance.

        Integer ``data`` in gzip/shuffle chunks (what NWB writers store): ``"sha256-stored:<hex>"`` of the
        stored chunks (:meth:`~nwbflow.nwb_io._chunks.StoredChunks.stored_digest`: nothing decoded). Its
        values cannot be NaN or infinite; the conversion is checked against the dtype's range, and samples
        are decoded only until some channel varies (a flat series, all read, is refused). Where the dtype's
        range scaled leaves float32 (a conversion that may still fit the values), every value is read.

        Otherwise: ``"sha256:<hex>"`` of data's dtype, shape and decoded bytes, streamed in blocks of about
        ``HASH_BLOCK_BYTES`` (whole HDF5 chunks), independent of the block size and of how the file chunks
        or compresses ``data``; this read checks every value.

        Either way BadInputError at the first NaN or infinity (naming its sample and channel), when every
        channel is flat (no recording), or when the conversion scales the data out of the float32 range of
        the traces.
        """
        if self._hash is None:
            scan = _series.ValueScan(self.num_channels, "sample", "channel", nan_is_gap=False,
                                     path=self.file_path, obj=f"{self.object_path}/data")
            if self._chunks is not None and self._dtype_range_fits():
                self._scan_until_varying(scan)
                digest = self._chunks.stored_digest()
            else:
                digest = _series.content_hash(self._data, self._read, scan, HASH_BLOCK_BYTES)
            scan.finish()
            scan.check_scaled(self.gains_uv, self.offset_uv, "µV")
            self._hash = digest
        return self._hash

    def _dtype_range_fits(self) -> bool:
        """Integer data whose whole dtype range, scaled to µV, stays inside float32."""
        if self._data.dtype.kind not in "iu":
            return False
        limits = np.iinfo(self._data.dtype)
        peak = _series.scaled_peak(limits.min, limits.max, self.gains_uv, self.offset_uv)
        return peak < float(np.finfo(np.float32).max)

    def _scan_until_varying(self, scan: _series.ValueScan) -> None:
        """Feed ``scan`` blocks of samples until some channel has varied (all of them for a flat series)."""
        rows = _series.block_rows(self._data, HASH_BLOCK_BYTES)
        for start in range(0, self.num_samples, rows):
            scan.update(start, self._read(slice(start, start + rows)))
            if scan.varies():
                return

    def _read(self, selection: slice) -> np.ndarray:
        self._session._check_open()
        if self._chunks is not None:
            return self._chunks.read(selection.start, selection.stop)
        return _series.read(self._data, selection, path=self.file_path, obj=self.object_path)
