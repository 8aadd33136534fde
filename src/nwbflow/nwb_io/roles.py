"""Which series of a session a run processes: every probe's raw band, and each segmentation's ROI traces.

**ElectricalSeries.** Every continuous ElectricalSeries sampled at ``RAW_BAND_MIN_RATE_HZ`` (10 kHz) or
faster is a probe's raw band (SpikeGLX AP, Open Ephys, Intan ...); slower ones (LFP bands) are skipped
with one log line. A series whose rate cannot be read is named with its problem.

**RoiResponseSeries, by role, not by count.** A series whose name, or whose container's name, says
neuropil, background, deconvolved, spikes, spks, inferred or denoised is not a trace of the ROIs
(suite2p's ``Neuropil`` and ``Deconvolved``, CaImAn's ``Background_Fluorescence_Response``, our own
``Deconvolved/inferred_spike_rate``). The traces left are grouped by the segmentation (PlaneSegmentation)
their ``rois`` point into, and each segmentation (an imaging plane) gets one choice: its raw fluorescence
(a series in a ``Fluorescence`` container) when there is one, with the neuropil series of the same
container (same shape, same ROIs) as its neuropil; else its ΔF/F (a ``DfOverF`` container). We compute
ΔF/F ourselves, the same way for every file, so raw fluorescence wins over a writer's ΔF/F. A
segmentation with two raw fluorescence series (or, without any, two ΔF/F) is genuinely ambiguous: the
error lists exactly the candidates counted.

Examples
--------
>>> says_role("processing/ophys/Fluorescence/Neuropil")
True
>>> says_role("processing/ophys/Fluorescence/RoiResponseSeries")
False
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from nwbflow.errors import BadInputError

if TYPE_CHECKING:
    from nwbflow.nwb_io.read import NwbSession

log = logging.getLogger(__name__)

#: An ElectricalSeries sampled at least this fast (Hz) is a raw band (an LFP band is slower).
RAW_BAND_MIN_RATE_HZ = 10_000.0
#: Words in a RoiResponseSeries' (or its container's) name that say it is not the ROIs' traces.
ROLE_WORDS = ("neuropil", "background", "deconvolved", "spikes", "spks", "inferred", "denoised")
ROI_FIX = "pass `calcium.roi_series` with the object path(s) of the series to process"


def says_role(object_path: str) -> bool:
    """Whether the series' name or its container's name says it is not the ROIs' traces (:data:`ROLE_WORDS`)."""
    names = [part.lower() for part in object_path.strip("/").split("/")[-2:]]
    return any(word in name for word in ROLE_WORDS for name in names)


def raw_band_paths(session: NwbSession) -> tuple[list[str], list[str]]:
    """(raw-band ElectricalSeries, the others), object paths in file order (acquisition first).

    A series without a finite positive rate counts as raw band, so that processing it names its problem.
    """
    raw, other = [], []
    for path in session.ephys_paths():
        rate = session.nominal_rate_hz(path)
        slow = isinstance(rate, float) and np.isfinite(rate) and 0 < rate < RAW_BAND_MIN_RATE_HZ
        (other if slow else raw).append(path)
    return raw, other


def ephys_to_process(session: NwbSession, named: tuple[str, ...] | None) -> list[str]:
    """Object paths of the ElectricalSeries to process: those ``named``, else every raw band (LFP bands
    are skipped with one log line). BadInputError when there is none, naming what there is."""
    if named:
        return [session.ephys_series(path).object_path for path in named]
    raw, other = raw_band_paths(session)
    if other:
        log.info("%s: skipped (sampled below %g Hz, not a raw band): %s", session.path, RAW_BAND_MIN_RATE_HZ,
                 ", ".join(other))
    if raw:
        return raw
    if not other:
        types = sorted(set(session.neurodata_types().values()))
        found = ", ".join(types[:12]) + (", ..." if len(types) > 12 else "") or "nothing"
        raise BadInputError(f"no ElectricalSeries in this file (types found: {found})", path=session.path,
                            fix="pass a session with an extracellular recording, or run only ophys stages")
    listing = "; ".join(f"{p} ({session.nominal_rate_hz(p):g} Hz)" for p in other)
    raise BadInputError(f"no ElectricalSeries is sampled at >= {RAW_BAND_MIN_RATE_HZ:g} Hz (raw band); "
                        f"candidates: {listing}", path=session.path,
                        fix="pass `electrical_series` with the object path of the series to process")


@dataclass(frozen=True)
class RoiChoice:
    """The ROI traces one segmentation's calcium inference reads.

    Attributes
    ----------
    traces : object path of the RoiResponseSeries
    kind : "fluorescence" (ΔF/F is computed from it) or "dff"
    neuropil : object path of its neuropil series (same container, shape and ROIs), or None
    segmentation : object path of the PlaneSegmentation its ``rois`` point into
    """

    traces: str
    kind: Literal["fluorescence", "dff"]
    neuropil: str | None
    segmentation: str


def roi_kind(session: NwbSession, object_path: str) -> Literal["fluorescence", "dff"]:
    """"dff" when the series sits in a DfOverF container, else "fluorescence"."""
    container = object_path.strip("/").rsplit("/", 1)[0]
    return "dff" if session.is_a(container, "DfOverF") else "fluorescence"


def rois_to_process(session: NwbSession, named: tuple[str, ...] | None = None,
                    exclude: tuple[str, ...] = ()) -> list[RoiChoice]:
    """The ROI traces to process, one :class:`RoiChoice` per segmentation (module docstring), or those
    ``named``. Paths under ``exclude`` (e.g. earlier nwbflow results) are never chosen.

    Raises BadInputError when there is no RoiResponseSeries, a named one is not one, or a segmentation
    is ambiguous (the message lists the candidates).
    """
    paths = [p for p in session.roi_paths() if not any(p.startswith(prefix) for prefix in exclude)]
    if named:
        return [_choice(session, session.select_roi(path).object_path, paths) for path in named]
    traces = [p for p in paths if not says_role(p)]
    if not traces:
        raise BadInputError(f"no RoiResponseSeries holds ROI traces (those in the file: "
                            f"{', '.join(session.roi_paths()) or 'none'}; names saying "
                            f"{'/'.join(ROLE_WORDS)} are not traces)", path=session.path, fix=ROI_FIX)
    by_segmentation: dict[str, list[str]] = {}
    for path in traces:
        by_segmentation.setdefault(session.roi_info(path).rois_table_path, []).append(path)
    choices = []
    for segmentation, candidates in by_segmentation.items():
        raw = [p for p in candidates if roi_kind(session, p) == "fluorescence"]
        pick = raw or candidates
        if len(pick) > 1:
            raise BadInputError(f"{len(pick)} {'fluorescence' if raw else 'ΔF/F'} RoiResponseSeries of the "
                                f"ROIs of {segmentation} to choose from: {', '.join(pick)}",
                                path=session.path, fix=ROI_FIX)
        choices.append(_choice(session, pick[0], paths))
    return choices


def _choice(session: NwbSession, traces: str, paths: list[str]) -> RoiChoice:
    """The choice for one traces series: its kind, and the neuropil series of its container, if any."""
    info = session.roi_info(traces)
    kind = roi_kind(session, traces)
    container = traces.rsplit("/", 1)[0]
    neuropil = None
    if kind == "fluorescence":
        for path in paths:
            if path.rsplit("/", 1)[0] == container and "neuropil" in path.rsplit("/", 1)[1].lower():
                other = session.roi_info(path)
                same_frames = (other.num_frames, other.num_rois) == (info.num_frames, info.num_rois)
                if same_frames and list(other.roi_indices) == list(info.roi_indices):
                    neuropil = path
                    log.info("%s: %s is the neuropil of %s (same container and ROIs)", session.path, path,
                             traces)
                    break
    return RoiChoice(traces, kind, neuropil, info.rois_table_path)
