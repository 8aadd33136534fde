"""Time base, scaling and geometry of one NWB series, read at the HDF5 level.

Helpers of :mod:`nwbflow.nwb_io.read`: the checks that turn a series' raw
HDF5 layout into a clock (rate or timestamps), a gain to microvolts and channel
positions, each raising BadInputError naming the file, object and fix.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from nwbflow.errors import BadInputError, TransientError
from nwbflow.nwb_io._hdf5 import (CONVERT_FIX, CORRUPT_FIX, H5_ERRORS, attr_float, attr_text,
                                  is_io_failure, table_rows)

log = logging.getLogger(__name__)

#: Timestamps are checked and their median interval taken over blocks of this
#: many values, so memory stays bounded for series of any length.
TIMESTAMP_CHUNK = 1 << 20

#: A timestamped series is "regular" when every interval lies within this
#: fraction of the median interval (the median of the first block). An irregular one (gaps, a jittery
#: host clock) is still processed, at 1 / median interval, its times taken from the timestamps; the
#: irregularity is logged once and noted in provenance.
TIMESTAMP_JITTER = 0.01

#: (file, its mtime, object, what) already warned about in this process: a run opens its input in
#: several stages, and one warning per file version is enough.
_WARNED: set[tuple[str, int, str, str]] = set()


def warn_once(path: Path, obj: str, what: str, message: str, *args) -> None:
    """``log.warning(message, *args)`` unless ``what`` was already reported for ``obj`` of this version of
    ``path`` in this process."""
    try:
        seen = (str(path.resolve()), path.stat().st_mtime_ns, obj, what)
    except OSError:
        seen = (str(path), 0, obj, what)
    if seen not in _WARNED:
        _WARNED.add(seen)
        log.warning(message, *args)

#: Pitch (µm) of the vertical line of fallback positions when rel_x/rel_y are missing.
FALLBACK_PITCH_UM = 20.0
#: Spellings of ``data@unit`` accepted for ElectricalSeries (the schema fixes "volts").
VOLTS = ("volts", "volt", "v")
#: Column pairs of the electrodes table holding (x, y) contact positions in µm,
#: tried in order: NWB's rel_x/rel_y, then AllenSDK's probe positions.
POSITION_COLUMNS = (("rel_x", "rel_y"),
                    ("probe_horizontal_position", "probe_vertical_position"))


@dataclass(frozen=True)
class Clock:
    """The time base of one TimeSeries.

    Attributes
    ----------
    rate_hz : sampling rate in Hz (from ``starting_time@rate``, or 1 / median interval).
    starting_time_s : time of sample 0 in seconds on the session clock.
    timestamps : the ``timestamps`` dataset (seconds), or None for a rate-based series.
    irregular : how the timestamps stray from a regular clock (gaps, jitter), or "" when they do not.
    """

    rate_hz: float
    starting_time_s: float
    timestamps: h5py.Dataset | None
    irregular: str = ""


def read_clock(group: h5py.Group, num_samples: int, *, path: Path, obj: str) -> Clock:
    """Read and check the time base of a series with ``num_samples`` samples."""
    if isinstance(group.get("timestamps"), h5py.Dataset):
        if "starting_time" in group:
            log.warning("%s: %s has both timestamps and starting_time; using timestamps",
                        path, obj)
        timestamps = group["timestamps"]
        if timestamps.ndim != 1 or timestamps.shape[0] != num_samples:
            raise BadInputError(f"timestamps have shape {timestamps.shape} but data has "
                                f"{num_samples} samples", path=path, obj=f"{obj}/timestamps",
                                fix="write one timestamp per sample")
        median, irregular = check_timestamps(timestamps, path=path, obj=f"{obj}/timestamps")
        if irregular:
            warn_once(path, obj, "irregular", "%s: %s: %s; processed as continuous samples at %g Hz, times taken "
                      "from the timestamps", path, obj, irregular, 1.0 / median)
        return Clock(1.0 / median, float(timestamps[0]), timestamps, irregular)
    if not isinstance(group.get("starting_time"), h5py.Dataset):
        raise BadInputError("has neither starting_time (with rate) nor timestamps",
                            path=path, obj=obj, fix="write a sampling rate or timestamps")
    start = group["starting_time"]
    rate = attr_float(start, "rate", float("nan"))
    if not np.isfinite(rate) or rate <= 0:
        raise BadInputError(f"sampling rate must be a positive number of Hz, found {rate}",
                            path=path, obj=f"{obj}/starting_time",
                            fix="write the true sampling rate in starting_time@rate")
    value = np.asarray(start[()]).reshape(-1)
    if value.size != 1 or value.dtype.kind not in "iuf" or not np.isfinite(value[0]):
        raise BadInputError(f"starting_time must be one finite number of seconds, found {value[:3]!r}",
                            path=path, obj=f"{obj}/starting_time", fix="write the start time in seconds")
    return Clock(rate, float(value[0]), None)


def imaging_rate_hz(segmentation: h5py.HLObject) -> float | None:
    """The ``imaging_rate`` (Hz) of a PlaneSegmentation's ImagingPlane (a dataset, or an attribute for some
    writers); None when absent or not a positive finite number."""
    if not isinstance(segmentation, h5py.Group) or not isinstance(segmentation.get("imaging_plane"), h5py.Group):
        return None
    plane = segmentation["imaging_plane"]
    value = plane["imaging_rate"][()] if isinstance(plane.get("imaging_rate"), h5py.Dataset) else \
        plane.attrs.get("imaging_rate")
    try:
        rate = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return rate if np.isfinite(rate) and rate > 0 else None


def head_median_interval(timestamps: h5py.Dataset) -> float:
    """Median interval (s) of the first block of timestamps; a cheap rate estimate."""
    head = np.asarray(timestamps[:TIMESTAMP_CHUNK], dtype=np.float64)
    return float(np.median(np.diff(head))) if head.size > 1 else float("nan")


def check_timestamps(timestamps: h5py.Dataset, *, path: Path, obj: str) -> tuple[float, str]:
    """Check timestamps block by block: (median interval in s, irregularity or "").

    Every value must be finite and strictly increasing (else BadInputError). Intervals more than
    ``TIMESTAMP_JITTER`` (1 %) away from the median interval of the first ``TIMESTAMP_CHUNK`` values are
    counted, not refused: the text says how many and the longest one. Memory is bounded by one block.
    """
    fix = "write increasing timestamps (or a rate) for this series"
    num, chunk = timestamps.shape[0], max(TIMESTAMP_CHUNK, 2)
    median, strays, longest, longest_at = None, 0, 0.0, 0
    previous = np.empty(0)
    for start in range(0, num, chunk):
        block = np.asarray(timestamps[start:start + chunk], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(block))
        if bad.size:
            raise BadInputError(f"timestamp {start + bad[0]} is not finite ({block[bad[0]]})",
                                path=path, obj=obj, fix=fix)
        steps = np.diff(np.concatenate([previous, block]))
        first = start - previous.size + 1  # sample index that ends steps[0]
        bad = np.flatnonzero(steps <= 0)
        if bad.size:
            raise BadInputError(f"timestamps are not strictly increasing at sample "
                                f"{first + bad[0]} (step {steps[bad[0]]:.6g} s)",
                                path=path, obj=obj, fix=fix)
        if median is None:
            median = float(np.median(steps)) if steps.size else 1.0
        strays += int(np.count_nonzero(np.abs(steps - median) > TIMESTAMP_JITTER * median))
        if steps.size and steps.max() > longest:
            longest, longest_at = float(steps.max()), first + int(np.argmax(steps))
        previous = block[-1:]
    irregular = "" if not strays else (
        f"timestamps are irregular: {strays} of {num - 1} intervals differ from the median {median:.6g} s by more "
        f"than {TIMESTAMP_JITTER:.0%} (longest {longest:.6g} s, ending at sample {longest_at})")
    return median, irregular


def read(dataset: h5py.Dataset, selection: slice, *, path: Path, obj: str) -> np.ndarray:
    """``dataset[selection]``. The operating system failing the read becomes a TransientError
    (retried); stored bytes that cannot be decoded (a corrupt compressed chunk) a BadInputError."""
    try:
        return dataset[selection]
    except H5_ERRORS as exc:
        if is_io_failure(exc):
            raise TransientError(f"{path}: {obj}: reading {dataset.name} failed ({exc}); retry, "
                                 "or check the file's integrity") from exc
        stop = min(selection.stop, dataset.shape[0])
        raise BadInputError(f"rows {selection.start}:{stop} of {dataset.name.lstrip('/')} "
                            f"cannot be decoded, so the file is corrupt ({exc})", path=path, obj=obj,
                            fix=CORRUPT_FIX) from exc


class ValueScan:
    """Check a series' values block by block, on the pass that hashes them (no extra read).

    Infinities are refused at once. NaN is refused at once too unless
    ``nan_is_gap`` (ROI traces, where NaN marks missing frames): then NaN is
    counted, and ``finish`` refuses a column holding no finite value at all.
    ``finish`` also refuses a series whose every column is constant (flat: no
    recording, e.g. a disconnected headstage or an all-zero export).

    Parameters
    ----------
    num_columns : columns of ``data`` (channels or ROIs; 1 for 1-D data).
    row, column : what a row and a column are, for messages ("sample", "channel").
    nan_is_gap : whether NaN marks a missing sample rather than a corrupt one.
    path, obj : the file and the ``data`` object path, for messages.
    """

    def __init__(self, num_columns: int, row: str, column: str, *, nan_is_gap: bool, path: Path, obj: str):
        self.row, self.column, self.nan_is_gap, self.path, self.obj = row, column, nan_is_gap, path, obj
        self.num_nan = 0
        self.first_nan: tuple[int, int] | None = None
        self._low = np.full(num_columns, np.inf)  # per column, over finite values so far
        self._high = np.full(num_columns, -np.inf)

    def update(self, first_row: int, block: np.ndarray) -> None:
        """Scan ``block``: rows ``first_row, first_row + 1, ...`` of ``data``."""
        values = block.reshape(block.shape[0], -1)
        if values.dtype.kind == "f":
            self._check_finite(first_row, values)
        if values.shape[0]:
            self._low = np.fmin(self._low, np.fmin.reduce(values, axis=0))  # fmin/fmax skip NaN
            self._high = np.fmax(self._high, np.fmax.reduce(values, axis=0))

    def _check_finite(self, first_row: int, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        if finite.all():
            return
        bad = np.isinf(values) if self.nan_is_gap else ~finite
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise BadInputError(
                f"data holds {values[row, col]} at {self.row} {first_row + row}, {self.column} {col} (the first "
                f"such value); {'infinities' if self.nan_is_gap else 'NaN and infinities'} cannot be processed",
                path=self.path, obj=self.obj,
                fix="rewrite the series with finite values (mark a missing frame of ROI traces with NaN)"
                if self.nan_is_gap else "replace missing samples (e.g. with 0) or cut the recording before "
                                        "them, then rewrite the series")
        if self.first_nan is None:
            row, col = (int(i) for i in np.argwhere(~finite)[0])
            self.first_nan = (first_row + row, col)
        self.num_nan += int((~finite).sum())

    def varies(self) -> bool:
        """Whether some column has taken two values so far (so the series is not flat)."""
        return bool(np.any(self._low < self._high))

    def check_scaled(self, gain, offset: float, unit: str) -> None:
        """BadInputError when ``data * gain + offset`` (``gain`` a number or one per column), the traces as
        read, leaves the float32 range: a conversion that cannot be right."""
        peak = scaled_peak(self._low, self._high, gain, offset)
        if peak < float(np.finfo(np.float32).max):
            return
        raise BadInputError(f"data * conversion + offset reaches {peak:.3g} {unit}, beyond the float32 range "
                            "of the traces", path=self.path, obj=self.obj,
                            fix="write data@conversion (and offset) for one stored unit, e.g. 0.195e-6 V per bit")

    def finish(self) -> None:
        """BadInputError if a column held no finite value or every column is flat; else log NaN gaps."""
        empty = np.flatnonzero(self._low > self._high)
        if empty.size:
            raise BadInputError(f"{self.column}(s) {empty[:10].tolist()}{'...' if empty.size > 10 else ''} hold "
                                "no finite value (all NaN), so there is nothing to process",
                                path=self.path, obj=self.obj,
                                fix="rewrite the series without those columns (and their table rows in the "
                                    "region), or choose another series")
        if np.all(self._low == self._high):
            raise BadInputError(f"every {self.column} is constant (flat, values {np.unique(self._low)[:3].tolist()}): "
                                "the series holds no recording", path=self.path, obj=self.obj,
                                fix="pass the series that holds the recording (check the acquisition export)")
        if self.num_nan:
            log.warning("%s: %s: %d NaN values (missing %ss), the first at %s %d, %s %d; they are treated "
                        "as gaps and filled by interpolation over time", self.path, self.obj, self.num_nan,
                        self.row, self.row, self.first_nan[0], self.column, self.first_nan[1])


def scaled_peak(low, high, gain, offset: float) -> float:
    """The largest ``|value * gain + offset|`` (bound) for values between ``low`` and ``high`` (per column)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.max(np.maximum(np.abs(low), np.abs(high)) * np.abs(gain))) + abs(offset)


def content_hash(data: h5py.Dataset, read_rows, scan: ValueScan, block_bytes: int, *,
                 transposed: bool = False) -> str:
    """``"sha256:<hex>"`` of ``data``'s dtype, shape and bytes, read with ``read_rows(slice)`` in blocks of
    about ``block_bytes`` (whole HDF5 chunks, so the digest depends on neither the block size nor the
    file's chunking or compression); every block also goes through ``scan``. ``transposed``: ``data`` is
    stored (columns, samples), ``read_rows`` gives (samples, columns) blocks, hashed in that order."""
    digest = hashlib.sha256()
    digest.update(f"dtype={data.dtype.str};shape={data.shape};{'transposed;' if transposed else ''}".encode())
    if transposed:
        num, rows = data.shape[1], max(1, block_bytes // (data.shape[0] * data.dtype.itemsize))
    else:
        num, rows = data.shape[0], block_rows(data, block_bytes)
    for start in range(0, num, rows):
        block = read_rows(slice(start, start + rows))
        scan.update(start, block)
        digest.update(np.ascontiguousarray(block))
    return "sha256:" + digest.hexdigest()


def gather(dataset: h5py.Dataset, indices: np.ndarray, *, path: Path, obj: str) -> np.ndarray:
    """``dataset[indices]`` for in-range int64 ``indices`` of any shape and order, read one
    ``TIMESTAMP_CHUNK`` block of rows at a time (bounded memory, few HDF5 reads)."""
    unique, inverse = np.unique(indices.reshape(-1), return_inverse=True)
    values = np.empty(unique.size, dtype=np.float64)
    block = TIMESTAMP_CHUNK
    bounds = np.searchsorted(unique, np.arange(0, dataset.shape[0] + block, block))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            first, last = int(unique[lo]), int(unique[hi - 1])
            span = read(dataset, slice(first, last + 1), path=path, obj=obj)
            values[lo:hi] = span[unique[lo:hi] - first]
    return values[inverse].reshape(indices.shape)


def block_rows(data: h5py.Dataset, block_bytes: int) -> int:
    """Rows of 2-D ``data`` in about ``block_bytes``, a whole number of HDF5 chunks."""
    row_bytes = (data.shape[1] if data.ndim == 2 else 1) * data.dtype.itemsize
    rows = max(1, block_bytes // row_bytes)
    chunk_rows = data.chunks[0] if data.chunks else 1
    return max(chunk_rows, rows // chunk_rows * chunk_rows)


def check_range(start: int, end: int, num: int) -> tuple[int, int]:
    """``(start, end)`` as ints with ``0 <= start <= end <= num``, else IndexError."""
    start, end = operator.index(start), operator.index(end)
    if not 0 <= start <= end <= num:
        raise IndexError(f"sample range [{start}, {end}) is outside [0, {num}]")
    return start, end


def roi_data_transposed(num_rois: int, shape: tuple, *, path: Path, obj: str) -> bool:
    """Whether ROI traces of ``shape`` are stored (ROIs, frames): the ``rois`` region's length matches the
    first axis and not the second. BadInputError when it matches neither."""
    if len(shape) == 2 and num_rois == shape[0] != shape[1]:
        return True
    check_columns(num_rois, shape, "rois", "ROIs", path=path, obj=obj)
    return False


def check_columns(region_len: int, shape: tuple, region: str, columns: str, *,
                  path: Path, obj: str) -> None:
    """BadInputError unless the region lists exactly one row per data column."""
    num_columns = shape[1] if len(shape) == 2 else 1
    if region_len == num_columns:
        return
    if len(shape) == 2 and region_len == shape[0]:
        raise BadInputError(f"data has shape {shape} but '{region}' lists {region_len} rows: "
                            f"data looks transposed ({columns}, samples)", path=path, obj=obj,
                            fix=f"write data as (samples, {columns}), samples first")
    raise BadInputError(f"the '{region}' region lists {region_len} rows but data has "
                        f"{num_columns} {columns} (columns, shape {shape}); they must match",
                        path=path, obj=obj,
                        fix=f"make '{region}' reference exactly one table row per data column")


def conversion_offset(data: h5py.Dataset, *, path: Path, obj: str) -> tuple[float, float]:
    """``data@conversion`` (default 1) and ``data@offset`` (default 0); BadInputError unless finite, and the
    conversion non-zero."""
    conversion = attr_float(data, "conversion", 1.0)
    offset = attr_float(data, "offset", 0.0)
    if not (np.isfinite(conversion) and conversion != 0 and np.isfinite(offset)):
        raise BadInputError(f"conversion ({conversion}) must be finite and non-zero and offset "
                            f"({offset}) finite", path=path, obj=f"{obj}/data",
                            fix="write the gain in data@conversion (the unit per stored value)")
    return conversion, offset


def scaling_uv(group: h5py.Group, data: h5py.Dataset, num_channels: int, *, path: Path,
               obj: str) -> tuple[np.ndarray, float]:
    """Per-channel gain (µV per raw unit, (num_channels,) float64) and offset (µV)."""
    unit = attr_text(data, "unit", "volts")
    if unit.strip().lower() not in VOLTS:  # e.g. "uV" with a volts conversion: ambiguous
        raise BadInputError(f"data@unit is {unit!r}, but ElectricalSeries data must be in "
                            "'volts' after conversion", path=path, obj=f"{obj}/data",
                            fix="write data@unit = 'volts' and data@conversion in volts per "
                                "stored unit")
    conversion, offset = conversion_offset(data, path=path, obj=obj)
    channel = np.ones(num_channels)
    if "channel_conversion" in group:
        channel = np.asarray(group["channel_conversion"][()], dtype=np.float64).reshape(-1)
        if channel.size != num_channels or not np.all(np.isfinite(channel)):
            raise BadInputError(f"channel_conversion must hold {num_channels} finite values, "
                                f"found {channel.size}", path=path,
                                obj=f"{obj}/channel_conversion",
                                fix="write one gain per data column")
    return conversion * channel * 1e6, offset * 1e6


def positions_um(table: h5py.HLObject, indices: np.ndarray, *, path: Path,
                  obj: str) -> tuple[np.ndarray, bool]:
    """Contact (x, y) in µm of the region's rows, and whether they are the fallback.

    Read from the first of ``POSITION_COLUMNS`` the table holds; when none is
    there, or the rows' values are not finite, the fallback is a vertical line
    (x = 0, y = 0, 20, 40, ... µm), logged as a warning.
    """
    reason = "has no rel_x/rel_y columns"
    for names in POSITION_COLUMNS:
        columns = [_column(table, name) for name in names]
        if any(column is None for column in columns):
            continue
        xy = _position_values(table, columns, names, path=path)
        positions = np.stack([xy[0][indices], xy[1][indices]], axis=1)
        if np.all(np.isfinite(positions)):
            return positions, False
        reason = f"has non-finite {'/'.join(names)} for this series' electrodes"
        break
    log.warning("%s: %s: the electrodes table %s; using fallback channel positions (a vertical "
                "line, %g µm pitch)", path, obj, reason, FALLBACK_PITCH_UM)
    positions = np.zeros((indices.size, 2))
    positions[:, 1] = np.arange(indices.size) * FALLBACK_PITCH_UM
    return positions, True


#: The electrodes column holding each channel's ADC sampling delay, in samples (NeuroConv, for Neuropixels).
SAMPLE_SHIFT_COLUMN = "inter_sample_shift"


def sample_shifts(table: h5py.HLObject, indices: np.ndarray, *, path: Path, obj: str) -> np.ndarray | None:
    """Each channel's ADC sampling delay (fractions of a sample) from the electrodes table's
    ``inter_sample_shift``, or None where the table has none; a column that is not one finite number per row
    is logged and left out (the series is processed without the correction)."""
    column = _column(table, SAMPLE_SHIFT_COLUMN)
    if column is None:
        return None
    try:
        values = np.asarray(column, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.size == table_rows(table, path=path) and np.isfinite(values[indices]).all():
        return values[indices]
    warn_once(path, obj, SAMPLE_SHIFT_COLUMN, "%s: %s: the electrodes table's %s is not one finite number per "
              "row; the channels' ADC sampling delays are not corrected", path, obj, SAMPLE_SHIFT_COLUMN)
    return None


#: Electrodes columns that name each contact's shank (NeuroConv writes ``shank_ids`` for multi-shank probes).
SHANK_COLUMNS = ("shank_ids", "shank_id", "shank")


def shank_labels(table: h5py.HLObject, indices: np.ndarray, *, path: Path, obj: str) -> np.ndarray | None:
    """Each channel's shank (str labels) from the first of ``SHANK_COLUMNS`` the electrodes table holds, else its
    electrode group (``group_name``, or the ``group`` references' names); None when the series' channels all
    share one (a single-shank probe)."""
    labels = None
    for name in SHANK_COLUMNS:
        column = _column(table, name)
        if column is not None and np.size(column) == table_rows(table, path=path):
            labels = _as_text(column)
            break
    if labels is None:
        labels = _group_names(table, path=path, obj=obj)
    if labels is None:
        return None
    labels = labels[indices]
    return labels if len(np.unique(labels)) > 1 else None


def _as_text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)])


def _group_names(table: h5py.HLObject, *, path: Path, obj: str) -> np.ndarray | None:
    """The electrodes' group names (``group_name``, else the names the ``group`` references point to)."""
    column = _column(table, "group_name")
    if column is not None and np.size(column) == table_rows(table, path=path):
        return _as_text(column)
    refs = table.get("group") if isinstance(table, h5py.Group) else None
    if not isinstance(refs, h5py.Dataset) or refs.dtype != h5py.ref_dtype:
        return None
    names = []
    for ref in refs[()]:
        try:
            names.append(table.file[ref].name.rsplit("/", 1)[-1])
        except (ValueError, KeyError):
            warn_once(path, obj, "group", "%s: %s: an electrode's group reference does not resolve; channels "
                      "are taken as one shank", path, obj)
            return None
    return np.array(names)


def _position_values(table: h5py.HLObject, columns: list, names: tuple[str, str], *,
                     path: Path) -> list[np.ndarray]:
    """Two position columns as float64, one value per table row, else BadInputError."""
    where = table.name.lstrip("/")
    try:
        values = [np.asarray(column, dtype=np.float64).reshape(-1) for column in columns]
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{'/'.join(names)} are not numbers ({exc})", path=path, obj=where,
                            fix="write contact positions in µm as numbers") from exc
    rows = table_rows(table, path=path)
    if any(value.size != rows for value in values):
        raise BadInputError(f"{'/'.join(names)} do not hold one value per row ({rows})",
                            path=path, obj=where, fix=CONVERT_FIX)
    return values


def _column(table: h5py.HLObject, name: str) -> np.ndarray | None:
    """Column ``name`` of a DynamicTable group or compound-dataset table, or None."""
    if isinstance(table, h5py.Group):
        column = table.get(name)
        return column[()] if isinstance(column, h5py.Dataset) else None
    names = table.dtype.names or ()
    return table[name] if name in names else None
