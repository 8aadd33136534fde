"""Low-level HDF5 helpers behind :mod:`nwbflow.nwb_io.read`.

Everything here works on the raw HDF5 layout of NWB 2.x files (schema 2.0b to
2.11, any writer: pynwb, MatNWB, NeuroConv, AllenSDK, C++ writers), never on
pynwb objects, so files that pynwb cannot read still open. Files are opened
read-only and nothing is ever written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import yaml

from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Core types whose ancestry is known even when a file caches no specification.
CORE_PARENTS = {
    "ElectricalSeries": "TimeSeries",
    "SpikeEventSeries": "ElectricalSeries",
    "RoiResponseSeries": "TimeSeries",
    "TimeSeries": "NWBDataInterface",
    "Fluorescence": "NWBDataInterface",
    "DfOverF": "NWBDataInterface",
}

CONVERT_FIX = "re-export the file with a current NWB writer (pynwb, NeuroConv, MatNWB)"
CORRUPT_FIX = ("re-copy or re-download the file, comparing its size and checksum with the "
               "source")
#: What h5py raises when HDF5 cannot decode a file's bytes (it maps HDF5's error classes to these).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def is_io_failure(exc: BaseException) -> bool:
    """Whether an h5py error is the operating system failing a read (EIO, a network file system
    hiccup: a retry may pass), not bytes that cannot be decoded (corruption: a retry cannot)."""
    return isinstance(exc, OSError) and (exc.errno is not None or "errno" in str(exc))


@contextlib.contextmanager
def decoding(path: Path, obj: str | None = None) -> Iterator[None]:
    """The reader's boundary: an h5py failure inside becomes a BadInputError naming the file and object.

    Corrupt bytes make h5py raise any of ``H5_ERRORS`` wherever the reader
    looks; an operating-system read failure is left as it is (a retry may
    pass).
    """
    try:
        yield
    except H5_ERRORS as exc:
        if is_io_failure(exc):
            raise
        raise BadInputError(f"cannot be decoded: the file is corrupt here, or not laid out as NWB "
                            f"specifies ({type(exc).__name__}: {exc})", path=path, obj=obj,
                            fix=CORRUPT_FIX) from exc


def text(value) -> str:
    """Decode an HDF5 string value (bytes, numpy bytes, 1-element array) to ``str``."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def attr_text(obj: h5py.HLObject, name: str, default: str = "") -> str:
    """The attribute ``name`` of ``obj`` as text, or ``default`` when absent."""
    return text(obj.attrs[name]) if name in obj.attrs else default


def attr_float(obj: h5py.HLObject, name: str, default: float) -> float:
    """Scalar numeric attribute ``name`` of ``obj``: ``default`` if absent, NaN if not a number."""
    if name not in obj.attrs:
        return default
    try:
        return float(np.asarray(obj.attrs[name], dtype=np.float64).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return float("nan")


def has_hdf5_signature(path: Path) -> bool:
    """Whether the HDF5 signature sits at offset 0, 512, 1024, 2048, ... of ``path``."""
    size = path.stat().st_size
    offset = 0
    with path.open("rb") as handle:
        while offset + len(HDF5_SIGNATURE) <= size:
            handle.seek(offset)
            if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def open_hdf5(path: Path) -> h5py.File:
    """Open ``path`` read-only (no file locking) or raise BadInputError saying why not."""
    if not path.exists():
        raise BadInputError("file not found", path=path,
                            fix="check the path (and that the data volume is mounted)")
    if path.is_dir():
        raise BadInputError("is a directory, not an NWB HDF5 file (NWB Zarr stores are not "
                            "supported)", path=path,
                            fix="pass the .nwb file itself, or convert a Zarr store to HDF5")
    if not path.is_file():
        raise BadInputError("not a regular file", path=path, fix="pass an NWB HDF5 (.nwb) file")
    try:
        return _open_read_only(path)
    except PermissionError as exc:
        raise BadInputError(f"cannot be read ({exc.strerror or exc})", path=path,
                            fix="give this user read permission on the file") from exc
    except OSError as exc:
        if not has_hdf5_signature(path):
            raise BadInputError("not an HDF5 file (no HDF5 signature), so not an NWB 2 file",
                                path=path, fix="pass an NWB 2.x HDF5 file") from exc
        raise BadInputError(f"HDF5 file is truncated or corrupt and cannot be opened ({exc})",
                            path=path, fix=CORRUPT_FIX) from exc


def _open_read_only(path: Path) -> h5py.File:
    """``h5py.File(path, "r", locking=False)``; if this process already holds the file open
    with HDF5's default locking (e.g. SpikeInterface's NWB extractor), HDF5 refuses a second
    handle with other locking flags, so reopen read-only with the default flags instead."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "locking flag" not in str(exc):
            raise
        log.debug("%s is already open in this process with file locking; reusing its flags", path)
        return h5py.File(path, "r")


def nwb_version_of(h5file: h5py.File, path: Path) -> str:
    """The NWB version of an open file; BadInputError if it is not an NWB 2.x file."""
    version = attr_text(h5file, "nwb_version")
    if not version and isinstance(h5file.get("nwb_version"), h5py.Dataset):
        version = text(h5file["nwb_version"][()])
    root_type = attr_text(h5file, "neurodata_type")
    if version.upper().startswith("NWB-1") or version.startswith("1."):
        raise BadInputError(f"NWB 1.x file (nwb_version {version!r}); only NWB 2.x is read",
                            path=path, fix="convert the file to NWB 2 (e.g. with NeuroConv)")
    if root_type != "NWBFile" and not (version.startswith("2") and "identifier" in h5file):
        found = root_type or "no neurodata_type"
        raise BadInputError(f"HDF5 file but not an NWB file (root is {found!r}, no NWBFile)",
                            path=path, fix="pass an NWB 2.x file written by pynwb, MatNWB "
                                           "or NeuroConv")
    return version or "unknown"


class TypeTree:
    """Which neurodata type extends which, from the specs cached in the file.

    Types are matched by name; the core ancestry of the types nwbflow reads is
    built in, so files without cached specifications still resolve.
    """

    def __init__(self, parents: dict[str, str]):
        self.parents = {**CORE_PARENTS, **parents}

    @classmethod
    def from_file(cls, h5file: h5py.File) -> TypeTree:
        """Collect ``type_def -> type_inc`` from every cached specification source."""
        parents: dict[str, str] = {}
        specs = h5file.get("specifications")
        if not isinstance(specs, h5py.Group):
            return cls(parents)
        for namespace in specs.values():
            for version in namespace.values() if isinstance(namespace, h5py.Group) else ():
                for source in version.values() if isinstance(version, h5py.Group) else ():
                    _collect_parents(_parse_spec(source), parents)
        return cls(parents)

    def is_a(self, type_name: str, base: str) -> bool:
        """Whether ``type_name`` is ``base`` or (transitively) extends it."""
        seen = set()
        while type_name and type_name not in seen:
            if type_name == base:
                return True
            seen.add(type_name)
            type_name = self.parents.get(type_name, "")
        return False


def _parse_spec(source: h5py.HLObject) -> object:
    """Parse one cached spec source (JSON, or YAML from some older writers)."""
    if not isinstance(source, h5py.Dataset):
        return None
    raw = text(source[()])
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            log.warning("Ignoring unreadable cached specification %s: %s", source.name, exc)
            return None


def _collect_parents(spec: object, parents: dict[str, str]) -> None:
    """Walk a parsed spec, recording every (nested) type definition's parent."""
    if isinstance(spec, list):
        for item in spec:
            _collect_parents(item, parents)
    elif isinstance(spec, dict):
        name = spec.get("neurodata_type_def") or spec.get("data_type_def")
        parent = spec.get("neurodata_type_inc") or spec.get("data_type_inc")
        if isinstance(name, str) and isinstance(parent, str):
            parents.setdefault(name, parent)
        for key in ("groups", "datasets"):
            _collect_parents(spec.get(key), parents)


def typed_groups(h5file: h5py.File, path: Path) -> dict[str, str]:
    """Every group carrying ``neurodata_type``: object path (no leading '/') -> type.

    Walks hard links group by group (soft and external links are not
    followed; an object reached twice is listed once), opening one object at
    a time, so the BadInputError for a corrupt object names it.
    """
    found: dict[str, str] = {}
    seen: set = set()
    pending: list[tuple[str, h5py.Group]] = [("", h5file)]
    while pending:  # depth first, in name order, like h5py's visititems
        prefix, group = pending.pop()
        with decoding(path, prefix.rstrip("/") or None):
            names = list(group)  # link names: no child is opened
        children = []
        for name in names:
            where = prefix + name
            with decoding(path, where):
                if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                    continue
                child = group[name]
                if not isinstance(child, h5py.Group) or child.id in seen:
                    continue
                seen.add(child.id)
                if "neurodata_type" in child.attrs:
                    found[where] = attr_text(child, "neurodata_type")
            children.append((where + "/", child))
        pending += reversed(children)
    return found


def region_indices(group: h5py.Group, name: str, *, path: Path, obj: str,
                   default_table: str | None) -> tuple[np.ndarray, h5py.HLObject]:
    """Read a DynamicTableRegion: (row indices int64, the table it points into).

    Raises BadInputError when the region is missing, not 1-D integers, or has
    indices outside ``[0, rows)`` of its table (e.g. 1-based MATLAB writers).
    """
    where = f"{obj}/{name}"
    if not isinstance(group.get(name), h5py.Dataset):
        raise BadInputError(f"has no '{name}' region", path=path, obj=obj,
                            fix="write the DynamicTableRegion that names the series' table rows")
    dataset = group[name]
    if h5py.check_dtype(ref=dataset.dtype) is not None:
        raise BadInputError("region is stored as HDF5 references (pre-release NWB 2.0 layout), "
                            "not row indices", path=path, obj=where, fix=CONVERT_FIX)
    values = np.asarray(dataset[()]).reshape(-1)
    indices = _as_int_indices(values, path=path, obj=where)
    table = _region_table(dataset, group.file, path=path, obj=where, default=default_table)
    rows = table_rows(table, path=path)
    bad = (indices < 0) | (indices >= rows)
    if bad.any():
        one_based = indices.size and indices.min() >= 1 and indices.max() == rows
        hint = (" They look 1-based (MATLAB style)" if one_based else "")
        raise BadInputError(
            f"region indices {indices[bad][:5].tolist()} are outside the {rows} rows of "
            f"{table.name.lstrip('/')} (valid: 0..{rows - 1}).{hint}", path=path, obj=where,
            fix="write 0-based row indices into the table (subtract 1 from 1-based ones)")
    return indices, table


def _as_int_indices(values: np.ndarray, *, path: Path, obj: str) -> np.ndarray:
    """Region values as int64; whole-number floats (some MATLAB writers) are accepted."""
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.all(np.isfinite(values)) \
            and np.all(values == np.round(values)):
        log.warning("%s: %s holds whole-number floats; reading them as row indices", path, obj)
        return values.astype(np.int64)
    raise BadInputError(f"region must hold integer row indices, found dtype {values.dtype}",
                        path=path, obj=obj, fix="write the region as integer row indices")


def _region_table(dataset: h5py.Dataset, h5file: h5py.File, *, path: Path, obj: str,
                  default: str | None) -> h5py.HLObject:
    """The table a region points to: its ``table`` reference, else the default path."""
    ref = dataset.attrs.get("table")
    if isinstance(ref, h5py.Reference) and ref:
        try:
            table = h5file[ref]
        except (ValueError, KeyError) as exc:
            raise BadInputError(f"the region's 'table' reference is broken ({exc})",
                                path=path, obj=obj, fix=CONVERT_FIX) from exc
        if table.name is None:  # an object no path leads to: a damaged reference
            raise BadInputError("the region's 'table' reference points to an unnamed object",
                                path=path, obj=obj, fix=CORRUPT_FIX)
        return table
    if default and default in h5file:
        return h5file[default]
    raise BadInputError(f"region has no 'table' reference (and no {default or 'default'})",
                        path=path, obj=obj, fix=CONVERT_FIX)


def check_distinct_rows(table: h5py.HLObject, indices: np.ndarray, *, path: Path, obj: str) -> None:
    """BadInputError unless a region's rows are distinct and carry distinct ids (the table's ``id``).

    Results are written per row and matched back by id (ROIs, units), so two
    columns of data must never stand for one row or one id.
    """
    where = table.name.lstrip("/")
    rows, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise BadInputError(f"the region names rows {rows[counts > 1][:5].tolist()} of {where} more than once",
                            path=path, obj=obj, fix="reference each table row once")
    if not (isinstance(table, h5py.Group) and isinstance(table.get("id"), h5py.Dataset)):
        return
    ids, counts = np.unique(np.asarray(table["id"][()]).reshape(-1)[indices], return_counts=True)
    if (counts > 1).any():
        raise BadInputError(f"ids {ids[counts > 1][:5].tolist()} are each shared by several rows of {where} "
                            "that this series references, so its columns cannot be told apart",
                            path=path, obj=f"{where}/id", fix="give every row of the table its own id "
                                                             "(e.g. 0, 1, 2, ...)")


def table_rows(table: h5py.HLObject, *, path: Path) -> int:
    """Number of rows of a DynamicTable group (its ``id``) or of a compound dataset."""
    if isinstance(table, h5py.Dataset):
        return int(table.shape[0]) if table.shape else 1
    if isinstance(table.get("id"), h5py.Dataset):
        return int(table["id"].shape[0])
    raise BadInputError("table has no 'id' column, so its row count is unknown",
                        path=path, obj=table.name.lstrip("/"), fix=CONVERT_FIX)


def series_data(group: h5py.Group, *, path: Path, obj: str,
                columns: str) -> tuple[h5py.Dataset, int, int]:
    """The ``data`` of a series checked for reading: (dataset, num_samples, num_columns).

    ``data`` must be numeric, (samples,) or (samples, ``columns``), hold at
    least 2 samples, and use only installed HDF5 filters.
    """
    where = f"{obj}/data"
    try:
        data = group.get("data")
    except (KeyError, OSError) as exc:  # e.g. an external link to a missing file
        raise BadInputError(f"its data cannot be opened ({exc})", path=path, obj=where,
                            fix="make the linked file available beside this one") from exc
    if not isinstance(data, h5py.Dataset):
        raise BadInputError("has no 'data' dataset", path=path, obj=obj, fix=CONVERT_FIX)
    if data.dtype.kind not in "iuf":
        raise BadInputError(f"data must be integers or floats, found dtype {data.dtype}",
                            path=path, obj=where, fix="store the samples as numbers")
    if data.ndim not in (1, 2):
        raise BadInputError(f"data must be 2-D (samples, {columns}), found shape {data.shape}",
                            path=path, obj=where, fix=f"store data as (samples, {columns})")
    num_samples = int(data.shape[0])
    if num_samples < 2:
        raise BadInputError(f"data has {num_samples} samples; at least 2 are needed",
                            path=path, obj=where, fix="pass a series that holds a recording")
    check_filters(data, path=path, obj=where)
    return data, num_samples, int(data.shape[1]) if data.ndim == 2 else 1


def check_filters(dataset: h5py.Dataset, *, path: Path, obj: str) -> None:
    """BadInputError if ``dataset`` needs an HDF5 filter (compressor) that is not installed."""
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(index)
        if h5py.h5z.filter_avail(code) or _load_hdf5plugin() and h5py.h5z.filter_avail(code):
            continue
        raise BadInputError(f"data is compressed with HDF5 filter {code} ({text(name)}), "
                            "which is not installed", path=path, obj=obj,
                            fix="pip install hdf5plugin (nwbflow loads it when present)")


def _load_hdf5plugin() -> bool:
    """Import ``hdf5plugin`` (registers extra HDF5 filters); False if not installed."""
    try:
        importlib.import_module("hdf5plugin")
    except ImportError:
        return False
    return True


def text_values(path: str | Path) -> list[str]:
    """Every text value of the HDF5 file at ``path``: string datasets and attributes, bytes decoded (where
    a host path or other leaked text would hide; checked by the tests and ``benchmarks/real_nwb.py``)."""
    found: list[str] = []

    def collect(value) -> None:
        for item in np.asarray(value, dtype=object).reshape(-1):
            if isinstance(item, bytes | str):
                found.append(item.decode(errors="replace") if isinstance(item, bytes) else item)

    def visit(_name, obj) -> None:
        for value in obj.attrs.values():
            collect(value)
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":
            collect(obj[()])

    with _open_read_only(Path(path)) as handle:
        collect(list(handle.attrs.values()))
        handle.visititems(visit)
    return found
