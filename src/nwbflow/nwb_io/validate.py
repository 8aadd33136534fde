"""Run the three validators a processed file must pass: pynwb, nwbinspector, dandi.

dandi's file-level validation (what ``dandi validate`` applies to an NWB asset:
schema validation, nwbinspector with the DANDI configuration, metadata rules)
is run per file; where the file sits in a Dandiset is the dandi-prep flow's job.

nwbinspector and dandi are the optional ``validate`` extra; each missing one is
reported as not run (never silently counted as passed) by ``validate_file``;
``dandi_upload_findings`` (the dandi-prep gate) refuses to run without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pynwb

from nwbflow.errors import NwbflowError

log = logging.getLogger(__name__)

#: nwbinspector importances that fail a file we produced.
BLOCKING_INSPECTOR = ("CRITICAL", "BEST_PRACTICE_VIOLATION")


@dataclass(frozen=True)
class Finding:
    """One validator message: who said it, how bad, about what."""

    validator: str      # "pynwb" | "nwbinspector" | "dandi"
    severity: str       # pynwb: "ERROR"; nwbinspector: importance name; dandi: severity name
    check: str          # check function or result id
    location: str       # object path in the file, when known
    message: str

    def key(self) -> tuple[str, str, str]:
        """What identifies the same problem in two files (input vs output).

        dandi locates findings by file path, which differs between input and
        output, so its findings are matched by check id alone.
        """
        location = "" if self.validator == "dandi" else self.location
        return (self.validator, self.check, location)


@dataclass(frozen=True)
class ValidationReport:
    path: Path
    findings: tuple[Finding, ...]
    not_run: tuple[str, ...] = field(default=())

    def blocking(self) -> tuple[Finding, ...]:
        """Findings that fail the file: schema errors, inspector CRITICAL/BP violations, dandi errors."""
        return tuple(f for f in self.findings if _is_blocking(f))

    def introduced_over(self, baseline: ValidationReport) -> tuple[Finding, ...]:
        """Blocking findings that ``baseline`` (e.g. the input file) did not already have."""
        known = {f.key() for f in baseline.findings}
        return tuple(f for f in self.blocking() if f.key() not in known)


def _is_blocking(finding: Finding) -> bool:
    if finding.validator == "nwbinspector":
        return finding.severity in BLOCKING_INSPECTOR
    if finding.validator == "dandi":
        return finding.severity in ("ERROR", "CRITICAL")
    return True


def validate_file(path: str | Path) -> ValidationReport:
    """Validate one NWB file with pynwb, nwbinspector and dandi (those installed)."""
    path = Path(path)
    findings = list(_pynwb_findings(path))
    not_run = []
    for name, runner in (("nwbinspector", _inspector_findings), ("dandi", _dandi_findings)):
        try:
            findings.extend(runner(path))
        except ModuleNotFoundError:
            log.warning("%s is not installed: install nwbflow[validate] to run it", name)
            not_run.append(name)
    return ValidationReport(path=path, findings=tuple(findings), not_run=tuple(not_run))


def _pynwb_findings(path: Path):
    for error in pynwb.validate(path=str(path)):
        yield Finding("pynwb", "ERROR", type(error).__name__, str(getattr(error, "location", "") or ""),
                      str(error))


def _inspector_findings(path: Path):
    from nwbinspector import inspect_nwbfile

    for message in inspect_nwbfile(nwbfile_path=str(path)):
        yield Finding("nwbinspector", message.importance.name, message.check_function_name,
                      str(message.location or ""), message.message)


def _dandi_findings(path: Path):
    from dandi.files import dandi_file

    for result in dandi_file(path).get_validation_errors():
        severity = result.severity.name if result.severity is not None else "HINT"
        yield Finding("dandi", severity, result.id, str(result.path or ""), result.message or "")


# --- the gate of `dandi upload` (used by dandi-prep) ---------------------------------------------

#: The ``pip install`` that brings dandi and nwbinspector.
VALIDATE_EXTRA_FIX = "pip install 'nwbflow[validate]' (dandi 0.81, nwbinspector 0.7)"
#: Check id of a failed asset-metadata extraction (``dandi upload`` stops on it too).
METADATA_EXTRACTION_CHECK = "dandi.METADATA_EXTRACTION_FAILED"


class ValidatorMissingError(NwbflowError):
    """dandi or nwbinspector is not installed, so DANDI's rules cannot be applied."""


def require_dandi_validators() -> None:
    """Raise ValidatorMissingError naming the fix unless dandi and nwbinspector import."""
    missing = []
    for name in ("dandi", "nwbinspector"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValidatorMissingError(f"DANDI checks need {' and '.join(missing)}, which is not installed: "
                                    f"{VALIDATE_EXTRA_FIX}")


def dandi_upload_findings(path: str | Path) -> tuple[Finding, ...]:
    """What ``dandi upload`` (dandi-cli 0.81) checks on one NWB file before sending it.

    dandi's own ``NWBAsset.get_validation_errors()``: pynwb schema validation
    (naive datetimes included) and nwbinspector with the DANDI configuration
    (Subject, subject_id, sex, species and age/date_of_birth CRITICAL), then
    dandi's asset-metadata extraction, which upload also needs. The file's place
    in a Dandiset (its name) is not checked here. A finding blocks upload when
    its severity is ERROR or CRITICAL (see :func:`blocks_upload`).

    Validator of each finding: "pynwb", "nwbinspector" or "dandi"; ``check`` is
    dandi's result id (e.g. "NWBI.check_subject_age"; for schema errors
    "pynwb.<error class>", e.g. "pynwb.Error"); ``location`` the object path in
    the file when known. Raises ValidatorMissingError without the extra.
    """
    require_dandi_validators()
    from dandi.files import dandi_file
    from dandi.misctypes import DUMMY_DANDI_ETAG

    path = Path(path)
    asset = dandi_file(path)  # no Dandiset path: the layout is checked apart, on the organized name
    findings = []
    for result in asset.get_validation_errors():
        severity = result.severity.name if result.severity is not None else "HINT"
        locations = sorted(set((result.within_asset_paths or {}).values()))
        validator = result.origin.validator.value if result.origin is not None else "dandi"
        check = result.id
        if validator == "pynwb" and not isinstance(result.origin_result, BaseException | None):
            check = f"pynwb.{type(result.origin_result).__name__}"  # dandi's id embeds the whole message
        findings.append(Finding(validator, severity, check, ", ".join(locations), result.message or ""))
    try:
        asset.get_metadata(digest=DUMMY_DANDI_ETAG, ignore_errors=False)
    except Exception as exc:  # dandi raises many types here; `dandi upload` stops on any of them
        findings.append(Finding("dandi", "ERROR", METADATA_EXTRACTION_CHECK, "",
                                f"dandi cannot extract the asset metadata: {type(exc).__name__}: {exc}"))
    return tuple(findings)


def blocks_upload(finding: Finding) -> bool:
    """True when ``dandi upload`` refuses the file for this finding (severity ERROR or CRITICAL)."""
    return finding.severity in ("ERROR", "CRITICAL")
