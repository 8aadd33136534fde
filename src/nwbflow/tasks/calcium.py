"""Prefect task for the calcium stage: spike rates (Hz) from a RoiResponseSeries -> spike_rate.npy."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from prefect import task

from nwbflow.errors import BadInputError
from nwbflow.nwb_io.read import open_session
from nwbflow.ophys.methods import spike_rate
from nwbflow.ophys.weights import load_cnn
from nwbflow.params import CalciumParams
from nwbflow.tasks.artifacts import save_npy
from nwbflow.tasks.caching import mark_complete, stage_dir, stage_key
from nwbflow.tasks.compute import stage_device
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.policy import STAGE_TASK_OPTIONS, retry_chunk_scale
from nwbflow.tasks.progress import StageProgress
from nwbflow.tasks.provenance import SeriesInput, stage_record, utc_now

log = logging.getLogger(__name__)

SPIKE_RATE_NPY = "spike_rate.npy"


def model_checksum(params: CalciumParams) -> str:
    """SHA-256 of the network the parameters name (verified on load); "" for AR(1)."""
    return load_cnn(params.model).sha256 if params.method == "cnn" else ""


def calcium_parameters_json(params: CalciumParams, model_sha256: str) -> str:
    """The resolved parameters plus the network's checksum, as provenance and the cache key record them."""
    return json.dumps({**json.loads(params.as_json()), "model_sha256": model_sha256}, sort_keys=True,
                      separators=(",", ":"))


def calcium_key(plan: SessionPlan, params: CalciumParams, model_sha256: str | None = None) -> str:
    """Cache key: the file's identity and the RoiResponseSeries' content hash, parameters, network checksum."""
    sha = model_checksum(params) if model_sha256 is None else model_sha256
    identity = json.dumps({"file": plan.input_identity, "rois": plan.ophys.as_dict()}, sort_keys=True)
    return stage_key("calcium", identity, calcium_parameters_json(params, sha))


def holds_dff(params: CalciumParams, object_path: str) -> bool:
    """Whether the series is ΔF/F: as told, else ('auto') when its container is named DfOverF."""
    if params.input_kind != "auto":
        return params.input_kind == "dff"
    return "dfoverf" in object_path.lower()


@task(name="calcium", persist_result=True, **STAGE_TASK_OPTIONS,
      cache_key_fn=lambda _ctx, p: calcium_key(p["plan"], p["params"]))
def calcium_task(plan: SessionPlan, params: CalciumParams, device: str = "auto",
                 timeout_s: float | None = None) -> StageOutcome:
    """ΔF/F (from raw F and neuropil when needed) -> spike rate per frame (Hz) by the CNN or AR(1)."""
    started, clock = utc_now(), time.perf_counter()
    sha = model_checksum(params)
    parameters_json = calcium_parameters_json(params, sha)
    key = calcium_key(plan, params, sha)
    out_dir = stage_dir(plan.workdir, "calcium", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = (plan.ophys,)
    with open_session(plan.nwb_path) as session:
        info = session.roi_info(plan.ophys.object)
        traces = session.read_roi_traces(info.object_path)
        neuropil = None
        if params.neuropil_series is not None:
            neuropil = _neuropil(session, params.neuropil_series, info, plan)
            inputs += (SeriesInput(file=plan.nwb_path, object=params.neuropil_series,
                                   sha256=session.roi_content_hash(params.neuropil_series)),)
    is_dff = holds_dff(params, info.object_path)
    run_params = params.model_copy(update={"batch_size": max(1, int(params.batch_size * retry_chunk_scale()))})
    progress = StageProgress("calcium", 100, timeout_s, unit="%")
    with stage_device(device, "calcium") as torch_device:
        try:
            result = spike_rate(traces, info.rate_hz, run_params, is_dff=is_dff, neuropil=neuropil,
                                device=torch_device, progress=lambda done, total: progress(100 * done // total))
        finally:
            progress.close()
    npy = save_npy(out_dir / SPIKE_RATE_NPY, result.rate_hz)
    record = stage_record("calcium", parameters_json=parameters_json, inputs=inputs, outputs=(str(npy),),
                          start_time_utc=started, device=str(torch_device))
    seconds = time.perf_counter() - clock
    duration_s = info.num_frames / info.rate_hz
    summary = {"method": params.method, "model": result.model, "model_sha256": result.model_sha256,
               "rois": info.num_rois, "frames": info.num_frames, "frame_rate_hz": round(info.rate_hz, 4),
               "input_kind": "dff" if is_dff else "fluorescence",
               "median_noise_level": round(float(np.median(result.noise_level)), 3),
               "mean_rate_hz": round(float(result.rate_hz.mean()), 4),
               "roi_hours_per_s": round(info.num_rois * duration_s / 3600 / max(seconds, 1e-9), 3)}
    mark_complete(out_dir, summary)
    return StageOutcome("calcium", key, seconds, record, {"spike_rate": str(npy)}, summary)


def _neuropil(session, object_path: str, info, plan: SessionPlan) -> np.ndarray:
    """The neuropil traces, checked to match the ROI series frame for frame and ROI for ROI."""
    other = session.select_roi(object_path)
    if other.shape != info.shape or not np.array_equal(other.roi_indices, info.roi_indices):
        raise BadInputError(f"neuropil series has shape {other.shape} and ROI rows differing from "
                            f"{info.object_path} ({info.shape})", path=plan.nwb_path, obj=object_path,
                            fix="pass the neuropil series of the same ROIs, or none")
    return session.read_roi_traces(object_path)
