"""``process_session``: one NWB session in, one processed NWB session out."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from nwbflow.device import resolve_device
from nwbflow.errors import BadInputError
from nwbflow.locks import directory_lock, output_lock
from nwbflow.nwb_io.write import check_target
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


def _alone_in(directory: Path, task, plan, *args, **kwargs):
    """Run a stage task on ``plan`` while holding the lock of its artifact directory ``directory``.

    Two runs of the same input (e.g. to two outputs) share stage directories;
    the second waits for the first and then finds the stage Cached, so no
    artifact is ever written by two runs at once. A stage whose artifacts are
    gone is recomputed (cache refreshed) instead of read from the cache. A
    BadInputError from a kernel (kernels know no file) gets the input file
    and the series the stage reads.
    """
    with directory_lock(directory):
        chosen = task if is_complete(directory) else task.with_options(refresh_cache=True)
        try:
            return chosen(plan, *args, **kwargs)
        except BadInputError as exc:
            if exc.path is not None:
                raise
            series = plan.ophys if task.name == "calcium" else plan.ephys
            raise BadInputError(f"{task.name}: {exc.message}", path=plan.nwb_path, obj=exc.obj or series.object,
                                fix=exc.fix) from exc


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
    resolve_device(params.device)  # fail fast on a device that is not there
    with output_lock(out):
        return _run_stages(nwb_path, str(out), params, workdir or default_workdir(out))


def _run_stages(nwb_path: str, out_path: str, params: SessionParams, workdir: str | Path) -> dict:
    """Plan, run the stages in order, write back, publish the report; the flow's body."""
    plan = plan_session(nwb_path, params, workdir)
    timeout_s, device = params.stage_timeout_s, params.device
    done = {}
    if "preprocess" in plan.stages:
        where = stage_dir(plan.workdir, "preprocess", preprocess_key(plan, params.preprocess))
        done["preprocess"] = _alone_in(where, preprocess_task, plan, params.preprocess, device=device,
                                       timeout_s=timeout_s)
    if "peaks" in plan.stages:
        where = stage_dir(plan.workdir, "peaks", peaks_key(plan, done["preprocess"], params.peaks))
        done["peaks"] = _alone_in(where, peaks_task, plan, done["preprocess"], params.peaks,
                                  params.preprocess.chunk_duration_s, device=device, timeout_s=timeout_s)
    if "motion" in plan.stages:
        where = stage_dir(plan.workdir, "motion", motion_key(plan, done["peaks"], params.motion, seed=0))
        done["motion"] = _alone_in(where, motion_task, plan, done["preprocess"], done["peaks"], params.motion,
                                   device=device, timeout_s=timeout_s)
    if "sorting" in plan.stages:
        motion = done.get("motion")
        where = stage_dir(plan.workdir, "sorting", sorting_key(plan, done["preprocess"], motion, params.sorting))
        done["sorting"] = _alone_in(where, sorting_task, plan, done["preprocess"], motion, params.sorting,
                                    device=device, timeout_s=timeout_s)
    if "calcium" in plan.stages:
        where = stage_dir(plan.workdir, "calcium", calcium_key(plan, params.calcium))
        done["calcium"] = _alone_in(where, calcium_task, plan, params.calcium, device=device, timeout_s=timeout_s)
    outcomes = list(done.values())
    written = write_back_task(plan, out_path, outcomes, params)
    summary = {"input": plan.nwb_path, "output": written["path"], "workdir": plan.workdir,
               "stages": [{"stage": o.stage, "seconds": o.seconds, "device": o.provenance.device,
                           "artifacts": o.artifacts, "summary": o.summary} for o in outcomes],
               "write_seconds": written["seconds"]}
    summary["figures"] = publish_report(summary)
    return summary
