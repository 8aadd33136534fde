"""Motion estimation accuracy and speed: ours (MEDiCINe in torch) vs medicine-neuro vs dredge_ap, same peaks.

Data: SpikeInterface's ``generate_drifting_recording`` (seeded), a Neuropixels-1-like probe of
``--num-channels`` contacts (4 columns, two contacts per 20 µm row), 2 units per channel, 30 kHz, with
two motions summed (``generate_displacement_vector``): a non-rigid zigzag (36 µm peak to peak for
units at the lowest y, falling linearly to 40 % of that at the highest y; period duration/3, starting
at duration/10) plus rigid random steps ("bump": levels alternating between +12 and -12 µm, each held for 5-15 % of
the duration). The drifting
recording is preprocessed by us (``preprocess_to_binary``, ``PreprocessParams()``) and its peaks are
detected and localized by us (``iter_peaks``, ``PeakParams(localization="monopolar_triangulation")``).
Every method gets exactly these peaks: time (s), depth = ``y_um`` (µm), amplitude (as detected).
Peaks and truth are cached in ``--data-dir``; delete the files to regenerate.

Truth: the generator draws, for motion m, a vector ``v_m`` sampled at ``displacement_sampling_frequency``
(5 Hz; a spike at time t uses sample ``floor(t * 5 Hz)``) and gives unit u the factor ``f_m(u)``, linear
in the unit's projection on the drift axis (y here): ``f_m = a_m + b_m * y_rest`` (rigid: 1). The unit's
displacement is ``D(t, y_rest) = sum_m v_m(t) * f_m(y_rest)`` (y component), snapped to the nearest
precomputed template position (1 µm steps; that rounding, at most 0.5 µm per spike, is not part of
the truth). ``a_m, b_m`` are recovered exactly from the per-unit factors the generator returns
(least squares on [1, y], residual checked ~0), and D is checked against the generator's own
``unit_displacements`` for every unit and sample. Estimates are, like SpikeInterface's ``Motion``,
functions of the depth at which a spike is *observed* (observed = rest + displacement); so the truth
at observed depth z is ``z - r`` where ``r = (z - A(t)) / (1 + B(t))`` solves ``z = r + D(t, r)``, with
``A = sum_m v_m a_m`` and ``B = sum_m v_m b_m``. The JSON also gives the errors against D taken at
rest depth z (``*_rest_depth``). The data step also checks the truth against the peaks: for each
ground-truth unit, the slope of its matched peaks' y on the true displacement should be near 1.

Error: on a grid of times (centres of the 5 Hz truth samples) x depths (every 10 µm over the contacts'
span), e = estimate - truth, the estimate read with ``Motion.displacement_at`` (linear between bin
centres, constant beyond). One global offset is removed (motion is only defined up to a constant):
MAE = mean |e - median e|, P95 = 95th percentile of |e - median e|, RMSE = rms(e - mean e).

Rows (each in its own process: clean wall time and peak RSS; threads = ``--threads`` for torch and BLAS):
  none          zero motion: the error of not correcting at all (the scale of the drift)
  ours          nwbflow.ephys.motion.estimate_motion, MotionParams() (our defaults), glibc's malloc
                tuned first as the flow's stages do (tune_host_allocator)
  ours_paper    the same with MotionParams.paper() (the reference's hyper-parameters)
                (``--ours-steps`` overrides training_steps, for quick checks of the harness only)
  reference     medicine.run_medicine(...) with its defaults (``--reference-steps`` = training_steps;
                10000 is its default). Its time_bins are bin LEFT edges; they are converted to centres.
  dredge_ap     spikeinterface.sortingcomponents.motion.estimate_motion(method="dredge_ap"), defaults
  ours_1h       ours on the peaks tiled in time to one hour (``--tile-to-s``; errors vs the tiled truth,
                which jumps at the tile joins): the "one-hour session on the GPU" timing
On ``--device cpu`` CUDA is hidden from the children (the reference and dredge pick CUDA by themselves).

Usage (commands used for benchmarks/RESULTS.md; 2 threads shared with other jobs -> take the lock):
  flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/motion.py --duration-s 120 --reference-steps 2000
  flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/motion.py                  # 600 s, all defaults
  .venv/bin/python benchmarks/motion.py --device cuda --rows ours ours_paper reference dredge_ap ours_1h
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from _measure import child_env, peak_rss_mb, run_child

RATE_HZ = 30_000.0
SEED = 0
DATA_VERSION = 1  # bump when the recipe below changes: cached files carry it in their names
UNITS_PER_CHANNEL = 2
GRID_DEPTH_STEP_UM = 10.0
ROWS = ("none", "ours", "ours_paper", "reference", "dredge_ap", "ours_1h")


# ----------------------------------------------------------------------------------------- recipe
def probe_kwargs(num_channels: int) -> dict:
    """Neuropixels-1-like: 4 staggered columns 16 µm apart, 40 µm pitch per column (a row every 20 µm)."""
    if num_channels % 4:
        raise SystemExit(f"--num-channels must be a multiple of 4 (4 columns), got {num_channels}")
    return {"num_columns": 4, "num_contact_per_column": num_channels // 4, "xpitch": 16.0, "ypitch": 40.0,
            "y_shift_per_column": [20.0, 0.0, 20.0, 0.0], "contact_shapes": "square",
            "contact_shape_params": {"width": 12.0}}


def drift_kwargs(duration_s: float) -> dict:
    """Non-rigid zigzag (factor 1 -> 0.4 across depth) plus rigid random steps; ±30 µm bounds.

    Shapes are in [-0.5, 0.5] times ``amplitude_factor`` times the 60 µm span of the bounds, so the
    zigzag reaches ±18 µm and the steps ±12 µm (the generator refuses sums beyond the bounds).
    """
    return {
        "displacement_sampling_frequency": 5.0, "drift_start_um": [0.0, 30.0], "drift_stop_um": [0.0, -30.0],
        "drift_step_um": 1.0,
        "motion_list": [
            {"drift_mode": "zigzag", "amplitude_factor": 0.6, "non_rigid_gradient": 0.4,
             "t_start_drift": duration_s / 10, "t_end_drift": None, "period_s": duration_s / 3},
            {"drift_mode": "bump", "amplitude_factor": 0.4, "non_rigid_gradient": None,
             "t_start_drift": duration_s / 20, "t_end_drift": None,
             "bump_interval_s": (duration_s / 20, 3 * duration_s / 20)},
        ]}


def data_stem(data_dir: Path, duration_s: float, num_channels: int) -> Path:
    return data_dir / f"motion_{num_channels}ch_{int(duration_s)}s_seed{SEED}_v{DATA_VERSION}"


# ------------------------------------------------------------------------------------------ truth
class Truth:
    """The generator's motion as a function of time and depth (module docstring: derivation)."""

    def __init__(self, vectors_um: np.ndarray, sampling_hz: float, unit_factors: np.ndarray, unit_y_um: np.ndarray):
        if np.any(np.asarray(vectors_um)[:, 0, :] != 0):
            raise RuntimeError("the recipe drifts along x too: a depth-only truth would be incomplete")
        self.vectors_um = np.asarray(vectors_um, np.float64)[:, 1, :]  # (samples, motions): y component
        self.sampling_hz = float(sampling_hz)
        design = np.stack([np.ones_like(unit_y_um), unit_y_um], axis=1).astype(np.float64)
        coefficients, *_ = np.linalg.lstsq(design, unit_factors, rcond=None)  # (2, motions)
        residual = np.abs(design @ coefficients - unit_factors).max()
        if residual > 1e-6:
            raise RuntimeError(f"unit factors are not linear in depth (max residual {residual:g})")
        self.intercept, self.slope_per_um = coefficients

    def _sums(self, times_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.clip(np.floor(np.asarray(times_s) * self.sampling_hz).astype(np.int64), 0,
                        len(self.vectors_um) - 1)
        vectors = self.vectors_um[index]
        return vectors @ self.intercept, vectors @ self.slope_per_um  # A(t), B(t)

    def at_rest_depth(self, times_s: np.ndarray, rest_um: np.ndarray) -> np.ndarray:
        """D(t, r) = A(t) + B(t) r, broadcasting times against depths."""
        a, b = self._sums(times_s)
        return a + b * rest_um

    def at_observed_depth(self, times_s: np.ndarray, observed_um: np.ndarray) -> np.ndarray:
        """The displacement of a source seen at depth z: z - r with z = r + D(t, r)."""
        a, b = self._sums(times_s)
        return observed_um - (observed_um - a) / (1.0 + b)

    def grid(self, duration_s: float, depth_lo_um: float, depth_hi_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation grid: centres of the truth samples within the recording x depths every 10 µm."""
        times = (np.arange(int(math.floor(duration_s * self.sampling_hz))) + 0.5) / self.sampling_hz
        depths = np.arange(depth_lo_um, depth_hi_um + 1e-6, GRID_DEPTH_STEP_UM)
        return times, depths


def check_truth(truth: Truth, extra: dict) -> dict:
    """Compare D at each unit's rest depth with the generator's own per-unit displacement."""
    unit_y = extra["unit_locations"][:, 1].astype(np.float64)
    expected = extra["unit_displacements"][:, :, 1]  # (samples, units)
    times = (np.arange(len(expected)) + 0.5) / truth.sampling_hz
    derived = truth.at_rest_depth(times[:, None], unit_y[None, :])
    error = float(np.abs(derived - expected).max())
    if error > 1e-3:
        raise RuntimeError(f"derived truth differs from the generator's unit_displacements by {error:.3g} µm")
    shallow, deep = int(np.argmax(unit_y)), int(np.argmin(unit_y))
    picks = np.linspace(0, len(times) - 1, 6).astype(int)
    for unit in (shallow, deep):
        print(f"  unit {unit} at y={unit_y[unit]:.0f} µm: t={np.round(times[picks], 1).tolist()} s -> generator "
              f"{np.round(expected[picks, unit], 2).tolist()}, "
              f"derived {np.round(derived[picks, unit], 2).tolist()} µm")
    return {"max_abs_vs_generator_um": error}


def check_truth_against_peaks(truth: Truth, peaks: dict, sorting, unit_y_um: np.ndarray) -> dict:
    """Slope of matched peaks' depth on the true displacement, per unit (near 1 if sign and timing agree).

    A peak is matched to the ground-truth spike within 0.5 ms whose unit's rest depth is nearest
    to the peak's depth (the truth is not used to match).
    """
    spikes = sorting.to_spike_vector()
    window = int(0.5e-3 * RATE_HZ)
    lo = np.searchsorted(spikes["sample_index"], peaks["sample_index"] - window, side="left")
    hi = np.searchsorted(spikes["sample_index"], peaks["sample_index"] + window, side="right")
    matched_unit = np.full(len(lo), -1)
    best = np.full(len(lo), np.inf)
    for offset in range(int((hi - lo).max(initial=0))):
        candidate = lo + offset
        valid = candidate < hi
        units = spikes["unit_index"][np.minimum(candidate, len(spikes) - 1)]
        distance = np.where(valid, np.abs(peaks["y_um"] - unit_y_um[units]), np.inf)
        better = distance < np.minimum(best, 40.0)
        matched_unit[better], best[better] = units[better], distance[better]
    times = peaks["sample_index"] / RATE_HZ
    slopes = []
    for unit in np.unique(matched_unit[matched_unit >= 0]):
        mine = matched_unit == unit
        if mine.sum() < 200:
            continue
        true_um = truth.at_rest_depth(times[mine], unit_y_um[unit])
        if np.std(true_um) < 2.0:
            continue
        slopes.append(np.polyfit(true_um, peaks["y_um"][mine], 1)[0])
    slopes = np.asarray(slopes)
    return {"units_checked": int(slopes.size), "median_slope": float(np.median(slopes)) if slopes.size else None,
            "slope_quartiles": np.quantile(slopes, [0.25, 0.75]).tolist() if slopes.size else None,
            "matched_fraction": float(np.mean(matched_unit >= 0))}


# ------------------------------------------------------------------------------------------- data
def make_data(data_dir: Path, duration_s: float, num_channels: int, device: str) -> Path:
    """Generate the drifting recording, our peaks on it and the truth; cache them as one npz (once)."""
    stem = data_stem(data_dir, duration_s, num_channels)
    out = stem.with_suffix(".npz")
    if out.is_file():
        return out
    from spikeinterface.generation import generate_drifting_recording

    from nwbflow.ephys.peaks import iter_peaks
    from nwbflow.ephys.preprocess import preprocess_to_binary
    from nwbflow.evaluation import RecordingSource
    from nwbflow.params import PeakParams, PreprocessParams

    data_dir.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    _, drifting, sorting, extra = generate_drifting_recording(
        num_units=UNITS_PER_CHANNEL * num_channels, duration=duration_s, sampling_frequency=RATE_HZ,
        generate_probe_kwargs=probe_kwargs(num_channels), generate_displacement_vector_kwargs=drift_kwargs(duration_s),
        extra_outputs=True, seed=SEED)
    truth = Truth(extra["displacement_vectors"], extra["displacement_sampling_frequency"],
                  extra["displacement_unit_factor"], extra["unit_locations"][:, 1].astype(np.float64))
    print("truth check (derived vs the generator's per-unit displacement):")
    checks = {"generator": check_truth(truth, extra)}
    positions = drifting.get_channel_locations()
    binary = stem.with_suffix(".preprocessed.bin")
    pre = preprocess_to_binary(RecordingSource(drifting), PreprocessParams(), binary, device=device)
    peak_params = PeakParams(localization="monopolar_triangulation")
    batches = list(iter_peaks(pre.open(), positions, peak_params, whitening_inverse=pre.whitening_inverse,
                              device=device))
    binary.unlink()
    peaks = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    checks["peaks"] = check_truth_against_peaks(truth, peaks, sorting, extra["unit_locations"][:, 1])
    print(f"truth check against the peaks: {checks['peaks']}")
    meta = {"duration_s": duration_s, "num_channels": num_channels, "num_units": UNITS_PER_CHANNEL * num_channels,
            "seed": SEED, "num_peaks": int(len(peaks["sample_index"])), "peak_params": peak_params.model_dump(),
            "preprocess_dtype": pre.dtype, "drift": drift_kwargs(duration_s), "probe": probe_kwargs(num_channels),
            "truth_checks": checks, "data_seconds": time.perf_counter() - clock, "device": device}
    partial = stem.with_suffix(".partial.npz")
    np.savez(partial, times_s=peaks["sample_index"] / RATE_HZ, depths_um=peaks["y_um"], amplitudes=peaks["amplitude"],
             sample_index=peaks["sample_index"], channel_index=peaks["channel_index"], x_um=peaks["x_um"],
             channel_positions_um=positions, vectors_um=extra["displacement_vectors"],
             truth_sampling_hz=extra["displacement_sampling_frequency"], unit_factors=extra["displacement_unit_factor"],
             unit_locations_um=extra["unit_locations"], meta=json.dumps(meta))
    partial.rename(out)
    print(f"data: {meta['num_peaks']} peaks in {meta['data_seconds']:.0f} s -> {out}")
    return out


def load_data(path: Path) -> tuple[dict, Truth, dict]:
    with np.load(path) as stored:
        data = {key: stored[key] for key in stored.files}
    truth = Truth(data["vectors_um"], float(data["truth_sampling_hz"]), data["unit_factors"],
                  data["unit_locations_um"][:, 1].astype(np.float64))
    return data, truth, json.loads(str(data["meta"]))


# -------------------------------------------------------------------------------------- evaluation
def errors(motion, truth: Truth, duration_s: float, positions_um: np.ndarray, tile: int = 1) -> dict:
    """MAE / RMSE / P95 (µm) of ``motion`` (our Motion) against the truth, one global offset removed."""
    times, depths = truth.grid(duration_s, float(positions_um[:, 1].min()), float(positions_um[:, 1].max()))
    tiled = np.concatenate([times + k * duration_s for k in range(tile)])
    grid_t, grid_z = np.meshgrid(tiled, depths, indexing="ij")
    estimate = motion.displacement_at(grid_t.ravel(), grid_z.ravel()).reshape(grid_t.shape)
    result = {"grid": [int(grid_t.shape[0]), int(grid_t.shape[1])]}
    for name, true_um in (("", truth.at_observed_depth(times[:, None], depths[None, :])),
                          ("_rest_depth", truth.at_rest_depth(times[:, None], depths[None, :]))):
        error = estimate - np.tile(true_um, (tile, 1))
        centred = np.abs(error - np.median(error))
        result.update({f"mae_um{name}": float(centred.mean()), f"p95_um{name}": float(np.quantile(centred, 0.95)),
                       f"rmse_um{name}": float(np.sqrt(np.mean((error - error.mean()) ** 2))),
                       f"offset_um{name}": float(np.median(error))})
    return result


# ------------------------------------------------------------------------------------------- rows
def run_none(data: dict) -> tuple:
    from nwbflow.ephys.motion.displacement import Motion

    depths = data["channel_positions_um"][:, 1]
    motion = Motion(time_bins_s=np.array([0.0]), depth_bins_um=np.array([depths.min()]),
                    displacement_um=np.zeros((1, 1), np.float32))
    return motion, 0.0, None, "zero displacement", {}


def run_ours(data: dict, paper: bool, device: str, tile: int, steps: int | None) -> tuple:
    """Our fit, with the host allocator tuned as the flow's stages do (``tasks.runner.StageRun``)."""
    from nwbflow.device import tune_host_allocator
    from nwbflow.ephys.motion.medicine import estimate_motion
    from nwbflow.params import MotionParams

    overrides = {} if steps is None else {"training_steps": steps}
    params = MotionParams.paper(**overrides) if paper else MotionParams(**overrides)
    times, depths, amps = data["times_s"], data["depths_um"], data["amplitudes"]
    if tile > 1:
        duration_s = float(json.loads(str(data["meta"]))["duration_s"])
        times = np.concatenate([times + k * duration_s for k in range(tile)])
        depths, amps = np.tile(depths, tile), np.tile(amps, tile)
    tune_host_allocator()
    clock = time.perf_counter()
    fit = estimate_motion(times, depths, amps, params, seed=SEED, device=device)
    _sync(device)
    seconds = time.perf_counter() - clock
    settings = ("MotionParams.paper()" if paper else "MotionParams() defaults") + (
        "" if steps is None else f", training_steps={steps}")
    return fit.motion, seconds, fit.steps, settings, {"params": params.model_dump(mode="json"),
                                                      "fit_seconds": fit.seconds, "num_input_peaks": len(times)}


def run_reference(data: dict, steps: int) -> tuple:
    import medicine
    import torch

    from nwbflow.ephys.motion.displacement import Motion

    np.random.seed(SEED)
    torch.manual_seed(SEED)
    kwargs = {} if steps == 10_000 else {"training_steps": steps}
    clock = time.perf_counter()
    trainer, time_bins, depth_bins, pred_motion = medicine.run_medicine(
        data["times_s"], data["depths_um"], data["amplitudes"], output_dir=None, plot_figures=False, **kwargs)
    seconds = time.perf_counter() - clock
    bin_s = trainer.medicine_model.motion_function.time_bin_size
    motion = Motion(time_bins_s=np.asarray(time_bins) + 0.5 * bin_s,  # left edges -> centres
                    depth_bins_um=np.asarray(depth_bins), displacement_um=np.asarray(pred_motion))
    settings = "run_medicine defaults" + ("" if steps == 10_000 else f", training_steps={steps}")
    return motion, seconds, steps, settings, {"device_used": str(trainer.device),
                                              "time_bins": "left edges, converted to centres (+bin/2)"}


def run_dredge(data: dict, duration_s: float, device: str) -> tuple:
    from spikeinterface.core import NoiseGeneratorRecording
    from spikeinterface.core.base import base_peak_dtype
    from spikeinterface.sortingcomponents.motion import estimate_motion

    from nwbflow.ephys.motion.displacement import Motion

    positions = data["channel_positions_um"]
    # dredge_ap reads only the duration, clock and contact depths of the recording, never its traces
    recording = NoiseGeneratorRecording(num_channels=len(positions), sampling_frequency=RATE_HZ,
                                        durations=[duration_s], noise_levels=1.0, strategy="on_the_fly")
    recording.set_channel_locations(positions)
    peaks = np.zeros(len(data["sample_index"]), dtype=base_peak_dtype)
    peaks["sample_index"], peaks["channel_index"] = data["sample_index"], data["channel_index"]
    peaks["amplitude"] = data["amplitudes"]
    locations = np.zeros(len(peaks), dtype=[("x", "float64"), ("y", "float64")])
    locations["x"], locations["y"] = data["x_um"], data["depths_um"]
    clock = time.perf_counter()
    si_motion = estimate_motion(recording, peaks, locations, method="dredge_ap", device=device)
    seconds = time.perf_counter() - clock
    motion = Motion(time_bins_s=si_motion.temporal_bins_s[0], depth_bins_um=si_motion.spatial_bins_um,
                    displacement_um=si_motion.displacement[0])
    return motion, seconds, None, "estimate_motion defaults (non-rigid)", {}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    """Run one row in this process; print its JSON row."""
    import torch

    torch.set_num_threads(args.threads)
    data_path = data_stem(Path(args.data_dir), args.duration_s, args.num_channels).with_suffix(".npz")
    data, truth, meta = load_data(data_path)
    load_before = os.getloadavg()[0]  # other work on the machine inflates wall times: keep the evidence
    tile = max(1, math.ceil(args.tile_to_s / args.duration_s)) if args.child == "ours_1h" else 1
    if args.child == "none":
        motion, seconds, steps, settings, extra = run_none(data)
    elif args.child in ("ours", "ours_paper", "ours_1h"):
        motion, seconds, steps, settings, extra = run_ours(data, args.child == "ours_paper", args.device, tile,
                                                         args.ours_steps)
    elif args.child == "reference":
        motion, seconds, steps, settings, extra = run_reference(data, args.reference_steps)
    else:
        motion, seconds, steps, settings, extra = run_dredge(data, args.duration_s, args.device)
    row = {"row": args.child, "settings": settings, "steps": steps, "seconds": seconds,
           **errors(motion, truth, args.duration_s, data["channel_positions_um"], tile),
           "threads": torch.get_num_threads(), "device": args.device, "peak_rss_mb": peak_rss_mb(),
           "session_s": args.duration_s * tile, "num_peaks": meta["num_peaks"],
           "time_bins": int(len(motion.time_bins_s)), "depth_bins": int(len(motion.depth_bins_um)),
           "loadavg_1m_before_after": [load_before, os.getloadavg()[0]], **extra}
    np.savez(data_path.with_name(f"{data_path.stem}.{args.child}.{args.device}.estimate.npz"),
             time_bins_s=motion.time_bins_s, depth_bins_um=motion.depth_bins_um, displacement_um=motion.displacement_um)
    print(json.dumps(row))


# ----------------------------------------------------------------------------------------- driver
def measure(row: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", row, "--duration-s", str(args.duration_s), "--num-channels",
               str(args.num_channels), "--threads", str(args.threads), "--device", args.device, "--data-dir",
               args.data_dir, "--reference-steps", str(args.reference_steps), "--tile-to-s", str(args.tile_to_s)]
    if args.ours_steps is not None:
        command += ["--ours-steps", str(args.ours_steps)]
    return run_child(command, row, child_env(args.threads, args.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--num-channels", type=int, default=64)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None,
                        help="default: all but ours_1h on the CPU, all on a GPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], for every row and for the peaks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-steps", type=int, default=10_000,
                        help="medicine-neuro training_steps (10000 = its default)")
    parser.add_argument("--ours-steps", type=int, default=None,
                        help="override training_steps of our rows (harness checks only; default: the params')")
    parser.add_argument("--tile-to-s", type=float, default=3600.0, help="session length of the ours_1h row (s)")
    parser.add_argument("--data-dir", default="/tmp/nwbflow-motion-bench")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/motion.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    data_path = make_data(Path(args.data_dir), args.duration_s, args.num_channels, args.device)
    _, _, meta = load_data(data_path)
    rows = []
    for row in args.rows or [r for r in ROWS if r != "ours_1h" or args.device != "cpu"]:
        rows.append(measure(row, args))
        print(f"  {row:10s} {rows[-1]['seconds']:8.1f} s  MAE {rows[-1]['mae_um']:.2f} µm", flush=True)
    _report(rows, meta, args)


def _report(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    import spikeinterface
    import torch

    from nwbflow.report import format_table

    print(f"\n{args.num_channels} channels, {args.duration_s:.0f} s, {meta['num_peaks']} peaks "
          f"({meta['peak_params']['localization']}), {platform.processor() or platform.machine()}; "
          "errors after removing one global offset")
    print(format_table(
        ["method", "settings", "steps", "wall s", "MAE µm", "RMSE µm", "P95 µm", "threads", "device", "session s"],
        [[r["row"], r["settings"], "-" if r["steps"] is None else str(r["steps"]), f"{r['seconds']:.1f}",
          f"{r['mae_um']:.2f}", f"{r['rmse_um']:.2f}", f"{r['p95_um']:.2f}", str(r["threads"]), r["device"],
          f"{r['session_s']:.0f}"] for r in rows]))
    by = {r["row"]: r for r in rows}
    if "ours" in by and "reference" in by:
        print(f"ours MAE - reference MAE = {by['ours']['mae_um'] - by['reference']['mae_um']:+.2f} µm "
              "(target <= +0.5); "
              f"wall ours / reference = {by['ours']['seconds'] / by['reference']['seconds']:.3f} (target <= 0.2)")
    if "ours" in by and "dredge_ap" in by:
        print(f"ours MAE - dredge_ap MAE = {by['ours']['mae_um'] - by['dredge_ap']['mae_um']:+.2f} µm (target <= 0)")
    versions = {"spikeinterface": spikeinterface.__version__, "medicine-neuro": version("medicine-neuro"),
                "torch": torch.__version__, "numpy": np.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "data": meta, "versions": versions, "device": args.device,
                                    "machine": platform.processor() or platform.machine(),
                                    "cpu_count": os.cpu_count()}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
