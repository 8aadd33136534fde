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


def holds_dff(params: CalciumParams, object_path: str) -> bool:
    """Whether the series is ΔF/F: as told, else ('auto') when its container is named DfOverF."""
    if params.input_kind != "auto":
        return params.input_kind == "dff"
    return "dfoverf" in object_path.lower()


@task(name="calcium", **STAGE_TASK)
def calcium_task(spec: StageSpec, params: CalciumParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """ΔF/F (from raw F and neuropil when needed) -> spike rate per frame (Hz) by the CNN or AR(1)."""
    with StageRun(spec) as run:
        with open_session(spec.nwb_path) as session:
            info = session.roi_info(spec.series)
            traces = session.read_roi_traces(info.object_path)
            neuropil = None if params.neuropil_series is None else _neuropil(session, params.neuropil_series, info,
                                                                              spec)
        is_dff = holds_dff(params, info.object_path)
        progress = run.progress(100, unit="%")
        result = spike_rate(traces, info.rate_hz, params, is_dff=is_dff, neuropil=neuropil, device=run.device,
                            batch_size=spec.policy.chunks.calcium_windows,
                            progress=lambda done, total: progress(100 * done // total))
        npy = save_npy(run.directory / SPIKE_RATE_NPY, result.rate_hz)
        duration_s = info.num_frames / info.rate_hz
        summary = {"method": params.method, "model": result.model, "model_sha256": result.model_sha256,
                   "rois": info.num_rois, "frames": info.num_frames, "frame_rate_hz": round(info.rate_hz, 4),
                   "input_kind": "dff" if is_dff else "fluorescence",
                   "median_noise_level": round(float(np.median(result.noise_level)), 3),
                   "mean_rate_hz": round(float(result.rate_hz.mean()), 4)}
        return run.finish({"spike_rate": npy}, summary, recording_s=duration_s)


def _neuropil(session, object_path: str, info, spec: StageSpec) -> np.ndarray:
    """The neuropil traces, checked to match the ROI series frame for frame and ROI for ROI."""
    other = session.select_roi(object_path)
    if other.shape != info.shape or not np.array_equal(other.roi_indices, info.roi_indices):
        raise BadInputError(f"neuropil series has shape {other.shape} and ROI rows differing from "
                            f"{info.object_path} ({info.shape})", path=spec.nwb_path, obj=object_path,
                            fix="pass the neuropil series of the same ROIs, or none")
    return session.read_roi_traces(object_path)
