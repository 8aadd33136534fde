"""``process_session``: one NWB session in, one processed NWB session out."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from nwbflow.locks import output_lock
from nwbflow.nwb_io.write import check_target
from nwbflow.params import SessionParams
from nwbflow.tasks.calcium import calcium_task
from nwbflow.tasks.motion import motion_task
from nwbflow.tasks.peaks import peaks_task
from nwbflow.tasks.plan import plan_session, stage_needs
from nwbflow.tasks.preprocess import preprocess_task
from nwbflow.tasks.report import publish_report
from nwbflow.tasks.runner import run_stage
from nwbflow.tasks.sorting import sorting_task
from nwbflow.tasks.writeback import write_back_task

log = logging.getLogger(__name__)


def default_workdir(out_path: str | Path) -> Path:
    """Where artifacts go unless told: ``<output dir>/.nwbflow-work``."""
    return Path(out_path).absolute().parent / ".nwbflow-work"


#: The task of each stage.
STAGE_TASKS = {"preprocess": preprocess_task, "peaks": peaks_task, "motion": motion_task, "sorting": sorting_task,
               "calcium": calcium_task}


def check_output(nwb_path: str | Path, out_path: str | Path) -> Path:
    """The output as an absolute path; BadInputError when its folder is missing or unwritable, or it is the input.

    Cheap; called before anything runs (by the flow, and by the CLI before Prefect starts).
    """
    check_target(nwb_path, out_path)
    return Path(out_path).absolute()


@flow(name="process-session", validate_parameters=True)
def process_session(nwb_path: str, out_path: str, params: SessionParams = SessionParams(),
                    workdir: str | None = None) -> dict:
    """Run every applicable stage on an NWB session and write the processed file.

    Stages whose inputs, parameters and code are unchanged and whose artifacts
    are still on disk are not recomputed (Prefect shows them as Cached).
    The input file is never modified. The run holds the output's lock
    (``.<name>.nwbflow.lock`` beside it) from start to end: a second run on
    the same output fails at once with ``OutputBusyError``, before any stage.

    Args:
        nwb_path: Absolute path of the input NWB file (opened read-only).
        out_path: Absolute path of the processed NWB file to write (a new file, written atomically); its folder
            must exist.
        params: Stages, device and per-stage parameters.
        workdir: Folder for intermediate artifacts; default: `.nwbflow-work` beside the output.

    Returns:
        A small summary: each stage's seconds, device, artifacts and counts, and the output path.
    """
    out = check_output(nwb_path, out_path)  # before anything is created (the default workdir is beside it)
    with output_lock(out):
        return _run_stages(nwb_path, str(out), params, workdir or default_workdir(out))


def _run_stages(nwb_path: str, out_path: str, params: SessionParams, workdir: str | Path) -> dict:
    """Plan, run the stages in order, write back, publish the report; the flow's body."""
    plan = plan_session(nwb_path, params, workdir)
    done = {}
    for stage in plan.stages:
        spec = plan.spec(stage, params, done)
        upstream = {need: done[need] for need in stage_needs(stage, params) if need in done}
        done[stage] = run_stage(STAGE_TASKS[stage], spec, getattr(params, stage), upstream)
    outcomes = list(done.values())
    written = write_back_task(plan, out_path, outcomes, params)
    summary = {"input": plan.nwb_path, "output": written["path"], "workdir": plan.workdir,
               "stages": [{"stage": o.stage, "seconds": o.seconds, "device": o.provenance.device,
                           "artifacts": o.artifacts, "summary": o.summary} for o in outcomes],
               "write_seconds": written["seconds"]}
    summary["figures"] = publish_report(summary)
    return summary
