"""DANDI names for the files, computed by dandi's own ``organize`` code.

``dandi organize`` names a file ``sub-<subject>/sub-<subject>[_ses-<session>]
[_desc-...|_probe-...|_obj-...]_<modalities>.nwb`` from its metadata
(``dandi.organize.create_unique_filenames_from_metadata``; modalities from the
file's neurodata types, e.g. ``ecephys+ophys``). We call that function with two
choices made explicit:

- ``session_id`` is a required field, so ``_ses-`` is always there (dandi
  leaves it out when every file has the same session); a file without one is
  named from its start time, as dandi does (``20240102T030405``).
- processed files carry ``description: "processed"``, and ``description`` is a
  required field, so they are ``..._desc-processed_<modalities>.nwb``. Plain
  ``dandi organize`` tells a raw and a processed file of one session apart with
  ``_obj-<crc32 of object id>`` on both instead; ``desc`` is one of dandi's own
  disambiguation entities and passes its layout check.

Files that still collide (e.g. two raw files of one session) get dandi's
further entities (``_probe-``, ``_obj-``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PROCESSED_DESCRIPTION = "processed"
REQUIRED_FIELDS = ("session_id", "description")


@dataclass(frozen=True)
class NamingInput:
    """What dandi's naming reads of one file (values after meta.yaml is applied)."""

    path: str
    subject_id: str
    session_id: str | None
    session_start_time: str | None
    neurodata_types: tuple[str, ...]
    processed: bool


class NamingError(Exception):
    """dandi could not give the files unique names (its message says which)."""


def dandi_names(files: list[NamingInput]) -> dict[str, tuple[str, str]]:
    """``path -> (dandi path, session label)`` for each file, as ``dandi organize`` computes them.

    The dandi path is forward-slash separated, relative to the Dandiset root
    (``sub-m1/sub-m1_ses-s1_desc-processed_ecephys.nwb``); the session label is
    the ``ses-`` value. Raises NamingError when dandi cannot make the names unique.
    """
    from dandi.exceptions import OrganizeImpossibleError
    from dandi.organize import create_unique_filenames_from_metadata

    if not files:
        return {}
    records = [{"path": f.path, "subject_id": f.subject_id, "session_id": f.session_id,
                "session_start_time": f.session_start_time, "nd_types": list(f.neurodata_types),
                "description": PROCESSED_DESCRIPTION if f.processed else None} for f in files]
    try:
        named = create_unique_filenames_from_metadata(records, required_fields=REQUIRED_FIELDS)
    except OrganizeImpossibleError as exc:
        raise NamingError(str(exc)) from exc
    return {r["path"]: (PurePosixPath(*Path(r["dandi_path"]).parts).as_posix(), r.get("session_id") or "")
            for r in named}


def layout_findings(target: str, filepath: Path, dandiset_dir: Path) -> list[str]:
    """Messages of dandi's layout rule (``dandi validate``) for ``target``; empty when it conforms."""
    from dandi.organize import validate_organized_path

    return [f"{r.id}: {r.message}" for r in validate_organized_path(target, filepath, dandiset_dir)]
