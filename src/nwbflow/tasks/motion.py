"""Prefect task of the motion stage: MEDiCINe on the peaks, figure, motion-corrected recording for the sorter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.motion import Motion, estimate_motion
from nwbflow.ephys.motion.correction import correct_motion_to_binary
from nwbflow.ephys.motion.medicine import MIN_PEAKS
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.params import MotionParams
from nwbflow.plots import motion_png
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

log = logging.getLogger(__name__)

MOTION_NPZ = "motion.npz"
MOTION_PNG = "motion.png"
CORRECTED = "corrected.bin"


def load_motion(npz_path: str | Path) -> Motion:
    """The motion estimate a motion stage saved."""
    with np.load(npz_path) as arrays:
        return Motion(time_bins_s=arrays["time_bins_s"], depth_bins_um=arrays["depth_bins_um"],
                      displacement_um=arrays["displacement_um"])


@task(name="motion", **STAGE_TASK)
def motion_task(spec: StageSpec, params: MotionParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """MEDiCINe motion from peak (time, depth, |amplitude|) -> motion.npz + raster figure (+ corrected recording)."""
    recording = PreprocessedRecording.load(upstream["preprocess"].directory)
    table = pq.read_table(upstream["peaks"].artifacts["peaks"], columns=["time_s", "y_um", "amplitude"])
    time_s, depth_um = table["time_s"].to_numpy(), table["y_um"].to_numpy().astype(np.float64)
    amplitude = np.abs(table["amplitude"].to_numpy()).astype(np.float64)
    with StageRun(spec) as run:
        if len(time_s) < MIN_PEAKS:  # a quiet or short recording: nothing to fit, and nothing else to stop
            reason = f"{len(time_s)} peaks, fewer than the {MIN_PEAKS} a motion fit needs: no motion estimated"
            log.warning("motion stage skipped on %s: %s", spec.nwb_path, reason)
            return run.finish({}, {"skipped": reason}, device="none")
        fit = estimate_motion(time_s, depth_um, amplitude, params, seed=spec.policy.seed, device=run.device,
                              progress=run.progress(params.training_steps, unit="steps"))
        motion = fit.motion
        artifacts = {"motion": run.directory / MOTION_NPZ, "figure": run.directory / MOTION_PNG}
        with atomic_path(artifacts["motion"], suffix=".npz") as tmp:
            np.savez(tmp, time_bins_s=motion.time_bins_s, depth_bins_um=motion.depth_bins_um,
                     displacement_um=motion.displacement_um, losses=fit.losses)
        with atomic_path(artifacts["figure"], suffix=".png") as tmp:
            motion_png(time_s, depth_um, amplitude, motion.time_bins_s, motion.depth_bins_um, motion.displacement_um,
                       depth_um - motion.displacement_at(time_s, depth_um), tmp,
                       f"MEDiCINe motion ({fit.steps} steps, {fit.peaks_used} peaks)")
        if params.write_corrected_traces:
            corrected = correct_motion_to_binary(
                recording.open(), recording.channel_positions_um, motion, params, run.directory / CORRECTED,
                sample_times_s=recording.clock.sample_times_s(), device=run.device, dtype=recording.dtype,
                progress=run.progress(recording.num_samples),
                chunk_samples=max(int(round(spec.policy.chunks.motion_correction_s * recording.sampling_rate_hz)), 1),
                whitening=recording.whitening, whitening_inverse=recording.whitening_inverse)
            artifacts["corrected"] = corrected.out_path
            artifacts["recording"] = recording.with_binary(corrected.out_path).save(run.directory)
        summary = {"steps": fit.steps, "peaks_used": fit.peaks_used,
                   "time_bins": len(motion.time_bins_s), "depth_bins": len(motion.depth_bins_um),
                   "max_abs_displacement_um": round(float(np.abs(motion.displacement_um).max()), 1),
                   "final_loss": round(float(fit.losses[-50:].mean()), 4)}
        return run.finish(artifacts, summary)
