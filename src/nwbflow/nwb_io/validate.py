"""Validation of NWB files, in one place: each validator runs once per file, one rule says what blocks.

The validators are those ``dandi upload`` (dandi-cli 0.81) applies to an NWB asset: pynwb's schema
validation, nwbinspector with DANDI's configuration (importance threshold BEST_PRACTICE_VIOLATION),
and dandi's asset-metadata extraction. With dandi installed, its own asset validation runs pynwb and
nwbinspector (once each) and labels each result with the validator it came from; without it,
pynwb and (when installed) nwbinspector run directly, nwbinspector's importances mapped to
severities as dandi maps them (:data:`INSPECTOR_SEVERITY`).

**The one rule:** a finding *blocks* when its severity is ERROR or CRITICAL — what ``dandi upload``
refuses a file for (:func:`blocks`). Write-back refuses a processed file that has a blocking
finding; dandi-prep reports a file with one as blocked. What a file already had is told apart from
what a later file introduced with :meth:`ValidationReport.introduced_over`.

nwbinspector and dandi are the optional ``validate`` extra: a missing one is reported as not run
(never silently counted as passed); :func:`require_dandi_validators` refuses to go on without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pynwb

from nwbflow.errors import NwbflowError

log = logging.getLogger(__name__)

VALIDATORS = ("pynwb", "nwbinspector", "dandi")
#: Severities, least to most severe (dandi's vocabulary).
SEVERITIES = ("INFO", "HINT", "WARNING", "ERROR", "CRITICAL")
#: nwbinspector importance -> severity, as dandi maps them (``dandi.files.bases``).
INSPECTOR_SEVERITY = {"ERROR": "ERROR", "PYNWB_VALIDATION": "ERROR", "CRITICAL": "ERROR",
                      "BEST_PRACTICE_VIOLATION": "WARNING", "BEST_PRACTICE_SUGGESTION": "HINT"}
#: The ``pip install`` that brings dandi and nwbinspector.
VALIDATE_EXTRA_FIX = "pip install 'nwbflow[validate]' (dandi 0.81, nwbinspector 0.7)"
#: Check id of a failed asset-metadata extraction (``dandi upload`` stops on it too).
METADATA_EXTRACTION_CHECK = "dandi.METADATA_EXTRACTION_FAILED"


@dataclass(frozen=True)
class Finding:
    """One validator message: who said it, how bad, about what."""

    validator: str      # "pynwb" | "nwbinspector" | "dandi"
    severity: str       # one of SEVERITIES
    check: str          # "pynwb.<error class>", "NWBI.<check function>" or dandi's result id
    location: str       # object path in the file, when known
    message: str

    def key(self) -> tuple[str, str, str]:
        """What identifies the same problem in two files (an input and its processed file)."""
        return (self.validator, self.check, self.location)


def blocks(finding: Finding) -> bool:
    """The one rule: True when ``dandi upload`` refuses a file for this finding (severity ERROR or CRITICAL)."""
    return finding.severity in ("ERROR", "CRITICAL")


@dataclass(frozen=True)
class ValidationReport:
    """A file's findings, and the validators that could not run (not installed)."""

    path: Path
    findings: tuple[Finding, ...]
    not_run: tuple[str, ...] = field(default=())

    def blocking(self) -> tuple[Finding, ...]:
        """The findings that block (:func:`blocks`)."""
        return tuple(f for f in self.findings if blocks(f))

    def introduced_over(self, baseline: ValidationReport, at_least: str = "WARNING") -> tuple[Finding, ...]:
        """Findings of severity ``at_least`` or worse that ``baseline`` (e.g. the input file) did not have."""
        known = {f.key() for f in baseline.findings}
        floor = SEVERITIES.index(at_least)
        return tuple(f for f in self.findings if SEVERITIES.index(f.severity) >= floor and f.key() not in known)


class ValidatorMissingError(NwbflowError):
    """dandi or nwbinspector is not installed, so DANDI's rules cannot be applied."""


def require_dandi_validators() -> None:
    """Raise ValidatorMissingError naming the fix unless dandi and nwbinspector import."""
    missing = [name for name in ("dandi", "nwbinspector") if not _installed(name)]
    if missing:
        raise ValidatorMissingError(f"DANDI checks need {' and '.join(missing)}, which is not installed: "
                                    f"{VALIDATE_EXTRA_FIX}")


def validate_file(path: str | Path, validators: tuple[str, ...] = VALIDATORS) -> ValidationReport:
    """Run ``validators`` (each once) on one NWB file.

    "pynwb": schema validation; "nwbinspector": the inspector with DANDI's configuration; "dandi":
    dandi's asset-metadata extraction (with "nwbinspector", through dandi's own asset validation, as
    ``dandi upload`` runs it). A validator that is not installed is listed in ``not_run``.
    """
    path = Path(path)
    wanted = set(validators)
    not_run = [name for name in ("nwbinspector", "dandi") if name in wanted and not _installed(name)]
    for name in not_run:
        log.warning("%s is not installed: install nwbflow[validate] to run it", name)
    if wanted & {"nwbinspector", "dandi"} and _installed("dandi") and _installed("nwbinspector"):
        findings = _through_dandi(path, metadata="dandi" in wanted)
        findings = [f for f in findings if f.validator in wanted]
    else:
        findings = list(_pynwb_findings(path)) if "pynwb" in wanted else []
        if "nwbinspector" in wanted and "nwbinspector" not in not_run:
            findings += _inspector_findings(path)
    return ValidationReport(path=path, findings=tuple(findings), not_run=tuple(not_run))


def dandi_upload_findings(path: str | Path) -> tuple[Finding, ...]:
    """What ``dandi upload`` checks on one NWB file before sending it (its place in a Dandiset aside):
    every validator of :func:`validate_file`. Raises ValidatorMissingError without the extra."""
    require_dandi_validators()
    return validate_file(path).findings


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _pynwb_findings(path: Path):
    for error in pynwb.validate(path=str(path)):
        yield Finding("pynwb", "ERROR", f"pynwb.{type(error).__name__}", str(getattr(error, "location", "") or ""),
                      str(error))


def _inspector_findings(path: Path) -> list[Finding]:
    from nwbinspector import Importance, inspect_nwbfile, load_config

    return [Finding("nwbinspector", INSPECTOR_SEVERITY[message.importance.name],
                    f"NWBI.{message.check_function_name}", str(message.location or ""), message.message)
            for message in inspect_nwbfile(nwbfile_path=str(path), skip_validate=True,
                                           config=load_config(filepath_or_keyword="dandi"),
                                           importance_threshold=Importance.BEST_PRACTICE_VIOLATION)]


def _through_dandi(path: Path, *, metadata: bool) -> list[Finding]:
    """dandi's own asset validation (pynwb, then nwbinspector with the DANDI configuration), and
    optionally its metadata extraction."""
    from dandi.files import dandi_file
    from dandi.misctypes import DUMMY_DANDI_ETAG

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
    if metadata:
        try:
            asset.get_metadata(digest=DUMMY_DANDI_ETAG, ignore_errors=False)
        except Exception as exc:  # noqa: BLE001 - dandi raises many types here; `dandi upload` stops on any of them
            findings.append(Finding("dandi", "ERROR", METADATA_EXTRACTION_CHECK, "",
                                    f"dandi cannot extract the asset metadata: {type(exc).__name__}: {exc}"))
    return findings
