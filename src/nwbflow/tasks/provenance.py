"""Provenance rows for stage runs: who ran what, on which inputs, where, when."""

from __future__ import annotations

import functools
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
    """An NWB object a stage read, identified by its content hash."""

    file: str
    object: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "object": self.object, "sha256": self.sha256}


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
