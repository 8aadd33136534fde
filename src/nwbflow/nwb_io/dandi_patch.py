"""Write a copy of an NWB file with explicitly supplied DANDI metadata filled in.

The source is only read (byte copy); the copy is edited with h5py under a
hidden temporary name beside the target and renamed into place
(:func:`nwbflow.atomic.atomic_path`), so a killed run leaves the target absent
or complete. Only what the caller passes is written: Subject text fields, the
session id, and a UTC offset attached to datetimes that were written without
one (their wall-clock value is kept). Object ids and the identifier are those
of the source: the copy replaces the source as the Dandiset's asset.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import h5py

from nwbflow.atomic import atomic_path
from nwbflow.nwb_io import _hdf5
from nwbflow.nwb_io.dandi_facts import DATETIME_PATHS, SUBJECT_FIELDS


@dataclass(frozen=True)
class MetadataPatch:
    """What to fill in.

    Attributes
    ----------
    subject : Subject field -> value (fields of ``SUBJECT_FIELDS``); a Subject is created if absent.
    session_id : value for ``general/session_id``, or None to leave it.
    utc_offset : "+HH:MM" / "-HH:MM" attached to each datetime written without an offset, or None.
    """

    subject: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    utc_offset: str | None = None

    def __bool__(self) -> bool:
        return bool(self.subject) or self.session_id is not None or self.utc_offset is not None

    def described(self) -> dict[str, str]:
        """The patch as ``{"Subject.age": "P90D", "NWBFile.session_id": ..., "UTC offset": ...}``."""
        out = {f"Subject.{name}": value for name, value in self.subject.items()}
        if self.session_id is not None:
            out["NWBFile.session_id"] = self.session_id
        if self.utc_offset is not None:
            out["UTC offset of naive datetimes"] = self.utc_offset
        return out


def write_patched_copy(source: str | Path, target: str | Path, patch: MetadataPatch) -> Path:
    """Copy ``source`` to ``target`` (atomically) with ``patch`` applied; ``source`` is never opened for writing.

    Parameters
    ----------
    source : the NWB file to copy.
    target : the file to write; its folder must exist; replaced if present.
    patch : the metadata to fill in.

    Returns
    -------
    ``target``.
    """
    unknown = set(patch.subject) - set(SUBJECT_FIELDS)
    if unknown:
        raise ValueError(f"not Subject fields: {sorted(unknown)}")
    target = Path(target)
    with atomic_path(target, suffix=".nwb") as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as h5:
            if patch.subject:
                _fill_subject(h5, patch.subject)
            if patch.session_id is not None:
                _set_text(h5.require_group("general"), "session_id", patch.session_id)
            if patch.utc_offset is not None:
                for name in DATETIME_PATHS:
                    if isinstance(h5.get(name), h5py.Dataset):
                        _attach_offset(h5, name, patch.utc_offset)
    return target


def _fill_subject(h5: h5py.File, values: dict[str, str]) -> None:
    general = h5.require_group("general")
    if "subject" not in general:
        subject = general.create_group("subject")
        subject.attrs["namespace"] = "core"
        subject.attrs["neurodata_type"] = "Subject"
        subject.attrs["object_id"] = str(uuid.uuid4())
    for name, value in values.items():
        _set_text(general["subject"], name, value)


def _set_text(group: h5py.Group, name: str, value: str) -> None:
    """Write a scalar UTF-8 text dataset, replacing one of that name and keeping its attributes."""
    attrs = {}
    if name in group:
        attrs = dict(group[name].attrs)
        del group[name]
    dataset = group.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
    for key, attr in attrs.items():
        dataset.attrs[key] = attr


def _attach_offset(h5: h5py.File, name: str, utc_offset: str) -> None:
    """Give each datetime of ``h5[name]`` (scalar or 1-D) without an offset the offset ``utc_offset``."""
    dataset = h5[name]
    scalar = dataset.shape == ()
    values = [_hdf5.text(v) for v in ([dataset[()]] if scalar else list(dataset[()]))]
    tz = datetime.strptime(utc_offset.replace("Z", "+00:00"), "%z").tzinfo or UTC
    fixed = [_with_offset(v, tz) for v in values]
    if fixed == values:
        return
    attrs, dtype = dict(dataset.attrs), dataset.dtype
    parent, leaf = dataset.parent, name.rsplit("/", 1)[-1]
    del parent[leaf]
    data = fixed[0] if scalar else fixed
    new = parent.create_dataset(leaf, data=data, dtype=dtype if h5py.check_string_dtype(dtype) else
                                h5py.string_dtype("ascii"))
    for key, attr in attrs.items():
        new.attrs[key] = attr


def _with_offset(value: str, tz) -> str:
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return value  # not a datetime we can read: left as written (pynwb validation reports it)
    return value if parsed.tzinfo is not None else parsed.replace(tzinfo=tz).isoformat()
