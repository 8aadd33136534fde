"""The small records dandi-prep passes between its steps (picklable, no arrays, no open files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nwbflow.nwb_io.dandi_facts import AssetFacts
from nwbflow.nwb_io.dandi_patch import MetadataPatch
from nwbflow.nwb_io.validate import Finding

READY, BLOCKED = "ready", "blocked"
RAW, PROCESSED = "raw", "processed"


@dataclass(frozen=True)
class Problem:
    """One thing to report about a file.

    Attributes
    ----------
    check : who found it: dandi's result id ("NWBI.check_subject_age", "pynwb...", "DANDI...") or
        one of ours ("nwbflow.duplicate_identifier", ...).
    message : what is wrong, as the validator said it.
    fix : what to change, concretely ("set Subject.age, e.g. P90D").
    location : the NWB object path, when known.
    blocking : whether ``dandi upload`` refuses the file for it.
    """

    check: str
    message: str
    fix: str
    location: str = ""
    blocking: bool = True

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "location": self.location, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Inspection:
    """One source file under ROOT, checked as it is.

    ``facts`` is None when the file cannot be read at all (then ``unreadable`` says why);
    ``findings`` are what ``dandi upload`` checks (pynwb, nwbinspector with the DANDI config,
    dandi's metadata extraction).
    """

    source: str                 # absolute path
    relative: str               # path relative to ROOT (posix)
    facts: AssetFacts | None
    findings: tuple[Finding, ...] = ()
    unreadable: str = ""

    @property
    def kind(self) -> str:
        return PROCESSED if self.facts is not None and self.facts.processed else RAW


@dataclass(frozen=True)
class AssetPlan:
    """What to do with one source file: its DANDI name, metadata to fill in, problems known so far.

    ``target`` is the forward-slash path inside the Dandiset, or "" when the file cannot be named
    (no subject_id). ``session_id`` is the file's (or the supplied) session id, the key of ``meta.yaml``
    sessions; ``session`` the ``ses-`` label of the name. ``patch`` is applied to processed files
    only; ``problems`` holds cross-file and naming problems (content findings are added when the
    asset is prepared).
    """

    inspection: Inspection
    target: str = ""
    session: str = ""
    session_id: str = ""
    subject_id: str = ""
    patch: MetadataPatch = field(default_factory=MetadataPatch)
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AssetResult:
    """One file's outcome: status, problems with fixes, where it went and how."""

    source: str
    relative: str
    kind: str
    status: str
    target: str
    placed: str                  # "hardlink" | "copy" | "patched copy" | "unchanged ..." | "" (not placed)
    subject_id: str
    session: str
    identifier: str
    object_id: str
    applied: dict[str, str]      # metadata written into the processed copy (from meta.yaml)
    blockers: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"source": self.source, "relative": self.relative, "kind": self.kind, "status": self.status,
                "target": self.target, "placed": self.placed, "subject_id": self.subject_id,
                "session": self.session, "identifier": self.identifier, "object_id": self.object_id,
                "applied_metadata": dict(self.applied), "blockers": [p.as_dict() for p in self.blockers],
                "warnings": [p.as_dict() for p in self.warnings], "notes": list(self.notes)}
