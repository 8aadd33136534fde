"""Prefect task for the motion stage: MEDiCINe on the peaks, figure, motion-corrected traces for the sorter."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.chunks import open_binary
from nwbflow.ephys.motion import Motion, estimate_motion
from nwbflow.ephys.motion.medicine import MIN_PEAKS
from nwbflow.ephys.motion.correction import correct_motion_to_binary
from nwbflow.nwb_io.read import open_session
from nwbflow.params import MotionParams
from nwbflow.plots import motion_png
from nwbflow.tasks.caching import mark_complete, stage_dir, stage_key
from nwbflow.tasks.compute import stage_device
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.policy import STAGE_TASK_OPTIONS
from nwbflow.tasks.progress import StageProgress
from nwbflow.tasks.provenance import stage_record, utc_now

log = logging.getLogger(__name__)

MOTION_NPZ = "motion.npz"
MOTION_PNG = "motion.png"
CORRECTED = "corrected.bin"
METHOD = "medicine"


def motion_parameters_json(params: MotionParams, seed: int) -> str:
    """The resolved parameters plus the fit's seed, as provenance and the cache key record them."""
    return json.dumps({**json.loads(params.as_json()), "seed": seed}, sort_keys=True, separators=(",", ":"))


def motion_key(plan: SessionPlan, peaks: StageOutcome, params: MotionParams, seed: int) -> str:
    return stage_key("motion", plan.input_identity, motion_parameters_json(params, seed), (peaks.key,))


def load_motion(npz_path: str | Path) -> Motion:
    """The motion estimate a motion stage saved."""
    with np.load(npz_path) as arrays:
        return Motion(time_bins_s=arrays["time_bins_s"], depth_bins_um=arrays["depth_bins_um"],
                      displacement_um=arrays["displacement_um"])


@task(name="motion", persist_result=True, **STAGE_TASK_OPTIONS,
      cache_key_fn=lambda _ctx, p: motion_key(p["plan"], p["peaks"], p["params"], p.get("seed", 0)))
def motion_task(plan: SessionPlan, preprocessed: StageOutcome, peaks: StageOutcome, params: MotionParams,
                device: str = "auto", timeout_s: float | None = None, seed: int = 0) -> StageOutcome:
    """MEDiCINe motion from peak (time, depth, |amplitude|) -> motion.npz + raster figure (+ corrected traces)."""
    started, clock = utc_now(), time.perf_counter()
    key = motion_key(plan, peaks, params, seed)
    out_dir = stage_dir(plan.workdir, "motion", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(peaks.artifacts["peaks"], columns=["time_s", "y_um", "amplitude"])
    time_s, depth_um = table["time_s"].to_numpy(), table["y_um"].to_numpy().astype(np.float64)
    amplitude = np.abs(table["amplitude"].to_numpy()).astype(np.float64)
    if len(time_s) < MIN_PEAKS:  # a quiet or short recording: nothing to fit, and nothing else to stop
        reason = f"{len(time_s)} peaks, fewer than the {MIN_PEAKS} a motion fit needs: no motion estimated"
        log.warning("motion stage skipped on %s: %s", plan.nwb_path, reason)
        record = stage_record("motion", parameters_json=motion_parameters_json(params, seed), inputs=(plan.ephys,),
                              outputs=(), start_time_utc=started, device="none")
        mark_complete(out_dir, {"skipped": reason})
        return StageOutcome("motion", key, time.perf_counter() - clock, record, {}, {"skipped": reason})
    progress = StageProgress("motion", params.training_steps, timeout_s, unit="steps")
    with stage_device(device, "motion") as torch_device:
        try:
            fit = estimate_motion(time_s, depth_um, amplitude, params, seed=seed, device=torch_device,
                                  progress=progress)
        finally:
            progress.close()
    motion = fit.motion
    npz = out_dir / MOTION_NPZ
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, time_bins_s=motion.time_bins_s, depth_bins_um=motion.depth_bins_um,
                 displacement_um=motion.displacement_um, losses=fit.losses)
    corrected = depth_um - motion.displacement_at(time_s, depth_um)
    png = out_dir / MOTION_PNG
    with atomic_path(png, suffix=".png") as tmp:
        motion_png(time_s, depth_um, amplitude, motion.time_bins_s, motion.depth_bins_um, motion.displacement_um,
                   corrected, tmp, f"MEDiCINe motion ({fit.steps} steps, {fit.peaks_used} peaks)")
    artifacts = {"motion": str(npz), "figure": str(png)}
    if params.write_corrected_traces:
        artifacts["corrected"] = _correct_traces(plan, preprocessed, motion, params, out_dir, device, timeout_s)
    record = stage_record("motion", parameters_json=motion_parameters_json(params, seed), inputs=(plan.ephys,), outputs=tuple(artifacts.values()), start_time_utc=started,
                          device=str(torch_device))
    seconds = time.perf_counter() - clock
    summary = {"steps": fit.steps, "peaks_used": fit.peaks_used,
               "time_bins": len(motion.time_bins_s), "depth_bins": len(motion.depth_bins_um),
               "max_abs_displacement_um": round(float(np.abs(motion.displacement_um).max()), 1),
               "final_loss": round(float(fit.losses[-50:].mean()), 4)}
    mark_complete(out_dir, summary)
    return StageOutcome("motion", key, seconds, record, artifacts, summary)


def _correct_traces(plan: SessionPlan, preprocessed: StageOutcome, motion: Motion, params: MotionParams,
                    out_dir: Path, device: str, timeout_s: float | None) -> str:
    """Stream the preprocessed binary through the motion interpolation -> ``corrected.bin`` (same dtype)."""
    meta = json.loads(Path(preprocessed.artifacts["meta"]).read_text())
    whitening = preprocessed.artifacts.get("whitening")
    source = open_binary(preprocessed.artifacts["preprocessed"], meta["num_channels"], meta["sampling_rate_hz"],
                         dtype=meta["dtype"])
    progress = StageProgress("motion correction", meta["num_samples"], timeout_s)
    with stage_device(device, "motion correction") as torch_device, open_session(plan.nwb_path) as session:
        series = session.select_ephys(plan.ephys.object)
        times = series.timestamps_s if series.has_timestamps else series.starting_time_s
        try:
            correct_motion_to_binary(source, np.asarray(meta["channel_positions_um"]), motion, params,
                                     out_dir / CORRECTED, sample_times_s=times, device=torch_device,
                                     dtype=meta["dtype"], progress=progress,
                                     whitening=None if whitening is None else np.load(whitening))
        finally:
            progress.close()
    return str(out_dir / CORRECTED)
