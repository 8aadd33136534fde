"""Prefect task of the motion stage: MEDiCINe on the peaks, figure, motion-corrected recording for the sorter.

A multi-shank probe (``PreprocessedRecording.shank_ids``) gets one fit per shank, on the peaks of its channels,
and each channel is corrected by its own shank's motion, from its own shank's channels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.motion import Motion, ShankMotion, estimate_motion
from nwbflow.ephys.motion.correction import correct_motion_to_binary
from nwbflow.ephys.motion.medicine import MIN_PEAKS
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.errors import BadInputError
from nwbflow.params import MotionParams
from nwbflow.plots import motion_png
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

log = logging.getLogger(__name__)

MOTION_NPZ = "motion.npz"
MOTION_PNG = "motion.png"
CORRECTED = "corrected.bin"
#: Artifact keys of a multi-shank probe's estimates: ``motion_shank<label>`` (and ``figure_shank<label>``).
SHANK_KEY = "_shank"


def load_motion(npz_path: str | Path) -> Motion:
    """The motion estimate a motion stage saved (one file: the probe's, or one shank's)."""
    with np.load(npz_path) as arrays:
        return Motion(time_bins_s=arrays["time_bins_s"], depth_bins_um=arrays["depth_bins_um"],
                      displacement_um=arrays["displacement_um"])


def motion_files(artifacts: dict) -> dict[str, Path]:
    """The estimates a motion stage wrote: {"": path} for one probe, {shank label: path} per shank."""
    return {key[len("motion" + SHANK_KEY):] if key.startswith("motion" + SHANK_KEY) else "": Path(path)
            for key, path in artifacts.items() if key == "motion" or key.startswith("motion" + SHANK_KEY)}


@task(name="motion", **STAGE_TASK)
def motion_task(spec: StageSpec, params: MotionParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """MEDiCINe motion from peak (time, depth, |amplitude|) -> motion.npz + raster figure (+ corrected recording);
    per shank on a multi-shank probe."""
    recording = PreprocessedRecording.load(upstream["preprocess"].directory)
    table = pq.read_table(upstream["peaks"].artifacts["peaks"], columns=["time_s", "y_um", "amplitude",
                                                                          "channel_index"])
    time_s, depth_um = table["time_s"].to_numpy(), table["y_um"].to_numpy().astype(np.float64)
    amplitude = np.abs(table["amplitude"].to_numpy()).astype(np.float64)
    labels, channel_shanks = np.unique(np.asarray(recording.shank_ids or ("",) * recording.num_channels),
                                       return_inverse=True)
    peak_shanks = channel_shanks[table["channel_index"].to_numpy().astype(np.int64)]
    with StageRun(spec) as run:
        if len(time_s) < MIN_PEAKS:  # a quiet or short recording: nothing to fit, and nothing else to stop
            reason = f"{len(time_s)} peaks, fewer than the {MIN_PEAKS} a motion fit needs: no motion estimated"
            log.warning("motion stage skipped on %s: %s", spec.nwb_path, reason)
            return run.finish({}, {"skipped": reason}, device="none")
        artifacts, fits, motions = {}, [], []
        for shank, label in enumerate(labels):
            mine = peak_shanks == shank
            suffix = f"{SHANK_KEY}{label}" if len(labels) > 1 else ""
            motion, fit = _fit_and_save(run, spec, params, time_s[mine], depth_um[mine], amplitude[mine], suffix,
                                        artifacts, f"shank {label}: " if suffix else "", one_of_many=bool(suffix))
            motions.append(motion)
            fits.append(fit)
        motion = motions[0] if len(labels) == 1 else ShankMotion(tuple(motions), channel_shanks,
                                                                 tuple(str(v) for v in labels))
        if params.write_corrected_traces:
            corrected = correct_motion_to_binary(
                recording.open(), recording.channel_positions_um, motion, params, run.directory / CORRECTED,
                sample_times_s=recording.clock.sample_times_s(), device=run.device, dtype=recording.dtype,
                progress=run.progress(recording.num_samples),
                chunk_samples=max(int(round(spec.policy.chunks.motion_correction_s * recording.sampling_rate_hz)), 1),
                whitening=recording.whitening, whitening_inverse=recording.whitening_inverse)
            artifacts["corrected"] = corrected.out_path
            artifacts["recording"] = recording.with_binary(corrected.out_path).save(run.directory)
        fitted = [fit for fit in fits if fit is not None]
        summary = {"steps": sum(f.steps for f in fitted), "peaks_used": sum(f.peaks_used for f in fitted),
                   "time_bins": max(len(m.time_bins_s) for m in motions),
                   "depth_bins": max(len(m.depth_bins_um) for m in motions),
                   "max_abs_displacement_um": round(max(float(np.abs(m.displacement_um).max()) for m in motions), 1),
                   "final_loss": round(float(np.mean([f.losses[-50:].mean() for f in fitted])), 4) if fitted else None}
        if len(labels) > 1:
            summary["shanks"] = len(labels)
            summary["shanks_without_fit"] = [str(label) for label, fit in zip(labels, fits) if fit is None]
        return run.finish(artifacts, summary)


def _fit_and_save(run: StageRun, spec: StageSpec, params: MotionParams, time_s: np.ndarray, depth_um: np.ndarray,
                  amplitude: np.ndarray, suffix: str, artifacts: dict, what: str, *, one_of_many: bool = False):
    """Fit one probe's or shank's peaks, save ``motion<suffix>.npz`` and its figure into ``artifacts``; returns
    (Motion, MotionFit or None). A shank of several (``one_of_many``) whose peaks cannot be fitted (too few,
    all at one depth) gets zero motion, logged; a probe's own fit failing fails the stage."""
    fit = None
    if len(time_s) >= MIN_PEAKS or not one_of_many:
        try:
            fit = estimate_motion(time_s, depth_um, amplitude, params, seed=spec.policy.seed, device=run.device,
                                  progress=run.progress(params.training_steps, unit="steps"))
        except BadInputError as exc:
            if not one_of_many:
                raise
            log.warning("motion on %s: %s%s: that shank is not corrected", spec.nwb_path, what, exc.message)
    else:
        log.warning("motion on %s: %s%d peaks, fewer than the %d a fit needs: that shank is not corrected",
                    spec.nwb_path, what, len(time_s), MIN_PEAKS)
    motion = fit.motion if fit is not None else Motion(np.array([0.0]), np.array([0.0]), np.zeros((1, 1), np.float32))
    stem = Path(MOTION_NPZ).stem + suffix
    npz, png = run.directory / f"{stem}.npz", run.directory / f"{Path(MOTION_PNG).stem}{suffix}.png"
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, time_bins_s=motion.time_bins_s, depth_bins_um=motion.depth_bins_um,
                 displacement_um=motion.displacement_um,
                 losses=np.zeros(0) if fit is None else fit.losses)
    artifacts[f"motion{suffix}"] = npz
    if fit is not None:
        with atomic_path(png, suffix=".png") as tmp:
            motion_png(time_s, depth_um, amplitude, motion.time_bins_s, motion.depth_bins_um, motion.displacement_um,
                       depth_um - motion.displacement_at(time_s, depth_um), tmp,
                       f"MEDiCINe motion, {what}{fit.steps} steps, {fit.peaks_used} peaks")
        artifacts[f"figure{suffix}"] = png
    return motion, fit
