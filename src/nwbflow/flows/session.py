"""``process_session``: one NWB session in, one processed NWB session out."""

from __future__ import annotations

import logging
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context

from prefect import flow
from prefect.states import Failed

from nwbflow.errors import PartialResultsError
from nwbflow.locks import output_lock
from nwbflow.nwb_io.write import check_target
from nwbflow.params import SessionParams
from nwbflow.tasks.calcium import calcium_task
from nwbflow.tasks.motion import motion_task
from nwbflow.tasks.peaks import peaks_task
from nwbflow.tasks.plan import SeriesFailure, SeriesPlan, plan_session, stage_needs
from nwbflow.tasks.preprocess import preprocess_task
from nwbflow.tasks.report import publish_report
from nwbflow.tasks.caching import is_complete
from nwbflow.tasks.runner import StageOutcome, run_stage
from nwbflow.tasks.scratch import binary_present, binary_sources, forget, holding, release_unread
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
        params: Stages, series, execution policy and per-stage parameters.
        workdir: Folder for intermediate artifacts; default: `.nwbflow-work` beside the output.

    Returns:
        A small summary: each series' stages (seconds, device, artifacts, counts), the output path. When some
        series failed and others did not, the run ends Failed (the file holds what succeeded) and calling
        the flow raises PartialResultsError, which carries that summary.
    """
    out = check_output(nwb_path, out_path)  # before anything is created (the default workdir is beside it)
    with output_lock(out):
        return _run_stages(nwb_path, str(out), params, workdir or default_workdir(out))


def _run_stages(nwb_path: str, out_path: str, params: SessionParams, workdir: str | Path):
    """Plan, run each series' chain of stages, write back, publish the report; the flow's body.

    A series that fails fails alone: the others are written, the failed one gets a provenance row with
    its error, and the run ends Failed with :class:`PartialResultsError` naming it. When every series
    fails, the first one's error is raised.
    """
    plan = plan_session(nwb_path, params, workdir)
    finished, failures = _run_series(plan, params)
    failures = list(plan.failures) + failures
    if not finished:
        raise failures[0].error
    written = write_back_task(plan, out_path, finished, failures, params)
    summary = {"input": plan.nwb_path, "output": written["path"],
               "series": [{"object": s.object, "label": s.label, "kind": s.kind, "workdir": s.workdir}
                          for s, _ in finished],
               "stages": [{"stage": o.stage, "series": series.object, "label": series.label, "seconds": o.seconds,
                           "device": o.provenance.device, "artifacts": o.artifacts, "summary": o.summary}
                          for series, done in finished for o in done.values()],
               "failed": [{"series": f.object or f.kind, "stage": f.stage, "error": f.text()} for f in failures],
               "write_seconds": written["seconds"], "dropped": written["dropped"],
               "input_findings": written["input_findings"]}
    summary["figures"] = publish_report(summary)
    if failures:
        error = PartialResultsError(summary)
        return Failed(message=str(error), data=error)
    return summary


def _run_series(plan, params: SessionParams):
    """Each series' chain of stages: ([(series, {stage: outcome})], [SeriesFailure]).

    With ``execution.series_at_once`` > 1 the chains run on that many threads at once (each stage a
    Prefect task of this flow run); else one after the other, on this thread (where glibc's malloc
    tuning applies: ``nwbflow.device.tune_host_allocator``).
    """

    def chain(series: SeriesPlan):
        done, specs, stage = {}, {}, "plan"

        def run(name: str) -> StageOutcome:
            upstream = {need: done[need] for need in stage_needs(name, params) if need in done}
            sources = binary_sources(name, upstream)
            if not is_complete(specs[name].path):  # it computes: the binaries it reads must be there
                for source in sources:
                    if not binary_present(done[source]):  # deleted after an earlier run: computed again
                        forget(done[source])
                        done[source] = upstream[source] = run(source)
            with holding([upstream[source] for source in sources]):
                return run_stage(STAGE_TASKS[name], specs[name], getattr(params, name), upstream)

        try:
            for stage in series.stages:
                specs[stage] = plan.spec(series, stage, params, done)
                done[stage] = run(stage)
            if not params.execution.keep_preprocessed_binary:
                release_unread(done)
        except Exception as exc:  # noqa: BLE001 - a failing series fails alone; the run names it
            log.error("%s: %s failed in stage %s: %s: %s", plan.nwb_path, series.object, stage,
                      type(exc).__name__, exc)
            return series, done, SeriesFailure(series.kind, series.object, series.label, stage, exc)
        return series, done, None

    at_once = min(params.execution.series_at_once, len(plan.series))
    if at_once > 1:
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="nwbflow-series") as pool:
            results = list(pool.map(lambda s: copy_context().run(chain, s), plan.series))
    else:
        results = [chain(series) for series in plan.series]
    return [(s, done) for s, done, failed in results if failed is None], \
        [failed for _, _, failed in results if failed is not None]
