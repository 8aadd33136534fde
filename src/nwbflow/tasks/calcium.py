"""Prefect task of the calcium stage: spike rates (Hz) from a RoiResponseSeries -> spike_rate.npy."""

from __future__ import annotations

import numpy as np
from prefect import task

from nwbflow.errors import BadInputError
from nwbflow.nwb_io.read import open_session
from nwbflow.ophys.methods import spike_rate
from nwbflow.params import CalciumParams
from nwbflow.tasks.artifacts import save_npy
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

SPIKE_RATE_NPY = "spike_rate.npy"


@task(name="calcium", **STAGE_TASK)
def calcium_task(spec: StageSpec, params: CalciumParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """ΔF/F (from raw F and its neuropil, as planned) -> spike rate per frame (Hz) by the CNN or AR(1).

    What the series holds ("fluorescence" or "dff") and its neuropil series were decided at planning
    (``nwbflow.nwb_io.roles``) and are in the spec's parameters."""
    neuropil_series = spec.parameters["neuropil_series"]
    with StageRun(spec) as run:
        with open_session(spec.nwb_path) as session:
            info = session.roi_info(spec.series)
            traces = session.read_roi_traces(info.object_path)
            neuropil = None if neuropil_series is None else _neuropil(session, neuropil_series, info, spec)
        is_dff = spec.parameters["roi_kind"] == "dff"
        progress = run.progress(100, unit="%")
        result = spike_rate(traces, info.rate_hz, params, is_dff=is_dff, neuropil=neuropil, device=run.device,
                            batch_size=spec.policy.chunks.calcium_windows,
                            progress=lambda done, total: progress(100 * done // total))
        npy = save_npy(run.directory / SPIKE_RATE_NPY, result.rate_hz)
        duration_s = info.num_frames / info.rate_hz
        summary = {"method": params.method, "model": result.model, "model_sha256": result.model_sha256,
                   "rois": info.num_rois, "frames": info.num_frames, "frame_rate_hz": info.rate_hz,
                   "input_kind": "dff" if is_dff else "fluorescence",
                   "neuropil": (neuropil_series or "").rsplit("/", 1)[-1] or "none",
                   "median_noise_level": round(float(np.median(result.noise_level)), 3),
                   "mean_rate_hz": round(float(result.rate_hz.mean()), 4)}
        return run.finish({"spike_rate": npy}, summary, recording_s=duration_s)


def _neuropil(session, object_path: str, info, spec: StageSpec) -> np.ndarray:
    """The neuropil traces, checked to match the ROI series frame for frame and ROI for ROI."""
    other = session.select_roi(object_path)
    same_frames = (other.num_frames, other.num_rois) == (info.num_frames, info.num_rois)
    if not same_frames or not np.array_equal(other.roi_indices, info.roi_indices):
        raise BadInputError(f"neuropil series has {other.num_frames} frames x {other.num_rois} ROIs and ROI rows "
                            f"differing from {info.object_path} ({info.num_frames} x {info.num_rois})",
                            path=spec.nwb_path, obj=object_path,
                            fix="pass the neuropil series of the same ROIs, or none")
    return session.read_roi_traces(object_path)
