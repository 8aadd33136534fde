"""Decide what one run does: which stages apply, on which series, in which work directory, on which device.

The plan is made once per run, from one opening of the input: the stages, the series (content-hashed:
the one full read before processing, which also checks every value), the work directory, the
device (resolved once), the calcium network's checksum. :meth:`SessionPlan.spec` turns it into each
stage's :class:`~nwbflow.tasks.runner.StageSpec` (its cache key computed there, once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nwbflow.device import resolve_device
from nwbflow.ephys.filtering import design_bandpass, filter_margin_samples
from nwbflow.ephys.sorting.registry import SORTERS
from nwbflow.errors import BadInputError
from nwbflow.nwb_io.layout import OPHYS_RESULTS
from nwbflow.nwb_io.read import open_session
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
class SessionPlan:
    """What a run of ``process_session`` will do; small.

    ``file_identity``: the input's path, size and mtime; ``ephys``: the ElectricalSeries the ephys
    stages read, ``ophys`` and ``neuropil``: the RoiResponseSeries the calcium stage reads (each None
    when not used), with their content hashes; ``device``: the resolved device; ``calcium_model_sha256``:
    the checksum of the network the calcium stage runs ("" when none).
    """

    nwb_path: str
    stages: tuple[str, ...]
    workdir: str
    file_identity: dict
    device: str
    ephys: SeriesInput | None = None
    ophys: SeriesInput | None = None
    neuropil: SeriesInput | None = None
    calcium_model_sha256: str = ""

    def spec(self, stage: str, params: SessionParams, done: dict[str, StageOutcome]) -> StageSpec:
        """The spec of ``stage`` (its key computed here, once), after the stages in ``done``."""
        if BUILT_STAGES[stage] == "ophys":
            inputs = (self.ophys,) + ((self.neuropil,) if self.neuropil is not None else ())
        else:
            inputs = (self.ephys,)
        return StageSpec.build(stage, workdir=self.workdir, nwb_path=self.nwb_path, file_identity=self.file_identity,
                               series=inputs[0].object, parameters=self._parameters(stage, params),
                               policy=params.execution, device=self.device, inputs=inputs,
                               upstream=tuple(done[s].key for s in stage_needs(stage, params) if s in done))

    def _parameters(self, stage: str, params: SessionParams) -> dict:
        """The resolved parameters that decide ``stage``'s result."""
        own = getattr(params, stage).model_dump(mode="json")
        if stage == "calcium":
            own["model_sha256"] = self.calcium_model_sha256
        if stage == "sorting" and not stage_needs(stage, params):  # waveforms read through our preprocessing
            own["waveform_preprocess"] = params.preprocess.model_dump(mode="json")
        return own


def check_input(nwb_path: str | Path, params: SessionParams) -> tuple[tuple[str, ...], str | None]:
    """Open the input read-only and decide (stages, ElectricalSeries object path); cheap.

    Raises BadInputError for an unreadable file, inapplicable
    stages, an ambiguous, missing or malformed series, and a series its
    stages cannot run on (see ``_fit_to_probe``). The values are checked by
    ``plan_session``'s one full read. Used by the CLI before it starts Prefect.
    """
    with open_session(nwb_path) as session:
        stages, series_path = _stages_and_series(session, Path(nwb_path), params, warn=False)
        _roi_series(session, stages, params)
        return stages, series_path


def _roi_series(session, stages: tuple[str, ...], params: SessionParams) -> str | None:
    """Object path of the RoiResponseSeries the calcium stage reads, or None when it does not run."""
    if "calcium" not in stages:
        return None
    if params.calcium.neuropil_series is not None:
        session.select_roi(params.calcium.neuropil_series)  # exists and is a RoiResponseSeries
    return session.select_roi(params.calcium.roi_series, exclude=(OPHYS_RESULTS,)).object_path


def _stages_and_series(session, nwb_path: Path, params: SessionParams, *,
                       warn: bool = True) -> tuple[tuple[str, ...], str | None]:
    content = {"ephys": bool(session.ephys_paths()), "ophys": bool(session.roi_paths())}
    stages = _resolve_stages(params.stages, content, nwb_path, params)
    series_path = None
    if any(BUILT_STAGES[s] == "ephys" for s in stages):
        series = session.select_ephys(params.electrical_series)
        stages, series_path = _fit_to_probe(stages, series, params, warn=warn), series.object_path
    return stages, series_path


def _fit_to_probe(stages: tuple[str, ...], series, params: SessionParams, *, warn: bool) -> tuple[str, ...]:
    """The stages the series' rate and channels allow.

    Preprocess refuses (BadInputError) a band-pass its sampling rate cannot
    hold, and one channel with the common reference on (the median across
    channels would zero it). Channels all at one depth (one channel, or a row
    across the shank): motion along the probe cannot be estimated, so motion
    is left out with a warning (sorting then reads the preprocessed traces),
    or refused when ``params.stages`` names it.
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


def plan_session(nwb_path: str | Path, params: SessionParams, workdir_root: str | Path) -> SessionPlan:
    """Pick stages and series, hash the series, derive the work directory, resolve the device.

    The work directory is keyed by the input's identity (content hash of the
    series read), so a re-run on the same data finds its artifacts. Hashing
    reads every value once and checks it (NaN/infinities, flat data, a
    conversion out of range: BadInputError before any stage runs); a hash
    memoized for an unchanged file skips that read and those checks.
    """
    device = str(resolve_device(params.execution.device))
    nwb_path, workdir_root = Path(nwb_path).resolve(), Path(workdir_root)
    workdir_root.mkdir(parents=True, exist_ok=True)
    with open_session(nwb_path) as session:
        stages, series_path = _stages_and_series(session, nwb_path, params)
        ephys = None
        if series_path is not None:
            series = session.select_ephys(series_path)
            sha = memoized_content_hash(workdir_root, nwb_path, series_path, series.content_hash)
            ephys = SeriesInput(file=str(nwb_path), object=series_path, sha256=sha)
        ophys, neuropil = _ophys_inputs(session, workdir_root, nwb_path, stages, params)
    size, mtime_ns = file_identity(nwb_path)
    key = (ephys.sha256 if ephys else ophys.sha256 if ophys else "").split(":")[-1][:16] or "nodata"
    workdir = workdir_root / f"{nwb_path.stem}-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("stages %s on %s; work directory %s", ",".join(stages), nwb_path, workdir)
    calcium = params.calcium
    sha = model_checksum(calcium.model) if "calcium" in stages and calcium.method == "cnn" else ""
    return SessionPlan(nwb_path=str(nwb_path), stages=stages, workdir=str(workdir),
                       file_identity={"path": str(nwb_path), "size": size, "mtime_ns": mtime_ns}, device=device,
                       ephys=ephys, ophys=ophys, neuropil=neuropil, calcium_model_sha256=sha)


def _ophys_inputs(session, workdir_root: Path, nwb_path: Path, stages: tuple[str, ...],
                  params: SessionParams) -> tuple[SeriesInput | None, SeriesInput | None]:
    """The calcium stage's series and neuropil series (None when not used), with (memoized) content hashes."""
    roi_path = _roi_series(session, stages, params)
    if roi_path is None:
        return None, None
    inputs = []
    for path in (roi_path, params.calcium.neuropil_series):
        if path is None:
            inputs.append(None)
            continue
        path = path.strip("/")
        sha = memoized_content_hash(workdir_root, nwb_path, path, lambda p=path: session.roi_content_hash(p))
        inputs.append(SeriesInput(file=str(nwb_path), object=path, sha256=sha))
    return inputs[0], inputs[1]


def _resolve_stages(requested: tuple[str, ...] | None, content: dict[str, bool], path: Path,
                    params: SessionParams) -> tuple[str, ...]:
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
        pending = list(requested)
        while pending:
            for need in stage_needs(pending.pop(), params):
                if need not in stages:
                    stages.add(need)
                    pending.append(need)
    return tuple(s for s in STAGE_ORDER if s in stages)
