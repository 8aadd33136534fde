"""``process_session``: one NWB session in, one processed NWB session out."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from nwbflow.device import resolve_device
from nwbflow.params import SessionParams
from nwbflow.tasks.caching import is_complete, stage_dir
from nwbflow.tasks.ephys import peaks_key, peaks_task, preprocess_key, preprocess_task
from nwbflow.tasks.calcium import calcium_key, calcium_task
from nwbflow.tasks.motion import motion_key, motion_task
from nwbflow.tasks.plan import plan_session
from nwbflow.tasks.report import publish_report
from nwbflow.tasks.sorting import sorting_key, sorting_task
from nwbflow.tasks.writeback import write_back_task

log = logging.getLogger(__name__)


def default_workdir(out_path: str | Path) -> Path:
    """Where artifacts go unless told: ``<output dir>/.nwbflow-work``."""
    return Path(out_path).absolute().parent / ".nwbflow-work"


def _cached_unless_missing(task, plan, stage: str, key: str):
    """The task as is when its artifacts are on disk; else with the cache refreshed (recompute)."""
    if is_complete(stage_dir(plan.workdir, stage, key)):
        return task
    return task.with_options(refresh_cache=True)


@flow(name="process-session", validate_parameters=True)
def process_session(nwb_path: str, out_path: str, params: SessionParams = SessionParams(),
                    workdir: str | None = None) -> dict:
    """Run every applicable stage on an NWB session and write the processed file.

    Stages whose inputs, parameters and code are unchanged and whose artifacts
    are still on disk are not recomputed (Prefect shows them as Cached).
    The input file is never modified.

    Args:
        nwb_path: Absolute path of the input NWB file (opened read-only).
        out_path: Absolute path of the processed NWB file to write (a new file, written atomically).
        params: Stages, device and per-stage parameters.
        workdir: Folder for intermediate artifacts; default: `.nwbflow-work` beside the output.

    Returns:
        A small summary: each stage's seconds, device, artifacts and counts, and the output path.
    """
    resolve_device(params.device)  # fail fast on a device that is not there
    plan = plan_session(nwb_path, params, workdir or default_workdir(out_path))
    timeout_s = params.stage_timeout_s
    done = {}
    if "preprocess" in plan.stages:
        key = preprocess_key(plan, params.preprocess)
        done["preprocess"] = _cached_unless_missing(preprocess_task, plan, "preprocess", key)(
            plan, params.preprocess, device=params.device, timeout_s=timeout_s)
    if "peaks" in plan.stages:
        key = peaks_key(plan, done["preprocess"], params.peaks)
        done["peaks"] = _cached_unless_missing(peaks_task, plan, "peaks", key)(
            plan, done["preprocess"], params.peaks, params.preprocess.chunk_duration_s, device=params.device,
            timeout_s=timeout_s)
    if "motion" in plan.stages:
        key = motion_key(plan, done["peaks"], params.motion, seed=0)
        done["motion"] = _cached_unless_missing(motion_task, plan, "motion", key)(
            plan, done["preprocess"], done["peaks"], params.motion, device=params.device, timeout_s=timeout_s)
    if "sorting" in plan.stages:
        motion = done.get("motion")
        key = sorting_key(plan, done["preprocess"], motion, params.sorting)
        done["sorting"] = _cached_unless_missing(sorting_task, plan, "sorting", key)(
            plan, done["preprocess"], motion, params.sorting, device=params.device, timeout_s=timeout_s)
    if "calcium" in plan.stages:
        done["calcium"] = _cached_unless_missing(calcium_task, plan, "calcium", calcium_key(plan, params.calcium))(
            plan, params.calcium, device=params.device, timeout_s=timeout_s)
    outcomes = list(done.values())
    written = write_back_task(plan, out_path, outcomes, params)
    summary = {"input": plan.nwb_path, "output": written["path"], "workdir": plan.workdir,
               "stages": [{"stage": o.stage, "seconds": o.seconds, "device": o.provenance.device,
                           "artifacts": o.artifacts, "summary": o.summary} for o in outcomes],
               "write_seconds": written["seconds"]}
    summary["figures"] = publish_report(summary)
    return summary
