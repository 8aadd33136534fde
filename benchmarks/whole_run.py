"""The whole ``nwbflow run`` on a Neuropixels-scale drifting session: stage times, memory, disk, accuracy.

Data: ``nwbflow synth --num-channels 384 --num-units 100 --duration-s D --drift --no-ophys`` (seed 0; kept in
``--data`` and reused), for each ``--durations``. Each row runs ``nwbflow run IN -o OUT --workdir W --device
cpu`` as a child process (``--params`` of the row: ours with defaults, or ``sorting.sorter=spykingcircus2``,
SpikeInterface's sorter with its own preprocessing and motion correction, through our flow).

Measured per row:
- wall s of the run and each stage's s (its provenance row's start and end times in the output file);
- peak RSS: the run's process tree sampled every 0.2 s from /proc (the run and its children, e.g. the
  write-back's export, summed; the temporary Prefect server it starts excluded), overall and per stage
  (the samples inside each stage's time span);
- the work directory after the run: every file over 1 MB and its cost per recording-hour (size / D * 3600);
- units against the ground truth (SpikeInterface's ``compare_sorter_to_ground_truth``, well detected:
  accuracy >= 0.8), and for the ground-truth units not well detected, why: the best-matching unit's
  accuracy, precision and recall, the unit's peak amplitude (µV) and depth (µm), and whether two or more
  found units share its spikes (split).

    .venv/bin/python benchmarks/whole_run.py --data /tmp/np-data --durations 300 600 --rows ours spykingcircus2 \\
        --out benchmarks/results/whole_run.json

Run it with nothing else on the cores; say so with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from nwbflow.report import format_table

WELL_DETECTED = 0.8
ROWS = {"ours": {}, "spykingcircus2": {"sorting": {"sorter": "spykingcircus2"}}}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_prefect_server(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "uvicorn" in command or ("prefect" in command and "server" in command)


class TreeSampler(threading.Thread):
    """Samples the RSS (MB) of a process and its descendants (Prefect's server excluded) every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                if _is_prefect_server(pid):
                    continue
                tree.append(pid)
                todo.extend(_children(pid))
            self.samples.append((time.time(), sum(_rss_mb(p) for p in tree), _rss_mb(self.pid)))
            self.stop.wait(0.2)


def synth(data: Path, duration_s: float, channels: int, units: int, shanks: int) -> Path:
    path = data / f"np{channels}_{int(duration_s)}s{f'_{shanks}shanks' if shanks > 1 else ''}.nwb"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "nwbflow.cli", "synth", str(path), "--num-channels", str(channels),
                        "--num-units", str(units), "--duration-s", str(duration_s), "--drift", "--no-ophys",
                        "--shanks", str(shanks)], check=True)
    return path


def run_row(raw: Path, row: str, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    params = work / "params.json"
    params.write_text(json.dumps(ROWS[row]))
    out = work / "out.nwb"
    command = [sys.executable, "-m", "nwbflow.cli", "run", str(raw), "-o", str(out), "--workdir", str(work / "w"),
               "--device", "cpu", "--params", str(params)]
    started = time.time()
    with open(work / "run.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(child.pid)
        sampler.start()
        code = child.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - started
    if code != 0:
        raise RuntimeError(f"{row} failed ({code}): see {work / 'run.log'}")
    samples = np.array(sampler.samples)
    stages = _stage_spans(out)
    per_stage = {name: round(float(samples[(samples[:, 0] >= a) & (samples[:, 0] <= b), 1].max(initial=0)) / 1024, 2)
                 for name, (a, b) in stages.items()}
    return {"row": row, "wall_s": round(wall, 1),
            "stage_s": {name: round(b - a, 1) for name, (a, b) in stages.items()},
            "peak_rss_tree_gb": round(float(samples[:, 1].max()) / 1024, 2),
            "peak_rss_main_gb": round(float(samples[:, 2].max()) / 1024, 2),
            "peak_rss_by_stage_gb": per_stage, "work_files": _work_files(work / "w"), "out": str(out)}


def _stage_spans(out: Path) -> dict[str, tuple[float, float]]:
    from pynwb import NWBHDF5IO

    from nwbflow.nwb_io.provenance import read_provenance

    with NWBHDF5IO(str(out), "r") as io:
        rows = read_provenance(io.read())
    return {row["stage"]: (datetime.fromisoformat(row["start_time_utc"]).timestamp(),
                           datetime.fromisoformat(row["end_time_utc"]).timestamp()) for row in rows}


def _work_files(work: Path) -> list[dict]:
    files = [(p, p.stat().st_size) for p in work.rglob("*") if p.is_file()]
    return [{"file": str(p.relative_to(work)), "gb": round(size / 1e9, 2)} for p, size in
            sorted(files, key=lambda item: -item[1]) if size > 1e6]


def accuracy(raw: Path, out: Path) -> dict:
    """Scores against the ground truth, and what became of each ground-truth unit not well detected."""
    from pynwb import NWBHDF5IO
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting

    from nwbflow.synth import load_ground_truth

    truth = load_ground_truth(raw)
    rate = truth.config.sampling_rate_hz
    with NWBHDF5IO(str(out), "r") as io:
        units = io.read().units
        trains = {int(i): np.rint(np.asarray(units["spike_times"][i]) * rate).astype(np.int64)
                  for i in range(len(units))}
        columns = set(units.colnames)
        found_amplitude = (np.abs(units["amplitude_median"][:]) if "amplitude_median" in columns
                           else np.full(len(units), np.nan))
        found_snr = units["snr"][:] if "snr" in columns else np.full(len(units), np.nan)
    found = NumpySorting.from_unit_dict([trains], sampling_frequency=rate)
    gt = truth.to_sorting()
    comparison = compare_sorter_to_ground_truth(gt, found, exhaustive_gt=True)
    performance = comparison.get_performance().astype(float).fillna(0.0)
    amplitude = _gt_amplitudes(truth)
    agreement, match = comparison.agreement_scores, comparison.hungarian_match_12
    well = {u for u in gt.unit_ids if match[u] != -1 and agreement.at[u, match[u]] >= WELL_DETECTED}
    missed = []
    for unit in gt.unit_ids:
        if unit in well:
            continue
        sharing = agreement.loc[unit][agreement.loc[unit] > 0.2]
        missed.append({"gt_unit": int(unit), "accuracy": round(float(performance.loc[unit, "accuracy"]), 3),
                       "precision": round(float(performance.loc[unit, "precision"]), 3),
                       "recall": round(float(performance.loc[unit, "recall"]), 3),
                       "amplitude_uv": round(float(amplitude[int(unit)]), 1),
                       "depth_um": round(float(truth.unit_locations_um[int(unit), 1]), 1),
                       "found_units_sharing": len(sharing)})
    best = agreement.max(axis=0)  # each found unit's best agreement with a ground-truth unit
    matched = set(match[match != -1].values)
    extra = [{"unit": int(u), "best_agreement": round(float(best[u]), 3),
              "kind": "redundant" if best[u] >= 0.2 else "false positive",
              "amplitude_uv": round(float(found_amplitude[int(u)]), 1), "snr": round(float(found_snr[int(u)]), 1)}
             for u in found.unit_ids if u not in matched]
    return {"motion_error_um": _motion_errors(out, truth), "units_found": int(found.get_num_units()),
            "well_detected": len(well),
            "false_positive": int(comparison.count_false_positive_units()),
            "redundant": int(comparison.count_redundant_units()),
            "overmerged": int(comparison.count_overmerged_units()),
            "gt_amplitude_uv_median": round(float(np.median(amplitude)), 1), "not_well_detected": missed,
            "unmatched_found_units": extra}


def _motion_errors(out: Path, truth) -> dict[str, float]:
    """Per motion estimate in the output (one per shank on a multi-shank probe): RMS over the recording's time
    bins of (estimate - true drift), µm, the constant offset between them removed (motion is known up to
    one), at the depth bins' middle."""
    from pynwb import NWBHDF5IO

    errors = {}
    with NWBHDF5IO(str(out), "r") as io:
        module = io.read().processing.get("ecephys")
        for name, estimate in ({} if module is None else module.data_interfaces).items():
            if not name.startswith("motion"):
                continue
            times, depths = estimate.time_bin_centers[:], estimate.depth_bin_centers[:]
            column = estimate.displacement[:][:, len(depths) // 2]
            true = np.interp(times, truth.drift_time_bins_s, truth.drift_displacement_um[:, 0])
            difference = column - true
            errors[name] = round(float(np.sqrt(np.mean((difference - difference.mean()) ** 2))), 2)
    return errors


def _gt_amplitudes(truth) -> np.ndarray:
    """Each ground-truth unit's trough on its best channel (µV, as a positive amplitude)."""
    return np.abs(np.array([u["trough_uv"] for u in truth.metadata["ephys"]["units"]], float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--durations", type=float, nargs="+", default=[300.0])
    parser.add_argument("--num-channels", type=int, default=384)
    parser.add_argument("--num-units", type=int, default=100)
    parser.add_argument("--shanks", type=int, default=1, help="4: a Neuropixels 2.0-like four-shank probe")
    parser.add_argument("--rows", nargs="+", default=["ours"], choices=sorted(ROWS))
    parser.add_argument("--keep-work", action="store_true", help="leave each row's work directory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/whole_run.json"))
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    results = []
    for duration in args.durations:
        raw = synth(args.data, duration, args.num_channels, args.num_units, args.shanks)
        for row in args.rows:
            work = args.data / f"run-{row}-{int(duration)}s-{args.shanks}shank"
            print(f"{row}, {duration:g} s: {time.strftime('%H:%M:%S')}", flush=True)
            result = {"duration_s": duration, "channels": args.num_channels, "shanks": args.shanks,
                      **run_row(raw, row, work)}
            result.update(accuracy(raw, Path(result["out"])))
            result["work_gb_per_hour"] = {f["file"]: round(f["gb"] / duration * 3600, 1) for f in result["work_files"]}
            results.append(result)
            print(json.dumps({k: v for k, v in result.items()
                              if k not in ("not_well_detected", "unmatched_found_units")}), flush=True)
            if not args.keep_work:
                shutil.rmtree(work / "w", ignore_errors=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": results}, indent=1))
    header = ["row", "shanks", "recording s", "wall s", "× real time", "peak RSS GB (tree / main)", "well / found",
              "FP + redundant", "work dir GB per hour"]
    print(format_table(header, [[r["row"], r["shanks"], r["duration_s"], r["wall_s"],
                                 round(r["duration_s"] / r["wall_s"], 2),
                                 f"{r['peak_rss_tree_gb']} / {r['peak_rss_main_gb']}",
                                 f"{r['well_detected']} / {r['units_found']}", r["false_positive"] + r["redundant"],
                                 round(sum(r["work_gb_per_hour"].values()), 1)] for r in results], 140))


if __name__ == "__main__":
    main()
