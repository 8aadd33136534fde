"""``meta.yaml``: DANDI metadata supplied explicitly, and which of it a file gets.

Nothing is ever guessed: a value reaches a file only when ``meta.yaml`` names
it for that file's subject, session or path, and only processed files (those
nwbflow wrote) are patched — raw files are organized unchanged. A value fills a
field that is missing or that DANDI's checks flagged; a valid value already in
the file is kept (and the report says the supplied one was not used)::

    subjects:                      # keyed by subject_id
      mouse-001: {species: Mus musculus, sex: M, age: P90D}   # or date_of_birth: 2024-01-01T00:00:00+00:00
    sessions:                      # keyed by NWBFile.session_id
      s1: {subject_id: mouse-001, utc_offset: "+01:00"}       # offset for datetimes written without one
    files:                         # keyed by path relative to ROOT (wins over sessions)
      m1/s1_processed.nwb: {session_id: s1, subject_id: mouse-001}

Examples
--------
>>> SubjectMetadata(age="P90D", sex="M").given()
{'sex': 'M', 'age': 'P90D'}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from nwbflow.errors import BadInputError
from nwbflow.nwb_io.dandi_facts import AssetFacts
from nwbflow.nwb_io.dandi_patch import MetadataPatch

#: nwbinspector 0.7's forms (``nwbinspector.checks._nwbfile_metadata``), copied so meta.yaml is
#: checked by the same rule the file will be.
DURATION_REGEX = (r"^P(?!$)(\d+(?:\.\d+)?Y)?(\d+(?:\.\d+)?M)?(\d+(?:\.\d+)?W)?(\d+(?:\.\d+)?D)?"
                  r"(T(?=\d)(\d+(?:\.\d+)?H)?(\d+(?:\.\d+)?M)?(\d+(?:\.\d+)?S)?)?$")
SPECIES_REGEX = r"([A-Z][a-z]* [a-z]+)|(http://purl.obolibrary.org/obo/NCBITaxon_\d+)"
WEIGHT_REGEX = r"(?i)^\d+(\.\d+)? (kg|g|mg|ug|μg|ng|pg)$"
UTC_OFFSET_REGEX = r"^(Z|[+-](0\d|1[0-4]):[0-5]\d)$"
METADATA_FIX = "see `nwbflow dandi-prep --help` for the meta.yaml layout; quote values such as '+01:00'"


class _Meta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _no_slash(value: str | None) -> str | None:
    if value is not None and ("/" in value or not value.strip()):
        raise ValueError(f"{value!r} must be non-empty and without '/' (DANDI builds paths from it)")
    return value


class SubjectMetadata(_Meta):
    """Subject fields for one subject_id; each one optional."""

    species: StrictStr | None = Field(None, description="Latin binomial ('Mus musculus') or NCBI taxon IRI.")
    sex: Literal["M", "F", "U", "O"] | None = Field(None, description="M, F, U (unknown) or O (other).")
    age: StrictStr | None = Field(None, description="ISO 8601 duration from birth, e.g. P90D, or a range P60D/P90D.")
    date_of_birth: AwareDatetime | None = Field(None, description="With a UTC offset.")
    strain: StrictStr | None = None
    genotype: StrictStr | None = None
    weight: StrictStr | None = Field(None, description="'<number> <unit>', e.g. '0.025 kg'.")
    description: StrictStr | None = None

    @field_validator("age")
    @classmethod
    def _iso_age(cls, value: str | None) -> str | None:
        if value is not None and not all(re.fullmatch(DURATION_REGEX, part) or (part == "" and "/" in value)
                                         for part in value.split("/")):
            raise ValueError(f"age {value!r} is not an ISO 8601 duration: write e.g. P90D (90 days), P12W, "
                             "P2Y, or a range P60D/P90D")
        return value

    @field_validator("species")
    @classmethod
    def _species_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(SPECIES_REGEX, value):
            raise ValueError(f"species {value!r}: write a Latin binomial ('Mus musculus') or an NCBI taxon IRI")
        return value

    @field_validator("weight")
    @classmethod
    def _weight_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(WEIGHT_REGEX, value):
            raise ValueError(f"weight {value!r}: write '<number> <unit>', e.g. '0.025 kg'")
        return value

    def given(self) -> dict[str, str]:
        """The fields set, as the text written into NWB (datetimes in ISO 8601)."""
        values = self.model_dump(exclude_none=True)
        if self.date_of_birth is not None:
            values["date_of_birth"] = self.date_of_birth.isoformat()
        return values


class SessionMetadata(_Meta):
    """What one session's files lack: whose session it is, the clock's UTC offset."""

    subject_id: StrictStr | None = Field(None, description="Subject of a file that names none.")
    utc_offset: StrictStr | None = Field(None, description="'+HH:MM' or '-HH:MM' of the clock that wrote "
                                                           "datetimes without an offset (quoted).")

    @field_validator("subject_id")
    @classmethod
    def _subject_id_form(cls, value: str | None) -> str | None:
        return _no_slash(value)

    @field_validator("utc_offset")
    @classmethod
    def _offset_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(UTC_OFFSET_REGEX, value):
            raise ValueError(f"utc_offset {value!r}: write '+HH:MM' or '-HH:MM' in quotes, e.g. '-05:00'")
        return value


class FileMetadata(SessionMetadata):
    """One file (by path relative to ROOT): also its session id when it has none."""

    session_id: StrictStr | None = Field(None, description="Session of a file that names none.")

    @field_validator("session_id")
    @classmethod
    def _session_id_form(cls, value: str | None) -> str | None:
        return _no_slash(value)


class DandiMetadata(_Meta):
    """The whole ``meta.yaml``."""

    subjects: dict[StrictStr, SubjectMetadata] = Field(default_factory=dict)
    sessions: dict[StrictStr, SessionMetadata] = Field(default_factory=dict)
    files: dict[StrictStr, FileMetadata] = Field(default_factory=dict)

    def entry_names(self) -> set[str]:
        """Every entry as "subjects.<id>", "sessions.<id>", "files.<path>"."""
        return ({f"subjects.{k}" for k in self.subjects} | {f"sessions.{k}" for k in self.sessions}
                | {f"files.{k}" for k in self.files})


def load_metadata(path: str | Path | None) -> DandiMetadata:
    """Read and check ``meta.yaml`` (empty metadata when ``path`` is None).

    Raises
    ------
    BadInputError
        Unreadable, not YAML, or a value DANDI would refuse (names the file and the field).
    """
    if path is None:
        return DandiMetadata()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise BadInputError(f"cannot read the metadata file ({exc.strerror or exc})", path=path,
                            fix="pass an existing YAML file to --metadata") from exc
    except yaml.YAMLError as exc:
        raise BadInputError(f"not valid YAML: {exc}", path=path, fix=METADATA_FIX) from exc
    if not isinstance(data, dict):
        raise BadInputError("the metadata file must hold a mapping (subjects, sessions, files)", path=path,
                            fix=METADATA_FIX)
    try:
        return DandiMetadata.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInputError(f"invalid metadata: {problems}", path=path, fix=METADATA_FIX) from exc


@dataclass(frozen=True)
class Resolution:
    """What ``meta.yaml`` says about one file.

    ``patch`` is what the file would get (applied to processed files only); ``subject_id`` and
    ``session_id`` are the file's own or the supplied ones; ``used`` names the entries that matched;
    ``notes`` says which supplied values were not used and why.
    """

    patch: MetadataPatch
    subject_id: str | None
    session_id: str | None
    used: frozenset[str] = frozenset()
    notes: tuple[str, ...] = field(default=())


def resolve(meta: DandiMetadata, relative: str, facts: AssetFacts, flagged: set[str]) -> Resolution:
    """The supplied metadata for the file at ``relative`` (posix, under ROOT).

    Parameters
    ----------
    meta : the loaded ``meta.yaml``.
    relative : the file's path relative to ROOT.
    facts : what the file holds.
    flagged : Subject fields DANDI's checks flagged in this file (they may be replaced).
    """
    used, notes = set(), []
    file_entry = meta.files.get(relative)
    if file_entry is not None:
        used.add(f"files.{relative}")
    session_id = facts.session_id or (file_entry.session_id if file_entry else None)
    if file_entry and file_entry.session_id and facts.session_id and file_entry.session_id != facts.session_id:
        notes.append(f"meta.yaml files.{relative}.session_id {file_entry.session_id!r} not used: "
                     f"the file has session_id {facts.session_id!r}")
    session_entry = meta.sessions.get(session_id) if session_id else None
    if session_entry is not None:
        used.add(f"sessions.{session_id}")
    entries = [e for e in (file_entry, session_entry) if e is not None]
    supplied_subject = next((e.subject_id for e in entries if e.subject_id), None)
    subject_id = facts.subject_id or supplied_subject
    if facts.subject_id and supplied_subject and supplied_subject != facts.subject_id:
        notes.append(f"meta.yaml subject_id {supplied_subject!r} not used: the file has subject_id "
                     f"{facts.subject_id!r}")
    subject = {"subject_id": subject_id} if subject_id and not facts.subject_id else {}
    subject_entry = meta.subjects.get(subject_id) if subject_id else None
    if subject_entry is not None:
        used.add(f"subjects.{subject_id}")
        for name, value in subject_entry.given().items():
            current = facts.subject.get(name)
            if current is None or name in flagged:
                subject[name] = value
            elif current != value:
                notes.append(f"meta.yaml subjects.{subject_id}.{name} {value!r} not used: the file already "
                             f"has a valid {current!r}")
    utc_offset = next((e.utc_offset for e in entries if e.utc_offset), None)
    if utc_offset and not facts.naive_datetimes:
        notes.append(f"meta.yaml utc_offset {utc_offset!r} not used: the file's datetimes have offsets")
        utc_offset = None
    patch = MetadataPatch(subject=subject, utc_offset=utc_offset,
                          session_id=session_id if session_id and not facts.session_id else None)
    return Resolution(patch=patch, subject_id=subject_id, session_id=session_id, used=frozenset(used),
                      notes=tuple(notes))
