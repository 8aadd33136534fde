"""End-to-end timing of the backbone stages on a synthetic session (no Prefect overhead).

Prints a table and writes JSON. Usage:

    .venv/bin/python benchmarks/pipeline.py --duration-s 60 --num-channels 64 --out benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nwbflow.ephys.peaks import iter_peaks
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.nwb_io.read import open_session
from nwbflow.nwb_io.results import SessionResults
from nwbflow.nwb_io.write import write_processed
from nwbflow.params import PeakParams, PreprocessParams
from _measure import peak_rss_mb
from nwbflow.report import format_table
from nwbflow.synth import SynthConfig, write_synthetic_session


def run(duration_s: float, num_channels: int, workdir: Path) -> list[dict]:
    raw = workdir / "bench.nwb"
    clock = time.perf_counter()
    write_synthetic_session(raw, SynthConfig(duration_s=duration_s, num_channels=num_channels,
                                             num_units=max(10, num_channels // 3), ophys=False))
    rows = [{"stage": "synth (write raw NWB)", "seconds": time.perf_counter() - clock}]
    with open_session(raw) as session:
        series = session.select_ephys()
        clock = time.perf_counter()
        series.content_hash()
        rows.append({"stage": "content hash", "seconds": time.perf_counter() - clock})
        clock = time.perf_counter()
        result = preprocess_to_binary(series, PreprocessParams(), workdir / "pre.bin")
        rows.append({"stage": "preprocess", "seconds": time.perf_counter() - clock})
        positions = series.channel_positions_um
        clock = time.perf_counter()
        batches = list(iter_peaks(result.open(), positions, PeakParams(), whitening_inverse=result.whitening_inverse,
                                  chunk_samples=int(series.sampling_rate_hz)))
        count = sum(len(b["sample_index"]) for b in batches)
        pq.write_table(pa.Table.from_pydict({k: np.concatenate([b[k] for b in batches]) for k in batches[0]}),
                       workdir / "peaks.parquet")
        rows.append({"stage": f"peaks ({count} found)", "seconds": time.perf_counter() - clock})
    record = ProvenanceRecord(stage="peaks", parameters="{}", inputs=(), outputs=(), start_time_utc="",
                              end_time_utc="", host=platform.node(), device="cpu")
    clock = time.perf_counter()
    write_processed(raw, workdir / "out.nwb", SessionResults((record,)))
    rows.append({"stage": "write-back (export + validate)", "seconds": time.perf_counter() - clock})
    for row in rows:
        row["x_realtime"] = duration_s / row["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--num-channels", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.duration_s, args.num_channels, Path(tmp))
    print(f"{args.num_channels} channels x {args.duration_s:.0f} s at 30 kHz, CPU, peak RSS {peak_rss_mb():.0f} MB")
    print(format_table(["stage", "seconds", "x real time"],
                       [[r["stage"], f"{r['seconds']:.2f}", f"{r['x_realtime']:.1f}"] for r in rows]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"duration_s": args.duration_s, "num_channels": args.num_channels,
                                    "machine": platform.processor() or platform.machine(),
                                    "peak_rss_mb": peak_rss_mb(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
