"""What DANDI needs to know about one NWB file, read read-only at the HDF5 level.

The identity (``identifier``, the NWBFile's object id), the session (id, start
time, which datetimes lack a UTC offset), the Subject fields, whether nwbflow
produced the file (it holds ``processing/nwbflow/provenance``) and the
neurodata types dandi derives the file name's modalities from. h5py only, so a
file pynwb cannot read still gets a report.

Examples
--------
>>> has_utc_offset("2024-01-02T03:04:05+01:00"), has_utc_offset("2024-01-02T03:04:05")
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import h5py

from nwbflow.nwb_io import _hdf5, layout

#: Subject fields DANDI reads (dandi.consts.metadata_nwb_subject_fields) plus the free-text ones.
SUBJECT_FIELDS = ("subject_id", "species", "sex", "age", "date_of_birth", "strain", "genotype", "weight",
                  "description")
#: Datetimes the NWB schema requires to carry a UTC offset (object paths in the file).
DATETIME_PATHS = ("session_start_time", "timestamps_reference_time", "file_create_date",
                  "general/subject/date_of_birth")


@dataclass(frozen=True)
class AssetFacts:
    """One NWB file as DANDI sees it.

    Attributes
    ----------
    path : the file.
    identifier : ``NWBFile.identifier``.
    object_id : the NWBFile's object id ("" when the file predates object ids).
    session_id : ``general/session_id``, or None.
    session_start_time : as written (ISO 8601 text), or None.
    naive_datetimes : object paths of datetimes written without a UTC offset.
    has_subject : whether ``general/subject`` exists.
    subject : the Subject's text fields present in the file (name -> value).
    processed : whether nwbflow produced the file (``processing/nwbflow/provenance`` exists).
    neurodata_types : dandi's list of the file's neurodata types ("Name" or "Name (count)").
    """

    path: str
    identifier: str
    object_id: str
    session_id: str | None
    session_start_time: str | None
    naive_datetimes: tuple[str, ...]
    has_subject: bool
    subject: dict[str, str] = field(default_factory=dict)
    processed: bool = False
    neurodata_types: tuple[str, ...] = ()

    @property
    def subject_id(self) -> str | None:
        return self.subject.get("subject_id")


def read_asset_facts(path: str | Path) -> AssetFacts:
    """Read :class:`AssetFacts` from an NWB file, opened read-only.

    Raises
    ------
    BadInputError
        The file is missing, not HDF5 or not NWB 2 (file named, with the fix).
    """
    path = Path(path)
    with _hdf5.open_hdf5(path) as h5:
        _hdf5.nwb_version_of(h5, path)
        subject_group = h5.get("general/subject")
        subject = {} if subject_group is None else {
            name: _hdf5.text(subject_group[name][()]) for name in SUBJECT_FIELDS
            if isinstance(subject_group.get(name), h5py.Dataset)}
        facts = AssetFacts(
            path=str(path),
            identifier=_scalar_text(h5, "identifier") or "",
            object_id=_hdf5.attr_text(h5, "object_id"),
            session_id=_scalar_text(h5, "general/session_id"),
            session_start_time=_scalar_text(h5, "session_start_time"),
            naive_datetimes=tuple(p for p in DATETIME_PATHS if _is_naive(h5.get(p))),
            has_subject=subject_group is not None,
            subject={k: v for k, v in subject.items() if v.strip()},
            processed=layout.PROVENANCE_PATH in h5,
            neurodata_types=tuple(_neurodata_types(path)),
        )
    return facts


def has_utc_offset(value: str) -> bool | None:
    """True/False for an ISO 8601 datetime with/without a UTC offset; None when it does not parse."""
    try:
        return datetime.fromisoformat(value.strip()).tzinfo is not None
    except ValueError:
        return None


def _scalar_text(h5: h5py.File, name: str) -> str | None:
    dataset = h5.get(name)
    if not isinstance(dataset, h5py.Dataset):
        return None
    value = _hdf5.text(dataset[()])
    return value if value.strip() else None


def _is_naive(dataset) -> bool:
    """Whether any datetime of ``dataset`` (scalar or 1-D) parses but has no UTC offset."""
    if not isinstance(dataset, h5py.Dataset):
        return False
    values = dataset[()]
    values = [values] if dataset.shape == () else list(values)
    return any(has_utc_offset(_hdf5.text(v)) is False for v in values)


def _neurodata_types(path: Path) -> list[str]:
    """dandi's own scan (``dandi.pynwb_utils.get_neurodata_types``), the input of its modality names."""
    from dandi.pynwb_utils import get_neurodata_types

    return list(get_neurodata_types(path))
