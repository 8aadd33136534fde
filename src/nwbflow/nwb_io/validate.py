"""Run the three validators a processed file must pass: pynwb, nwbinspector, dandi.

dandi's file-level validation (what ``dandi validate`` applies to an NWB asset:
schema validation, nwbinspector with the DANDI configuration, metadata rules)
is run per file; where the file sits in a Dandiset is the dandi-prep flow's job.

nwbinspector and dandi are the optional ``validate`` extra; each missing one is
reported as not run (never silently counted as passed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pynwb

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
