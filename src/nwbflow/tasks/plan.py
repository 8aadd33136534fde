"""Decide what one run does: which stages apply, on which series, in which work directory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from nwbflow.errors import BadInputError
from nwbflow.nwb_io.layout import OPHYS_RESULTS
from nwbflow.nwb_io.read import open_session
from nwbflow.params import STAGE_ORDER, SessionParams
from nwbflow.tasks.caching import file_identity, memoized_content_hash
from nwbflow.tasks.provenance import SeriesInput

log = logging.getLogger(__name__)

#: Every stage, with the data it needs ("ephys" or "ophys").
BUILT_STAGES: dict[str, str] = {"preprocess": "ephys", "peaks": "ephys", "motion": "ephys", "sorting": "ephys",
                                 "calcium": "ophys"}
#: Stages a stage cannot run without (their artifacts feed it).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {"peaks": ("preprocess",), "motion": ("peaks", "preprocess"),
                                           "sorting": ("motion", "peaks", "preprocess")}


@dataclass(frozen=True)
class SessionPlan:
    """What a run of ``process_session`` will do; small, travels between tasks."""

    nwb_path: str
    stages: tuple[str, ...]
    workdir: str
    input_identity: str
    ephys: SeriesInput | None = None
    #: The RoiResponseSeries the calcium stage reads (None when it does not run).
    ophys: SeriesInput | None = None


def check_input(nwb_path: str | Path, params: SessionParams) -> tuple[tuple[str, ...], str | None]:
    """Open the input read-only and decide (stages, ElectricalSeries object path); cheap.

    Raises BadInputError for an unreadable file, inapplicable
    stages and an ambiguous or missing series. Used by the CLI before it
    starts Prefect, and by ``plan_session``.
    """
    with open_session(nwb_path) as session:
        stages, series_path = _stages_and_series(session, Path(nwb_path), params)
        _roi_series(session, stages, params)
        return stages, series_path


def _roi_series(session, stages: tuple[str, ...], params: SessionParams) -> str | None:
    """Object path of the RoiResponseSeries the calcium stage reads, or None when it does not run."""
    if "calcium" not in stages:
        return None
    if params.calcium.neuropil_series is not None:
        session.select_roi(params.calcium.neuropil_series)  # exists and is a RoiResponseSeries
    return session.select_roi(params.calcium.roi_series, exclude=(OPHYS_RESULTS,)).object_path


def _stages_and_series(session, nwb_path: Path, params: SessionParams) -> tuple[tuple[str, ...], str | None]:
    content = {"ephys": bool(session.ephys_paths()), "ophys": bool(session.roi_paths())}
    stages = _resolve_stages(params.stages, content, nwb_path)
    series_path = None
    if any(BUILT_STAGES[s] == "ephys" for s in stages):
        series_path = session.select_ephys(params.electrical_series).object_path
    return stages, series_path


def plan_session(nwb_path: str | Path, params: SessionParams, workdir_root: str | Path) -> SessionPlan:
    """Pick stages and series, hash the series, derive the work directory.

    The work directory is keyed by the input's identity (content hash of the
    series read), so a re-run on the same data finds its artifacts.
    """
    nwb_path, workdir_root = Path(nwb_path).resolve(), Path(workdir_root)
    workdir_root.mkdir(parents=True, exist_ok=True)
    with open_session(nwb_path) as session:
        stages, series_path = _stages_and_series(session, nwb_path, params)
        ephys = None
        if series_path is not None:
            series = session.select_ephys(series_path)
            sha = memoized_content_hash(workdir_root, nwb_path, series_path, series.content_hash)
            ephys = SeriesInput(file=str(nwb_path), object=series_path, sha256=sha)
        ophys = _ophys_input(session, workdir_root, nwb_path, stages, params)
    size, mtime_ns = file_identity(nwb_path)
    identity = json.dumps({"path": str(nwb_path), "size": size, "mtime_ns": mtime_ns,
                           "object": ephys.object if ephys else "", "sha256": ephys.sha256 if ephys else ""})
    key = (ephys.sha256 if ephys else ophys.sha256 if ophys else "").split(":")[-1][:16] or "nodata"
    workdir = workdir_root / f"{nwb_path.stem}-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("stages %s on %s; work directory %s", ",".join(stages), nwb_path, workdir)
    return SessionPlan(nwb_path=str(nwb_path), stages=stages, workdir=str(workdir), input_identity=identity,
                       ephys=ephys, ophys=ophys)


def _ophys_input(session, workdir_root: Path, nwb_path: Path, stages: tuple[str, ...],
                 params: SessionParams) -> SeriesInput | None:
    """The calcium stage's input series with its (memoized) content hash; None when it does not run."""
    roi_path = _roi_series(session, stages, params)
    if roi_path is None:
        return None
    sha = memoized_content_hash(workdir_root, nwb_path, roi_path, lambda: session.roi_content_hash(roi_path))
    return SeriesInput(file=str(nwb_path), object=roi_path, sha256=sha)


def _resolve_stages(requested: tuple[str, ...] | None, content: dict[str, bool], path: Path) -> tuple[str, ...]:
    if requested is None:
        stages = {s for s, needs in BUILT_STAGES.items() if content[needs]}
        if not stages:
            raise BadInputError(
                "nothing to run: no built stage applies to this file "
                f"(ElectricalSeries: {content['ephys']}, RoiResponseSeries: {content['ophys']}; "
                f"built stages: {', '.join(BUILT_STAGES)})", path=path,
                fix="give a file with an ElectricalSeries or a RoiResponseSeries")
    else:
        missing = [s for s in requested if not content[BUILT_STAGES[s]]]
        if missing:
            raise BadInputError(f"stage(s) {', '.join(missing)} need data the file does not hold",
                                path=path, fix="drop those stages or give a file with that data")
        stages = set(requested)
        for stage in requested:
            stages.update(STAGE_NEEDS.get(stage, ()))
    return tuple(s for s in STAGE_ORDER if s in stages)
