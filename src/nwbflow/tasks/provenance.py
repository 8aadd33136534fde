"""Provenance rows for stage runs: who ran what, on which inputs, where, when."""

from __future__ import annotations

import functools
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect.runtime import flow_run, task_run

from nwbflow.nwb_io.provenance import ProvenanceRecord


def utc_now() -> str:
    """The current time as ISO 8601 UTC, e.g. ``2026-11-21T02:30:00.123456+00:00``."""
    return datetime.now(UTC).isoformat()


@functools.cache
def git_revision() -> str:
    """The git commit of the nwbflow source tree, "" when not run from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


@dataclass(frozen=True)
class SeriesInput:
    """An NWB object a stage read: its file's name (never a host path: provenance is published) and NWB
    identifier, its object path, and its content hash."""

    file: str
    identifier: str
    object: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "identifier": self.identifier, "object": self.object, "sha256": self.sha256}


def failure_record(failure, plan) -> ProvenanceRecord:
    """The provenance row of a series that failed (``plan.SeriesFailure``): its stage ("plan" when it failed
    before any stage), its series, status "failed" and the error."""
    series = next((s for s in plan.series if s.object == failure.object), None)
    inputs = (series.input,) if series is not None else (
        SeriesInput(Path(plan.nwb_path).name, plan.identifier, failure.object, ""),)
    now = utc_now()
    return ProvenanceRecord(stage=failure.stage, parameters="{}", inputs=tuple(i.as_dict() for i in inputs),
                            outputs=(), start_time_utc=now, end_time_utc=now, host=socket.gethostname(),
                            device="", flow_run_id=str(flow_run.id or ""), git_revision=git_revision(),
                            status="failed", error=without_host_paths(failure.text(), plan.nwb_path))


#: A path-like token: "/" then characters up to whitespace, a quote, a colon, a comma or a closing bracket.
_PATH_TOKEN = re.compile(r"(?<![\w.])/[^\s'\"`:,;()\[\]]+")


def without_host_paths(text: str, nwb_path: str | Path) -> str:
    """``text`` (an error message) fit for a published file: the input named by its file name, and every
    other absolute path of this machine (a work directory, an artifact) by its last component."""
    text = text.replace(str(nwb_path), Path(nwb_path).name).replace(str(Path(nwb_path).resolve()),
                                                                    Path(nwb_path).name)
    return _PATH_TOKEN.sub(lambda m: Path(m.group(0)).name if Path(m.group(0)).exists() else m.group(0), text)


def stage_record(stage: str, *, parameters_json: str, inputs: tuple[SeriesInput, ...],
                 outputs: tuple[str, ...], start_time_utc: str, device: str) -> ProvenanceRecord:
    """Build the provenance row of a stage that started at ``start_time_utc`` and ends now."""
    return ProvenanceRecord(
        stage=stage,
        parameters=parameters_json,
        inputs=tuple(i.as_dict() for i in inputs),
        outputs=outputs,
        start_time_utc=start_time_utc,
        end_time_utc=utc_now(),
        host=socket.gethostname(),
        device=device,
        flow_run_id=str(flow_run.id or ""),
        task_run_id=str(task_run.id or ""),
        git_revision=git_revision(),
    )
