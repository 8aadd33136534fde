"""``process_session``: one NWB session in, one processed NWB session out."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from nwbflow.device import resolve_device
from nwbflow.params import SessionParams
from nwbflow.tasks.ephys import peaks_task, preprocess_task
from nwbflow.tasks.plan import plan_session
from nwbflow.tasks.writeback import write_back_task

log = logging.getLogger(__name__)


def default_workdir(out_path: str | Path) -> Path:
    """Where artifacts go unless told: ``<output dir>/.nwbflow-work``."""
    return Path(out_path).absolute().parent / ".nwbflow-work"


@flow(name="process-session", validate_parameters=True)
def process_session(nwb_path: str, out_path: str, params: SessionParams = SessionParams(),
                    workdir: str | None = None) -> dict:
    """Run every applicable stage on ``nwb_path`` and write the processed file to ``out_path``.

    Returns a small summary: the plan, each stage's seconds/artifacts/counts,
    and the output path. The input file is never modified.
    """
    resolve_device(params.device)  # fail fast on a device that is not there
    plan = plan_session(nwb_path, params, workdir or default_workdir(out_path))
    done = {}
    if "preprocess" in plan.stages:
        done["preprocess"] = preprocess_task(plan, params.preprocess)
    if "peaks" in plan.stages:
        done["peaks"] = peaks_task(plan, done["preprocess"], params.peaks, params.preprocess.chunk_duration_s)
    outcomes = list(done.values())
    written = write_back_task(plan, out_path, outcomes, params)
    return {"input": plan.nwb_path, "output": written["path"], "workdir": plan.workdir,
            "stages": [{"stage": o.stage, "seconds": o.seconds, "artifacts": o.artifacts,
                        "summary": o.summary} for o in outcomes],
            "write_seconds": written["seconds"]}
