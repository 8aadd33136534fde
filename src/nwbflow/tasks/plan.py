"""Decide what one run does: which series, which stages on each, where, on which device.

The plan is made once per run, from one opening of the input. A session holds one chain of stages per
series: every probe's raw band (``nwbflow.nwb_io.roles``: preprocess, peaks, motion, sorting) and each
segmentation's ROI traces (calcium). Each series is content-hashed, its values checked on the way
(``EphysSeries.content_hash``: integer samples in gzip chunks by their stored bytes, nothing decoded past
the first varying block), and gets its own work directory, keyed by that hash. A series that cannot
be processed (its clock is broken, its values are not finite, its segmentation is ambiguous) is set aside
with its error: it fails alone. :meth:`SessionPlan.spec` turns a series' stage into its
:class:`~nwbflow.tasks.runner.StageSpec` (its cache key computed there, once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from nwbflow.device import resolve_device
from nwbflow.ephys.filtering import design_bandpass, filter_margin_samples
from nwbflow.ephys.sorting.registry import SORTERS
from nwbflow.errors import BadInputError
from nwbflow.nwb_io import roles
from nwbflow.nwb_io.layout import OPHYS_RESULTS
from nwbflow.nwb_io.read import NwbSession, open_session
from nwbflow.ophys.weights import model_checksum
from nwbflow.params import STAGE_ORDER, SessionParams
from nwbflow.tasks.caching import file_identity, memoized_content_hash
from nwbflow.tasks.provenance import SeriesInput
from nwbflow.tasks.runner import StageOutcome, StageSpec

log = logging.getLogger(__name__)

#: Every stage, with the data it needs ("ephys" or "ophys").
BUILT_STAGES: dict[str, str] = {"preprocess": "ephys", "peaks": "ephys", "motion": "ephys", "sorting": "ephys",
                                 "calcium": "ophys"}
#: Stages whose artifacts a stage reads (sorting: ours; a SpikeInterface sorter reads the raw series).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {"peaks": ("preprocess",), "motion": ("preprocess", "peaks"),
                                           "sorting": ("preprocess", "motion")}


def stage_needs(stage: str, params: SessionParams) -> tuple[str, ...]:
    """The stages ``stage`` reads the artifacts of, with these parameters."""
    if stage == "sorting" and SORTERS[params.sorting.sorter].reads == "raw":
        return ()
    return STAGE_NEEDS.get(stage, ())


@dataclass(frozen=True)
class SeriesPlan:
    """One series and its own chain of stages.

    Attributes
    ----------
    kind : "ephys" (an ElectricalSeries) or "ophys" (a RoiResponseSeries)
    input : the series, with its content hash
    stages : the stages run on it, in order
    workdir : its work directory (keyed by its content hash)
    label : the suffix of its results' names in the processed file, "" when it is the only series of its kind
    neuropil : ophys: the neuropil series subtracted from its raw fluorescence, or None
    roi_kind : ophys: "fluorescence" or "dff"
    notes : what was decided on the way (a rate taken from the ImagingPlane, the neuropil found), for provenance
    """

    kind: Literal["ephys", "ophys"]
    input: SeriesInput
    stages: tuple[str, ...]
    workdir: str
    label: str = ""
    neuropil: SeriesInput | None = None
    roi_kind: str = ""
    notes: tuple[str, ...] = ()

    @property
    def object(self) -> str:
        return self.input.object


@dataclass(frozen=True)
class SeriesFailure:
    """A series that failed (at planning, or in a stage), with the error that says why."""

    kind: str
    object: str
    label: str
    stage: str
    error: BaseException

    def text(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


@dataclass(frozen=True)
class SessionPlan:
    """What a run of ``process_session`` will do; small.

    ``file_identity``: the input's path, size and mtime (cache keys); ``identifier``: its NWB identifier;
    ``device``: resolved once; ``series``: each series' own chain; ``failures``: series set aside at
    planning; ``calcium_model_sha256``: the checksum of the network calcium runs ("" when none).
    """

    nwb_path: str
    identifier: str
    file_identity: dict
    device: str
    series: tuple[SeriesPlan, ...]
    failures: tuple[SeriesFailure, ...] = ()
    calcium_model_sha256: str = ""

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage some series runs, in order."""
        return tuple(s for s in STAGE_ORDER if any(s in series.stages for series in self.series))

    def spec(self, series: SeriesPlan, stage: str, params: SessionParams,
             done: dict[str, StageOutcome]) -> StageSpec:
        """The spec of ``stage`` on ``series`` (its key computed here, once), after the stages in ``done``."""
        inputs = (series.input,) + ((series.neuropil,) if series.neuropil is not None else ())
        return StageSpec.build(stage, workdir=series.workdir, nwb_path=self.nwb_path,
                               file_identity=self.file_identity, series=series.object,
                               parameters=self._parameters(series, stage, params), policy=params.execution,
                               device=self.device, inputs=inputs,
                               upstream=tuple(done[s].key for s in stage_needs(stage, params) if s in done))

    def _parameters(self, series: SeriesPlan, stage: str, params: SessionParams) -> dict:
        """The resolved parameters that decide ``stage``'s result on ``series``."""
        own = getattr(params, stage).model_dump(mode="json")
        if stage == "calcium":
            own.update(model_sha256=self.calcium_model_sha256, roi_kind=series.roi_kind,
                       neuropil_series=series.neuropil.object if series.neuropil else None)
            own.pop("roi_series", None)  # which series: the spec's input, not a parameter of its result
        if stage == "sorting" and not stage_needs(stage, params):  # waveforms read through our preprocessing
            own["waveform_preprocess"] = params.preprocess.model_dump(mode="json")
        if series.notes:
            own["notes"] = list(series.notes)
        return own


def check_input(nwb_path: str | Path, params: SessionParams) -> tuple[tuple[str, ...], list[str]]:
    """Open the input read-only and decide (stages, series object paths) without hashing; cheap.

    Raises BadInputError for an unreadable file, inapplicable stages, and when no series can be
    processed (the first series' own error). Used by the CLI before it starts Prefect.
    """
    with open_session(nwb_path, decode_threads=params.execution.cpu_threads()) as session:
        series, failures = _choose(session, Path(nwb_path), params, None)
    if not series:
        raise failures[0].error
    return tuple(s for s in STAGE_ORDER if any(s in p.stages for p in series)), [p.object for p in series]


def plan_session(nwb_path: str | Path, params: SessionParams, workdir_root: str | Path) -> SessionPlan:
    """Pick and hash the series, their stages and work directories; resolve the device.

    Hashing checks the values (NaN/infinities, flat data, a conversion out of range): integer samples in
    gzip chunks are hashed by their stored bytes, decoding samples only until a channel varies; other data
    is read once in full (``EphysSeries.content_hash``). A hash memoized for an unchanged file skips that
    read and those checks. A series that fails here is
    set aside (``SessionPlan.failures``); when every one fails, its error is raised.
    """
    device = str(resolve_device(params.execution.device))
    nwb_path, workdir_root = Path(nwb_path).resolve(), Path(workdir_root)
    workdir_root.mkdir(parents=True, exist_ok=True)
    with open_session(nwb_path, decode_threads=params.execution.cpu_threads()) as session:
        series, failures = _choose(session, nwb_path, params, workdir_root)
        identifier = session.identifier
    if not series:
        raise failures[0].error
    for failed in failures:
        log.error("%s: %s set aside: %s", nwb_path, failed.object or failed.kind, failed.text())
    size, mtime_ns = file_identity(nwb_path)
    calcium = params.calcium
    uses_cnn = calcium.method == "cnn" and any(s.kind == "ophys" for s in series)
    log.info("%s: %s", nwb_path, "; ".join(f"{s.object}: {','.join(s.stages)} in {s.workdir}" for s in series))
    return SessionPlan(nwb_path=str(nwb_path), identifier=identifier,
                       file_identity={"path": str(nwb_path), "size": size, "mtime_ns": mtime_ns}, device=device,
                       series=tuple(series), failures=tuple(failures),
                       calcium_model_sha256=model_checksum(calcium.model) if uses_cnn else "")


def _choose(session: NwbSession, nwb_path: Path, params: SessionParams,
            workdir_root: Path | None) -> tuple[list[SeriesPlan], list[SeriesFailure]]:
    """Every series with its stages (hashed and given a work directory when ``workdir_root`` is given)."""
    content = {"ephys": bool(session.ephys_paths()), "ophys": bool(session.roi_paths())}
    if params.stages is None and not params.electrical_series and content["ophys"] \
            and not roles.raw_band_paths(session)[0]:
        content["ephys"] = False  # LFP bands only: the calcium stage runs alone
    stages = _resolve_stages(params.stages, content, nwb_path, params)
    plans, failures = [], []
    ephys_stages = tuple(s for s in stages if BUILT_STAGES[s] == "ephys")
    if ephys_stages:
        paths = roles.ephys_to_process(session, params.electrical_series)
        for path in paths:
            try:
                plans.append(_ephys_plan(session, nwb_path, path, ephys_stages, params, workdir_root,
                                         label=_label(path, paths)))
            except BadInputError as exc:
                failures.append(SeriesFailure("ephys", path, _label(path, paths), "plan", exc))
    if "calcium" in stages:
        try:
            choices = roles.rois_to_process(session, params.calcium.roi_series, exclude=(OPHYS_RESULTS,))
        except BadInputError as exc:
            failures.append(SeriesFailure("ophys", "", "", "plan", exc))
            choices = []
        paths = [c.traces for c in choices]
        for choice in choices:
            try:
                plans.append(_ophys_plan(session, nwb_path, choice, params, workdir_root, _label(choice.traces, paths),
                                         several=len(choices) > 1))
            except BadInputError as exc:
                failures.append(SeriesFailure("ophys", choice.traces, _label(choice.traces, paths), "plan", exc))
    return plans, failures


def _label(object_path: str, paths: list[str]) -> str:
    """The suffix of a series' results: "" when it is alone, else its name (with its container's when the
    name is not unique), e.g. ``ElectricalSeriesAPImec1`` or ``plane1_RoiResponseSeries``."""
    if len(paths) < 2:
        return ""
    name = object_path.rsplit("/", 1)[-1]
    if sum(p.rsplit("/", 1)[-1] == name for p in paths) == 1:
        return name
    return "_".join(object_path.strip("/").split("/")[-2:])


def _ephys_plan(session: NwbSession, nwb_path: Path, object_path: str, stages: tuple[str, ...],
                params: SessionParams, workdir_root: Path | None, label: str) -> SeriesPlan:
    series = session.ephys_series(object_path)
    stages = _fit_to_probe(stages, series, params, warn=workdir_root is not None)
    sha = "" if workdir_root is None else memoized_content_hash(workdir_root, nwb_path, object_path,
                                                                 series.content_hash)
    return SeriesPlan("ephys", _input(session, nwb_path, object_path, sha), stages,
                      _workdir(workdir_root, nwb_path, sha), label, notes=_clock_notes(series.irregular))


def _clock_notes(irregular: str) -> tuple[str, ...]:
    return (f"{irregular}; processed as continuous samples, times from the timestamps",) if irregular else ()


def _ophys_plan(session: NwbSession, nwb_path: Path, choice: roles.RoiChoice, params: SessionParams,
                workdir_root: Path | None, label: str, *, several: bool) -> SeriesPlan:
    info = session.roi_info(choice.traces)
    notes = list(_clock_notes(info.irregular))
    if info.rate_source == "imaging_plane":
        notes.append(f"frame rate {info.rate_hz:g} Hz from the ImagingPlane's imaging_rate (the series has none)")
    neuropil = choice.neuropil
    if params.calcium.neuropil_series is not None:
        if several:
            raise BadInputError("calcium.neuropil_series names one neuropil series but several ROI series are "
                                "processed", path=nwb_path, obj=params.calcium.neuropil_series,
                                fix="name the ROI series too (calcium.roi_series), or leave neuropil_series "
                                    "unset: each container's neuropil series is found")
        neuropil = session.select_roi(params.calcium.neuropil_series).object_path
    kind = choice.kind if params.calcium.input_kind == "auto" else params.calcium.input_kind
    if neuropil is not None and kind == "fluorescence":
        notes.append(f"neuropil: {neuropil}")
    else:
        neuropil = None
    hashed = {}
    for path in (choice.traces, neuropil):
        if path is not None:
            hashed[path] = "" if workdir_root is None else memoized_content_hash(
                workdir_root, nwb_path, path, lambda p=path: session.roi_content_hash(p))
    sha = hashed[choice.traces]
    return SeriesPlan("ophys", _input(session, nwb_path, choice.traces, sha), ("calcium",),
                      _workdir(workdir_root, nwb_path, sha), label,
                      neuropil=None if neuropil is None else _input(session, nwb_path, neuropil, hashed[neuropil]),
                      roi_kind=kind, notes=tuple(notes))


def _input(session: NwbSession, nwb_path: Path, object_path: str, sha: str) -> SeriesInput:
    return SeriesInput(file=nwb_path.name, identifier=session.identifier, object=object_path, sha256=sha)


def _workdir(root: Path | None, nwb_path: Path, sha: str) -> str:
    """``<root>/<file stem>-<first 16 hex digits of the series' hash>``, created ("" without a root)."""
    if root is None:
        return ""
    workdir = root / f"{nwb_path.stem}-{sha.split(':')[-1][:16] or 'nodata'}"
    workdir.mkdir(parents=True, exist_ok=True)
    return str(workdir)


def _fit_to_probe(stages: tuple[str, ...], series, params: SessionParams, *, warn: bool) -> tuple[str, ...]:
    """The stages the series' rate and channels allow.

    Preprocess (and a SpikeInterface sorter's waveforms) refuse (BadInputError) a band-pass the
    sampling rate cannot hold, and one channel with the common reference on (the median across
    channels would zero it). Channels all at one depth (one channel, or a row across the shank): motion
    along the probe cannot be estimated, so motion is left out with a warning (sorting then reads the
    preprocessed traces), or refused when ``params.stages`` names it.
    """
    where = {"path": series.file_path, "obj": series.object_path}
    if {"preprocess", "sorting"} & set(stages):  # both filter (sorting: a SpikeInterface sorter's waveforms)
        _check_band(series.sampling_rate_hz, params, where)
        if params.preprocess.common_reference and series.num_channels < 2:
            raise BadInputError("has one channel: the common reference (median across channels) would zero it",
                                fix="set `preprocess: {common_reference: false}` in the parameters (--params)",
                                **where)
    depths_um = np.unique(series.channel_positions_um[:, 1])
    if "motion" not in stages or depths_um.size > 1:
        return stages
    reason = (f"motion along the probe cannot be estimated: its {series.num_channels} channel(s) all sit at "
              f"depth {depths_um[0]:g} µm")
    if params.stages is not None and "motion" in params.stages:
        raise BadInputError(reason, fix="leave motion out of the stages (--stages)", **where)
    if warn:
        log.warning("%s: %s: motion stage skipped: %s", series.file_path, series.object_path, reason)
    return tuple(s for s in stages if s != "motion")


def _check_band(rate_hz: float, params: SessionParams, where: dict) -> None:
    """Design the preprocess band-pass at the series' rate now, so a misfit names the file and series."""
    band = params.preprocess
    try:
        filter_margin_samples(design_bandpass(band.freq_min_hz, band.freq_max_hz, rate_hz, band.filter_order))
    except BadInputError as exc:
        raise BadInputError(f"sampled at {rate_hz:g} Hz: {exc.message}", fix=exc.fix, **where) from exc


def _resolve_stages(requested: tuple[str, ...] | None, content: dict[str, bool], path: Path,
                    params: SessionParams) -> tuple[str, ...]:
    if requested is None:
        stages = {s for s, needs in BUILT_STAGES.items() if content[needs]}
        if not stages:
            raise BadInputError(
                "nothing to run: no built stage applies to this file "
                f"(raw-band ElectricalSeries: {content['ephys']}, RoiResponseSeries: {content['ophys']}; "
                f"built stages: {', '.join(BUILT_STAGES)})", path=path,
                fix="give a file with an ElectricalSeries or a RoiResponseSeries")
    else:
        missing = [s for s in requested if not content[BUILT_STAGES[s]]]
        if missing:
            raise BadInputError(f"stage(s) {', '.join(missing)} need data the file does not hold",
                                path=path, fix="drop those stages or give a file with that data")
        stages = set(requested)
        pending = list(requested)
        while pending:
            for need in stage_needs(pending.pop(), params):
                if need not in stages:
                    stages.add(need)
                    pending.append(need)
    return tuple(s for s in STAGE_ORDER if s in stages)
