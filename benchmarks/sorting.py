"""Spike sorting accuracy and speed: ours (nwbflow chain) vs SpikeInterface's sorters, static and drifting truth.

Data: one seeded SpikeInterface ground truth, two recordings with the same units, spike trains,
templates and noise, differing only in drift (both float32 µV, 30 kHz, ``--duration-s``, cached as
binary folders in ``--data-dir``; delete the folder to regenerate):
  drifting  ``spikeinterface.generation.generate_drifting_recording``: ``--num-units`` units
            (firing 2-8 Hz, 4 ms refractory; "ellipsoid" templates of the generator's default sizes,
            5-45 µm off the probe: per unit peak µV and SNR in the JSON's data.units), spatially correlated
            noise (6-8 µV per channel, 25 µm decay), on a ``--num-channels`` probe of 2 columns 32 µm
            apart with a contact every 20 µm in each; motion (benchmarks/motion.py's recipe): a
            non-rigid zigzag (±18 µm at the lowest units, 40 % of that at the highest; period
            duration/3 from duration/10) plus rigid random steps (±12 µm, each held 5-15 % of the
            duration).
  static    ``spikeinterface.core.generate_ground_truth_recording`` given the drifting generator's
            sorting, rest-position templates and noise parameters and the same seed: the drifting
            recording's static twin (checked sample for sample on its first second).

Truth: the generator's sorting (saved with the data). Each sorter's output is scored with
``spikeinterface.comparison.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)``
(matching window ``delta_time`` 0.4 ms): well-detected = GT units with accuracy >= 0.8; mean
accuracy / precision / recall over all GT units (unmatched units count as 0); false-positive,
redundant and overmerged units as the comparison counts them; units found.

Rows (each in its own process: clean wall time and peak RSS; threads = ``--threads`` for torch,
BLAS and numba, and ``n_jobs`` of SpikeInterface's job kwargs), each on each recording:
  ours            nwbflow without Prefect, glibc's malloc tuned first as the flow's stages do
                  (tune_host_allocator): preprocess_to_binary (PreprocessParams()) -> iter_peaks
                  (PeakParams(localization="monopolar_triangulation")) -> estimate_motion
                  (MotionParams(), on |amplitude|) -> correct_motion_to_binary (whitening-aware) ->
                  sort_traces (SortingParams(), and W^-1 as the flow gives it) on the corrected,
                  whitened binary; each phase timed
                  (``--ours-until`` stops after a phase: harness checks only, no scores)
  ours_nomotion   the same without motion estimation and correction: sorts the preprocessed binary
  spykingcircus2  run_sorter with its defaults (its own filtering, whitening and motion correction)
  tridesclous2    run_sorter with its defaults (its own filtering; its motion correction is off by default)
  kilosort4       run_sorter with its defaults, only when installed
Default rows: ours, spykingcircus2, tridesclous2. A row's wall time is the sorter's (ours: all
phases from the raw recording); scoring is not timed. Peak RSS is the row process's VmHWM; the
SpikeInterface sorters' worker processes are reported apart (``peak_rss_workers_mb``).
On ``--device cpu`` CUDA is hidden from the children.

Usage (2 cores shared with other jobs -> take the lock):
  flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/sorting.py --duration-s 30 --num-units 8 \
      --out /tmp/sorting-dev.json                                          # harness check, a few minutes
  flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/sorting.py   # 300 s, 25 units, 32 channels
  flock /tmp/nwbflow-cpu.lock .venv/bin/python benchmarks/sorting.py --rows ours ours_nomotion
  .venv/bin/python benchmarks/sorting.py --device cuda --rows ours kilosort4     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from _measure import child_env, peak_rss_mb
from motion import drift_kwargs  # the same drift as the motion benchmark

RATE_HZ = 30_000.0
SEED = 0
DATA_VERSION = 1  # bump when the recipe below changes: cached folders carry it in their names
RECORDINGS = ("static", "drifting")
SI_SORTERS = ("spykingcircus2", "tridesclous2", "kilosort4")
ROWS = ("ours", "ours_nomotion", *SI_SORTERS)
DEFAULT_ROWS = ("ours", "spykingcircus2", "tridesclous2")
OURS_PHASES = ("preprocess", "peaks", "motion", "correction", "sorting")
WELL_DETECTED = 0.8
NOISE_KWARGS = {"noise_levels": (6.0, 8.0), "spatial_decay": 25.0}
TEMPLATE_MS = (1.5, 3.0)  # generate_drifting_recording's default ms_before, ms_after


# ----------------------------------------------------------------------------------------- recipe
def probe_kwargs(num_channels: int) -> dict:
    """Two columns 32 µm apart, a contact every 20 µm in each, 12 µm square contacts."""
    if num_channels % 2 or num_channels < 4:
        raise SystemExit(f"--num-channels must be an even number >= 4 (2 columns), got {num_channels}")
    return {"num_columns": 2, "num_contact_per_column": num_channels // 2, "xpitch": 32.0, "ypitch": 20.0,
            "contact_shapes": "square", "contact_shape_params": {"width": 12.0}}


def data_folder(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / (f"sorting_{args.num_channels}ch_{int(args.duration_s)}s_{args.num_units}u"
                                  f"_seed{SEED}_v{DATA_VERSION}")


# ------------------------------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> Path:
    """Generate both recordings and the truth; save them as binary folders (once)."""
    folder = data_folder(args)
    if (folder / "meta.json").is_file():
        return folder
    from probeinterface import generate_multi_columns_probe
    from spikeinterface.core import generate_ground_truth_recording
    from spikeinterface.generation import generate_drifting_recording

    clock = time.perf_counter()
    probe = generate_multi_columns_probe(**probe_kwargs(args.num_channels))
    probe.set_device_channel_indices(np.arange(args.num_channels))
    static_twin, drifting, sorting, extra = generate_drifting_recording(
        num_units=args.num_units, duration=args.duration_s, sampling_frequency=RATE_HZ, probe=probe,
        generate_displacement_vector_kwargs=drift_kwargs(args.duration_s), generate_noise_kwargs=NOISE_KWARGS,
        extra_outputs=True, seed=SEED)
    noise = static_twin._kwargs["parent_recording"]._kwargs  # generate_noise's NoiseGeneratorRecording
    static, _ = generate_ground_truth_recording(
        durations=[args.duration_s], sampling_frequency=RATE_HZ, sorting=sorting, probe=probe,
        templates=extra["templates"].templates_array, ms_before=TEMPLATE_MS[0], ms_after=TEMPLATE_MS[1],
        noise_kwargs={key: noise[key] for key in ("noise_levels", "cov_matrix", "strategy")}, dtype="float32",
        seed=SEED)
    second = int(RATE_HZ)
    twin_error = float(np.abs(static.get_traces(end_frame=second) - static_twin.get_traces(end_frame=second)).max())
    if twin_error > 1e-4:
        raise RuntimeError(f"the static recording differs from the drifting one's static twin by {twin_error} µV")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    jobs = {"n_jobs": args.threads, "chunk_duration": "1s", "progress_bar": False}
    for name, recording in (("static", static), ("drifting", drifting)):
        recording.save(folder=partial / name, format="binary", dtype="float32", **jobs)
    sorting.save(folder=partial / "gt_sorting")
    meta = {"duration_s": args.duration_s, "num_channels": args.num_channels, "num_units": args.num_units,
            "sampling_rate_hz": RATE_HZ, "seed": SEED, "data_version": DATA_VERSION,
            "probe": probe_kwargs(args.num_channels), "drift": drift_kwargs(args.duration_s),
            "noise": {**NOISE_KWARGS, "noise_levels_uv": np.ravel(noise["noise_levels"]).tolist()},
            "num_spikes": int(sorting.count_total_num_spikes()), "static_vs_twin_max_abs_uv": twin_error,
            "units": unit_table(sorting, extra, np.ravel(noise["noise_levels"]), args.duration_s),
            "max_abs_displacement_um": float(np.abs(extra["unit_displacements"]).max()),
            "data_seconds": time.perf_counter() - clock}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"data: {meta['num_spikes']} spikes, 2 x {args.duration_s:.0f} s in {meta['data_seconds']:.0f} s "
          f"-> {folder}", flush=True)
    return folder


def unit_table(sorting, extra: dict, noise_levels_uv: np.ndarray, duration_s: float) -> list[dict]:
    """Per GT unit: rest position, spikes, rate, peak |amplitude| (µV) and SNR on its largest channel."""
    templates = extra["templates"].templates_array  # (units, samples, channels) µV
    peak_uv = np.abs(templates).max(axis=1)  # (units, channels)
    channel = peak_uv.argmax(axis=1)
    counts = sorting.count_num_spikes_per_unit(outputs="array")
    return [{"unit_id": str(unit_id), "x_um": float(extra["unit_locations"][u, 0]),
             "y_um": float(extra["unit_locations"][u, 1]), "num_spikes": int(counts[u]),
             "rate_hz": float(counts[u] / duration_s), "peak_uv": float(peak_uv[u, channel[u]]),
             "snr": float(peak_uv[u, channel[u]] / noise_levels_uv[channel[u]])}
            for u, unit_id in enumerate(sorting.unit_ids)]


# ------------------------------------------------------------------------------------------- rows
def run_ours(recording, workdir: Path, motion: bool, until: str, device: str) -> tuple:
    """Our chain on the raw recording; returns (sorting or None, seconds, extra).

    The host allocator is tuned first, as the flow's stages do (``tasks.runner.StageRun``).
    """
    from nwbflow.device import tune_host_allocator
    from nwbflow.ephys.preprocess import preprocess_to_binary
    from nwbflow.evaluation import RecordingSource
    from nwbflow.params import PreprocessParams

    phases: dict[str, float] = {}
    extra: dict = {"phase_seconds": phases}
    positions = recording.get_channel_locations().astype(np.float64)
    num_channels, fs = recording.get_num_channels(), recording.sampling_frequency
    clock = time.perf_counter()
    extra["host_allocator_tuned"] = tune_host_allocator()
    pre_params = PreprocessParams()
    pre = preprocess_to_binary(RecordingSource(recording), pre_params, workdir / "preprocessed.bin", device=device)
    phases["preprocess"] = _lap(clock, phases, device)
    extra["params"] = {"preprocess": pre_params.model_dump(mode="json")}
    sort_input = pre
    if motion and until != "preprocess":
        sort_input = _ours_motion(pre, positions, workdir, until, device, clock, phases, extra)
    if until != "sorting" or sort_input is None:
        return None, time.perf_counter() - clock, extra
    import torch

    from nwbflow.ephys.sorting.sorter import sort_traces
    from nwbflow.params import SortingParams

    params = SortingParams()
    result = sort_traces(sort_input.open(), positions, params, device=torch.device(device), progress=None,
                         whitening_inverse=sort_input.whitening_inverse)  # as the flow's sorting stage
    phases["sorting"] = _lap(clock, phases, device)
    extra["params"]["sorting"] = params.model_dump(mode="json")
    extra["detected_spikes"] = getattr(result, "detected_spikes", None)
    seconds = time.perf_counter() - clock
    from spikeinterface.core import NumpySorting

    sorting = NumpySorting.from_samples_and_labels([np.asarray(result.spike_samples, np.int64)],
                                                   [np.asarray(result.spike_units, np.int64)], fs,
                                                   unit_ids=np.arange(int(result.num_units)))
    return sorting, seconds, extra


def _ours_motion(pre, positions: np.ndarray, workdir: Path, until: str, device: str, clock: float,
                 phases: dict, extra: dict):
    """Peaks -> MEDiCINe -> the corrected recording (None when ``until`` stops earlier)."""
    from nwbflow.ephys.motion import estimate_motion
    from nwbflow.ephys.motion.correction import correct_motion_to_binary
    from nwbflow.ephys.peaks import iter_peaks
    from nwbflow.params import MotionParams, PeakParams

    peak_params = PeakParams(localization="monopolar_triangulation")
    batches = list(iter_peaks(pre.open(), positions, peak_params, whitening_inverse=pre.whitening_inverse,
                              device=device))
    peaks = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    phases["peaks"] = _lap(clock, phases, device)
    extra["num_peaks"] = int(len(peaks["sample_index"]))
    extra["params"]["peaks"] = peak_params.model_dump(mode="json")
    if until == "peaks":
        return None
    params = MotionParams()
    fit = estimate_motion(peaks["sample_index"] / pre.sampling_rate_hz, peaks["y_um"].astype(np.float64),
                          np.abs(peaks["amplitude"]).astype(np.float64), params, seed=SEED, device=device)
    phases["motion"] = _lap(clock, phases, device)
    extra["params"]["motion"] = params.model_dump(mode="json")
    extra["motion"] = {"steps": fit.steps, "peaks_used": fit.peaks_used,
                       "max_abs_displacement_um": float(np.abs(fit.motion.displacement_um).max())}
    np.savez(workdir / "motion.npz", time_bins_s=fit.motion.time_bins_s, depth_bins_um=fit.motion.depth_bins_um,
             displacement_um=fit.motion.displacement_um)
    if until == "motion":
        return None
    corrected = correct_motion_to_binary(pre.open(), positions, fit.motion, params, workdir / "corrected.bin",
                                         sample_times_s=0.0, device=device, dtype=pre.dtype,
                                         whitening=pre.whitening, whitening_inverse=pre.whitening_inverse)
    phases["correction"] = _lap(clock, phases, device)
    extra["motion"]["outside_fraction"] = corrected.outside_fraction
    return None if until == "correction" else pre.with_binary(corrected.out_path)


def _lap(clock: float, phases: dict, device: str) -> float:
    """Seconds since ``clock`` not yet given to an earlier phase (the device synchronized first)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - clock - sum(phases.values())


def run_si_sorter(name: str, recording, workdir: Path) -> tuple:
    """``run_sorter`` with the sorter's defaults; returns (sorting, seconds, extra)."""
    from spikeinterface.core import get_global_job_kwargs
    from spikeinterface.sorters import get_default_sorter_params, run_sorter

    clock = time.perf_counter()
    sorting = run_sorter(name, recording, folder=workdir / name, remove_existing_folder=True, verbose=False)
    seconds = time.perf_counter() - clock
    sorting = sorting.to_numpy_sorting()  # before the folder goes
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return sorting, seconds, {"params": {name: get_default_sorter_params(name)},
                              "job_kwargs": {key: get_global_job_kwargs()[key] for key in ("n_jobs", "pool_engine")},
                              "peak_rss_workers_mb": workers_kb / 1024 if workers_kb else None}


# ------------------------------------------------------------------------------------------- scores
def scores(gt, sorting) -> dict:
    """Compare ``sorting`` to the ground truth (module docstring)."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    num_gt = len(gt.unit_ids)
    if sorting.get_num_units() == 0:
        return {"units_found": 0, "well_detected": 0, "num_gt_units": num_gt, "mean_accuracy": 0.0,
                "mean_precision": 0.0, "mean_recall": 0.0, "false_positive": 0, "redundant": 0, "overmerged": 0,
                "accuracy_per_gt_unit": [0.0] * num_gt}
    comparison = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
    performance = comparison.get_performance().astype(float).fillna(0.0)
    return {"units_found": int(sorting.get_num_units()), "num_gt_units": num_gt,
            "well_detected": len(comparison.get_well_detected_units(well_detected_score=WELL_DETECTED)),
            "mean_accuracy": float(performance["accuracy"].mean()),
            "mean_precision": float(performance["precision"].mean()),
            "mean_recall": float(performance["recall"].mean()),
            "false_positive": int(comparison.count_false_positive_units()),
            "redundant": int(comparison.count_redundant_units()),
            "overmerged": int(comparison.count_overmerged_units()),
            "accuracy_per_gt_unit": [round(float(a), 4) for a in performance["accuracy"]]}


# ------------------------------------------------------------------------------------------ child
def child(args: argparse.Namespace) -> None:
    """Run one (recording, row) in this process; print its JSON row."""
    import spikeinterface.core as si
    import torch

    torch.set_num_threads(args.threads)
    si.set_global_job_kwargs(n_jobs=args.threads, progress_bar=False)
    folder = data_folder(args)
    recording = si.load(folder / args.recording)
    workdir = folder / "runs" / f"{args.recording}_{args.child}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    load_before = os.getloadavg()[0]  # other work on the machine inflates wall times: keep the evidence
    if args.child.startswith("ours"):
        sorting, seconds, extra = run_ours(recording, workdir, args.child == "ours", args.ours_until, args.device)
    else:
        sorting, seconds, extra = run_si_sorter(args.child, recording, workdir)
    row = {"recording": args.recording, "row": args.child, "seconds": seconds,
           "x_realtime": args.duration_s / seconds, "peak_rss_mb": peak_rss_mb(), "threads": args.threads,
           "device": args.device, "recording_s": args.duration_s,
           "loadavg_1m_before_after": [load_before, os.getloadavg()[0]], **extra}
    if sorting is not None:
        row.update(scores(si.load(folder / "gt_sorting"), sorting))
        spikes = sorting.to_spike_vector()
        np.savez(folder / f"{args.recording}_{args.child}.spikes.npz", sample_index=spikes["sample_index"],
                 unit_index=spikes["unit_index"])
    if not args.keep_outputs:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(row))


# ----------------------------------------------------------------------------------------- driver
def measure(recording: str, row: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", row, "--recording", recording, "--duration-s",
               str(args.duration_s), "--num-units", str(args.num_units), "--num-channels", str(args.num_channels),
               "--threads", str(args.threads), "--device", args.device, "--data-dir", args.data_dir,
               "--ours-until", args.ours_until] + (["--keep-outputs"] if args.keep_outputs else [])
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env=child_env(args.threads, args.device),
                                timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"recording": recording, "row": row, "failed": f"did not finish in {args.timeout_s:.0f} s"}
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        print(result.stderr[-4000:], file=sys.stderr)
        return {"recording": recording, "row": row, "failed": tail[0][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows_to_run(args: argparse.Namespace) -> list[str]:
    from spikeinterface.sorters import installed_sorters

    installed = set(installed_sorters())
    rows = []
    for row in args.rows:
        if row in SI_SORTERS and row not in installed:
            print(f"  {row}: not installed here (spikeinterface.sorters.installed_sorters()), skipped")
        else:
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--num-units", type=int, default=25)
    parser.add_argument("--num-channels", type=int, default=32)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(DEFAULT_ROWS))
    parser.add_argument("--recordings", nargs="+", choices=RECORDINGS, default=list(RECORDINGS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], for our rows (CUDA hidden on cpu)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="a row running longer is reported failed")
    parser.add_argument("--ours-until", choices=OURS_PHASES, default="sorting",
                        help="stop our rows after this phase (harness checks only: no scores)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each row's work folder (data-dir/runs)")
    parser.add_argument("--data-dir", default="/tmp/nwbflow-sorting-bench")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sorting.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--recording", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    folder = make_data(args)
    meta = json.loads((folder / "meta.json").read_text())
    rows = []
    for recording in args.recordings:
        for row in rows_to_run(args):
            rows.append(measure(recording, row, args))
            print(f"  {recording:8s} {row:14s} {_summary(rows[-1])}", flush=True)
    _report(rows, meta, args)


def _summary(row: dict) -> str:
    if "failed" in row:
        return f"FAILED: {row['failed']}"
    text = f"{row['seconds']:7.1f} s"
    if "well_detected" in row:
        text += f"  {row['well_detected']}/{row['num_gt_units']} well-detected, {row['units_found']} units"
    return text


def _report(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    from nwbflow.report import format_table

    print(f"\n{meta['num_channels']} channels, {meta['duration_s']:.0f} s, {meta['num_units']} GT units "
          f"({meta['num_spikes']} spikes), {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"device {args.device}; well-detected = accuracy >= {WELL_DETECTED}")

    def cells(r: dict) -> list[str]:
        if "failed" in r:
            return [r["recording"], r["row"], "failed: " + r["failed"][:60]] + [""] * 10
        scored = "well_detected" in r
        value = (lambda key, fmt: format(r[key], fmt) if scored else "-")
        return [r["recording"], r["row"], value("units_found", "d"),
                f"{r['well_detected']}/{r['num_gt_units']}" if scored else "-", value("mean_accuracy", ".3f"),
                value("mean_precision", ".3f"), value("mean_recall", ".3f"), value("false_positive", "d"),
                value("redundant", "d"), value("overmerged", "d"), f"{r['seconds']:.1f}", f"{r['x_realtime']:.2f}",
                f"{r['peak_rss_mb']:.0f}"]

    print(format_table(["recording", "sorter", "units", "well-det.", "accuracy", "precision", "recall", "FP units",
                        "redundant", "overmerged", "wall s", "x realtime", "peak RSS MB"], [cells(r) for r in rows]))
    for r in rows:
        if "phase_seconds" in r:
            print(f"{r['recording']} {r['row']} phases (s): "
                  + ", ".join(f"{name} {s:.1f}" for name, s in r["phase_seconds"].items()))
    _verdicts(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "data": meta, "versions": _versions(), "device": args.device,
                                    "threads": args.threads, "machine": platform.processor() or platform.machine(),
                                    "cpu_count": os.cpu_count()}, indent=2))
    print(f"-> {args.out}")


def _verdicts(rows: list[dict]) -> None:
    """Our targets (issue 6): more well-detected units than every SI sorter; CPU wall <= spykingcircus2's."""
    for recording in RECORDINGS:
        by = {r["row"]: r for r in rows if r["recording"] == recording and "well_detected" in r}
        ours = by.get("ours")
        if ours is None:
            continue
        for name in SI_SORTERS:
            if name in by:
                gain = ours["well_detected"] - by[name]["well_detected"]
                print(f"{recording}: ours - {name} well-detected = {gain:+d} (target > 0); "
                      f"wall ours / {name} = {ours['seconds'] / by[name]['seconds']:.2f}")


def _versions() -> dict:
    found = {}
    for package in ("spikeinterface", "torch", "numpy", "numba", "hdbscan", "scikit-learn", "kilosort"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
