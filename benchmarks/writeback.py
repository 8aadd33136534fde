"""Write-back of a Neuropixels-sized session: the lean processed file (default) vs ``write.copy_raw``.

Writes a synthetic 384-channel session (int16, gzip as NeuroConv writes it by default), then
``write_processed`` twice on the same results (provenance rows and a motion estimate that names the raw
series): once lean, once self-contained. Prints a table and writes JSON. Usage:

    .venv/bin/python benchmarks/writeback.py --duration-s 300 --out benchmarks/results/writeback.json

Seconds are the whole ``write_processed`` call: the input's validation, the export (in a child
process), the output's validation and the rename. The input sits in the page cache for both rows
(it was just written; dropping caches needs root), so the copy row is not slowed by a cold disk read.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from _measure import peak_rss_mb
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.nwb_io.results import MotionForNwb, SessionResults
from nwbflow.nwb_io.write import write_processed
from nwbflow.report import format_table
from nwbflow.synth import SynthConfig, write_synthetic_session

RAW = "acquisition/ElectricalSeries"


def _results(workdir: Path, duration_s: float) -> SessionResults:
    """What a run writes besides units: a provenance row per stage and one motion estimate (2 s x 15 bins)."""
    time_bins = np.arange(1.0, duration_s, 2.0)
    depth_bins = np.linspace(0.0, 3840.0, 15)
    displacement = np.sin(time_bins / 60.0)[:, None] * np.ones((1, depth_bins.size)) * 15.0
    np.savez(workdir / "motion.npz", displacement_um=displacement, time_bins_s=time_bins, depth_bins_um=depth_bins)
    source = {"file": "bench.nwb", "identifier": "bench", "object": RAW, "sha256": "0" * 64}
    records = tuple(ProvenanceRecord(stage=stage, parameters="{}", inputs=(source,), outputs=(), start_time_utc="",
                                     end_time_utc="", host=platform.node(), device="cpu")
                    for stage in ("preprocess", "peaks", "motion"))
    motion = MotionForNwb(npz_path=workdir / "motion.npz", electrical_series=RAW, method="medicine",
                          parameters_json="{}", description="benchmark estimate")
    return SessionResults(records, motion=(motion,))


def _bulk_in(path: Path) -> list[str]:
    """Acquisition datasets of 1 MB or more in ``path`` (what a lean file must not hold)."""
    found = []
    with h5py.File(path, "r") as handle:
        handle["acquisition"].visititems(lambda name, obj: found.append(name)
                                         if isinstance(obj, h5py.Dataset) and obj.nbytes >= 2**20 else None)
    return found


def run(duration_s: float, num_channels: int, workdir: Path) -> dict:
    raw = workdir / "bench.nwb"
    clock = time.perf_counter()
    write_synthetic_session(raw, SynthConfig(duration_s=duration_s, num_channels=num_channels,
                                             num_units=max(10, num_channels // 6), ophys=False))
    synth_seconds = time.perf_counter() - clock
    results = _results(workdir, duration_s)
    rows = []
    for form, copy_raw in (("lean (default)", False), ("copy_raw: true", True)):
        out = workdir / f"out-{'copy' if copy_raw else 'lean'}.nwb"
        clock = time.perf_counter()
        report = write_processed(raw, out, results, copy_raw=copy_raw)
        seconds = time.perf_counter() - clock
        rows.append({"form": form, "seconds": seconds, "bytes": out.stat().st_size, "dropped": list(report.dropped),
                     "bulk_datasets_kept": _bulk_in(out)})
        out.unlink()
    input_bytes = raw.stat().st_size
    for row in rows:
        row["fraction_of_input"] = row["bytes"] / input_bytes
    return {"duration_s": duration_s, "num_channels": num_channels, "input_bytes": input_bytes,
            "raw_samples_bytes": int(duration_s * 30000) * num_channels * 2, "synth_seconds": synth_seconds,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--num-channels", type=int, default=384)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/writeback.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = run(args.duration_s, args.num_channels, Path(tmp))
    result.update(machine=platform.processor() or platform.machine(), peak_rss_mb=peak_rss_mb())
    mb = 1e6
    print(f"{args.num_channels} channels x {args.duration_s:.0f} s at 30 kHz: "
          f"input {result['input_bytes'] / mb:.0f} MB (raw int16 samples {result['raw_samples_bytes'] / mb:.0f} MB, "
          f"gzip), written in {result['synth_seconds']:.0f} s")
    print(format_table(["form", "seconds", "MB", "of input", "left out", "bulk kept"],
                       [[r["form"], f"{r['seconds']:.1f}", f"{r['bytes'] / mb:.2f}", f"{r['fraction_of_input']:.2%}",
                         ", ".join(r["dropped"]) or "-", ", ".join(r["bulk_datasets_kept"]) or "-"]
                        for r in result["rows"]]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
