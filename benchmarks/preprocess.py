"""Preprocessing + peak detection throughput: ours (torch) vs SpikeInterface, same data, same run.

Data: a synthetic int16 recording (SpikeInterface ground-truth generator, 384 channels at 30 kHz,
gain 0.195 µV/bit) written as a raw binary; a 10 s block is tiled to the requested duration.
Each measurement runs in its own process so its peak RSS (VmHWM, which starts afresh at exec) is its
own; before each one the page cache's dirty pages are flushed (``os.sync``, not timed) so that no row
pays for the previous row's writes.

Rows (seconds of recording processed per wall-clock second, higher is better):
  floor          read int16 chunks, convert to float32 µV, write float32: the memory/IO floor
  ours           offset + median CAR + zero-phase band-pass + ZCA whitening -> float16 binary (the default)
  ours_f32       the same with output_dtype="float32" (what SpikeInterface's chain writes)
  si_chain       bandpass_filter -> common_reference(median) -> whiten, saved to float32 binary (n_jobs = threads)
  ours_peaks     locally exclusive detection + center of mass on our float32 preprocessed binary
  si_peaks       detect_peaks(method="locally_exclusive") on the same binary, same threshold/radius/sweep
  nwb_hash       the content hash plan computes (``EphysSeries.content_hash``) of the same samples in an NWB
                 file as ``nwbflow synth`` and NeuroConv write them: int16, gzip level 4, chunks of 16384
                 samples x 64 channels (2 MiB)
  ours_nwb       ``ours`` reading that NWB file (``EphysSeries``, stored chunks inflated on a pool); the
                 target: within 1.5x of ``ours`` on the raw binary at the same thread count
  ours_nwb_h5py  the same, read through h5py (``dataset[rows]``), as every read was before issue 23
  nwb_hash_h5py  the content hash as it was before issue 23 (every sample decoded through h5py and hashed)

Usage:
  .venv/bin/python benchmarks/preprocess.py --duration-s 60 --long-duration-s 600 --threads 1 2
  .venv/bin/python benchmarks/preprocess.py --device cuda --duration-s 600      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _measure import peak_rss_mb, run_child

NWB_ROWS = ["nwb_hash", "nwb_hash_h5py", "ours_nwb", "ours_nwb_h5py"]
NUM_CHANNELS = 384
RATE_HZ = 30_000.0
GAIN_UV = 0.195
BLOCK_S = 10.0
CHUNK_S = 1.0


# ----------------------------------------------------------------------------------------- data
def data_path(data_dir: Path, duration_s: float) -> Path:
    return data_dir / f"int16_{NUM_CHANNELS}ch_{int(duration_s)}s.bin"


def positions_path(data_dir: Path) -> Path:
    return data_dir / f"positions_{NUM_CHANNELS}ch.npy"


def make_data(data_dir: Path, duration_s: float) -> Path:
    """Write (once) the int16 recording of ``duration_s`` and the channel positions (µm)."""
    from spikeinterface.core import generate_ground_truth_recording

    out = data_path(data_dir, duration_s)
    if out.is_file():
        return out
    data_dir.mkdir(parents=True, exist_ok=True)
    recording, _ = generate_ground_truth_recording(
        durations=[BLOCK_S], sampling_frequency=RATE_HZ, num_channels=NUM_CHANNELS, num_units=60, seed=0,
        generate_probe_kwargs={"num_columns": 4, "xpitch": 16, "ypitch": 20, "contact_shapes": "square",
                               "contact_shape_params": {"width": 12}})
    block = np.clip(np.round(recording.get_traces() / GAIN_UV), -32768, 32767).astype("<i2")
    np.save(positions_path(data_dir), recording.get_channel_locations())
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as handle:
        for _ in range(int(np.ceil(duration_s / BLOCK_S))):
            block.tofile(handle)
    partial.rename(out)
    return out


class Int16FileSource:
    """TraceSource over a raw int16 file, read with explicit reads (no mmap: RSS stays honest)."""

    def __init__(self, path: Path, duration_s: float):
        self.path, self.num_channels, self.sampling_rate_hz = path, NUM_CHANNELS, RATE_HZ
        self.num_samples = int(duration_s * RATE_HZ)
        self._file = open(path, "rb")

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        count = (end_sample - start_sample) * self.num_channels
        self._file.seek(start_sample * self.num_channels * 2)
        raw = np.frombuffer(self._file.read(count * 2), dtype="<i2")
        traces = raw.reshape(end_sample - start_sample, self.num_channels).astype(np.float32)
        traces *= GAIN_UV
        return traces


def nwb_path(data_dir: Path, duration_s: float) -> Path:
    return data_dir / f"int16_{NUM_CHANNELS}ch_{int(duration_s)}s.nwb"


def make_nwb(data_dir: Path, duration_s: float) -> Path:
    """Write (once) the binary's samples into an NWB file, gzip level 4 in 16384 x 64 chunks (like synth)."""
    out = nwb_path(data_dir, duration_s)
    if out.is_file():
        return out
    from datetime import datetime, timezone

    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.data_utils import GenericDataChunkIterator
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ecephys import ElectricalSeries

    samples = np.memmap(data_path(data_dir, duration_s), dtype="<i2", mode="r").reshape(-1, NUM_CHANNELS)

    class Blocks(GenericDataChunkIterator):
        def _get_data(self, selection):
            return np.asarray(samples[selection])

        def _get_maxshape(self):
            return samples.shape

        def _get_dtype(self):
            return np.dtype("int16")

    nwbfile = NWBFile("preprocess benchmark", "bench", datetime(2026, 1, 1, tzinfo=timezone.utc))
    device = nwbfile.create_device("probe")
    group = nwbfile.create_electrode_group("shank", "synthetic", "nowhere", device)
    positions = np.load(positions_path(data_dir))
    nwbfile.add_electrode_column("rel_x", "x (µm)")
    nwbfile.add_electrode_column("rel_y", "y (µm)")
    for x, y in positions:
        nwbfile.add_electrode(group=group, location="nowhere", rel_x=float(x), rel_y=float(y))
    region = nwbfile.create_electrode_table_region(list(range(NUM_CHANNELS)), "all")
    data = H5DataIO(Blocks(chunk_shape=(16384, 64), buffer_shape=(16384 * 4, NUM_CHANNELS)), compression="gzip",
                    compression_opts=4)
    nwbfile.add_acquisition(ElectricalSeries(name="ElectricalSeries", data=data, electrodes=region, rate=RATE_HZ,
                                             conversion=GAIN_UV * 1e-6))
    partial = out.with_suffix(".partial")
    with NWBHDF5IO(partial, "w") as io:
        io.write(nwbfile)
    partial.rename(out)
    return out


# -------------------------------------------------------------------------------- measurements
def run_floor(source: Int16FileSource, out: Path) -> dict:
    chunk = int(CHUNK_S * RATE_HZ)
    with open(out, "wb") as handle:
        for start in range(0, source.num_samples, chunk):
            source.get_traces(start, min(start + chunk, source.num_samples)).tofile(handle)
    return {}


def run_ours(source: Int16FileSource, out: Path, device: str, output_dtype: str) -> dict:
    from nwbflow.ephys.preprocess import preprocess_to_binary
    from nwbflow.params import PreprocessParams

    params = PreprocessParams(output_dtype=output_dtype)
    result = preprocess_to_binary(source, params, out, chunk_duration_s=CHUNK_S, device=device)
    np.save(out.with_suffix(".winv.npy"), result.whitening_inverse)
    return {"output": output_dtype}


def run_si_chain(source: Int16FileSource, out: Path, threads: int) -> dict:
    import shutil

    import spikeinterface.preprocessing as spre
    from spikeinterface.core import read_binary

    recording = read_binary(source.path, sampling_frequency=RATE_HZ, dtype="int16", num_channels=NUM_CHANNELS,
                            gain_to_uV=GAIN_UV, offset_to_uV=0.0)
    recording = recording.frame_slice(0, source.num_samples)
    recording.set_channel_locations(np.load(positions_path(source.path.parent)))
    recording = spre.bandpass_filter(recording, freq_min=300.0, freq_max=6000.0, filter_order=3, dtype="float32")
    recording = spre.common_reference(recording, operator="median", reference="global")
    recording = spre.whiten(recording, dtype="float32", mode="global")
    folder = out.with_suffix(".si")
    shutil.rmtree(folder, ignore_errors=True)
    recording.save(folder=folder, format="binary", n_jobs=threads, chunk_duration=f"{CHUNK_S}s",
                   progress_bar=False)
    shutil.rmtree(folder, ignore_errors=True)
    return {}


def run_ours_peaks(source: Int16FileSource, preprocessed: Path, device: str) -> dict:
    from nwbflow.ephys.chunks import open_binary
    from nwbflow.ephys.peaks import iter_peaks
    from nwbflow.params import PeakParams

    count = 0
    for batch in iter_peaks(open_binary(preprocessed, NUM_CHANNELS, RATE_HZ), np.load(positions_path(source.path.parent)),
                            PeakParams(), whitening_inverse=np.load(preprocessed.with_suffix(".winv.npy")),
                            chunk_samples=int(CHUNK_S * RATE_HZ), device=device):
        count += len(batch["sample_index"])
    return {"peaks": count}


def run_si_peaks(source: Int16FileSource, preprocessed: Path, threads: int) -> dict:
    from spikeinterface.core import get_noise_levels, read_binary
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    recording = read_binary(preprocessed, sampling_frequency=RATE_HZ, dtype="float32", num_channels=NUM_CHANNELS)
    recording.set_channel_locations(np.load(positions_path(source.path.parent)))
    noise = get_noise_levels(recording, return_in_uV=False, method="mad")
    try:
        import numba  # noqa: F401
        method = "locally_exclusive"
    except ImportError:
        method = "locally_exclusive_torch"
    peaks = detect_peaks(recording, method=method,
                         method_kwargs={"peak_sign": "neg", "detect_threshold": 5.0, "exclude_sweep_ms": 0.1,
                                        "radius_um": 50.0, "noise_levels": noise},
                         job_kwargs={"n_jobs": threads, "chunk_duration": f"{CHUNK_S}s", "progress_bar": False})
    return {"peaks": int(peaks.size), "method": method}


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this process; print its JSON row."""
    import torch

    threads = args.threads[0]
    torch.set_num_threads(threads)
    data_dir = Path(args.data_dir)
    source = Int16FileSource(data_path(data_dir, args.duration_s), args.duration_s)
    preprocessed = data_dir / f"ours_{int(args.duration_s)}s.f32"
    if args.child.startswith(("ours_nwb", "nwb_hash")):
        from nwbflow.nwb_io import read
        from nwbflow.nwb_io.read import open_session

        if args.child.endswith("_h5py"):
            read.decodable = lambda dataset: False  # every read through h5py, as before issue 23
        session = open_session(nwb_path(data_dir, args.duration_s), decode_threads=threads)  # same threads
        source = session.select_ephys()
    clock = time.perf_counter()
    if args.child in ("nwb_hash", "nwb_hash_h5py"):
        extra = {"hash": source.content_hash().split(":")[0]}
    elif args.child in ("ours_nwb", "ours_nwb_h5py"):
        extra = run_ours(source, data_dir / f"ours_{int(args.duration_s)}s.f16", args.device, "float16")
    elif args.child == "floor":
        extra = run_floor(source, data_dir / "floor.f32")
    elif args.child == "ours":
        extra = run_ours(source, data_dir / f"ours_{int(args.duration_s)}s.f16", args.device, "float16")
    elif args.child == "ours_f32":
        extra = run_ours(source, preprocessed, args.device, "float32")
    elif args.child == "si_chain":
        extra = run_si_chain(source, data_dir / "si", threads)
    elif args.child == "ours_peaks":
        extra = run_ours_peaks(source, preprocessed, args.device)
    else:
        extra = run_si_peaks(source, preprocessed, threads)
    seconds = time.perf_counter() - clock
    print(json.dumps({"row": args.child, "duration_s": args.duration_s, "threads": threads,
                      "device": args.device, "seconds": seconds, "x_realtime": args.duration_s / seconds,
                      "peak_rss_mb": peak_rss_mb(), **extra}))



# ------------------------------------------------------------------------------------- driver
def measure(row: str, duration_s: float, threads: int, device: str, data_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", row, "--duration-s", str(duration_s), "--threads",
               str(threads), "--device", device, "--data-dir", str(data_dir)]
    stale = [data_dir / "floor.f32", data_dir / f"ours_{int(duration_s)}s.f16"]
    if row == "ours_f32":  # the peak rows read this one
        stale.append(data_dir / f"ours_{int(duration_s)}s.f32")
    for path in stale:
        path.unlink(missing_ok=True)  # a row never pays for truncating an earlier row's output
    os.sync()
    return run_child(command, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--long-duration-s", type=float, default=0.0,
                        help="also run ours at this duration to compare peak RSS (0: skip)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="/tmp/nwbflow-bench")
    parser.add_argument("--skip-si", action="store_true", help="only our rows (e.g. on a GPU machine)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocess.json"))
    parser.add_argument("--nwb", action="store_true", help="also the NWB rows (reading a gzip NWB file)")
    parser.add_argument("--rows", nargs="+", help="only these rows (e.g. ours ours_nwb)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    data_dir = Path(args.data_dir)
    for duration in {args.duration_s, args.long_duration_s} - {0.0}:
        make_data(data_dir, duration)
    if args.nwb:
        make_nwb(data_dir, args.duration_s)
    rows = []
    for threads in args.threads:
        order = [*args.rows] if args.rows else (
            ["floor", "ours", "ours_f32", "ours_peaks"] + ([] if args.skip_si else ["si_chain", "si_peaks"])
            + (NWB_ROWS if args.nwb else []))
        for row in order:
            rows.append(measure(row, args.duration_s, threads, args.device, data_dir))
            print(f"  {row:10s} threads={threads}: {rows[-1]['x_realtime']:.2f} x real time", flush=True)
    if args.long_duration_s:
        for row in ("ours", "ours_f32", "ours_peaks"):
            rows.append(measure(row, args.long_duration_s, args.threads[-1], args.device, data_dir))
    _report(rows, args)


def _report(rows: list[dict], args: argparse.Namespace) -> None:
    from nwbflow.report import format_table

    print(f"\n{NUM_CHANNELS} channels, 30 kHz, device {args.device}, {platform.processor() or platform.machine()}")
    print(format_table(
        ["row", "recording s", "threads", "seconds", "x real time", "peak RSS MB", "note"],
        [[r["row"], f"{r['duration_s']:.0f}", str(r["threads"]), f"{r['seconds']:.1f}", f"{r['x_realtime']:.2f}",
          f"{r['peak_rss_mb']:.0f}", str(r.get("peaks", r.get("output", r.get("hash", ""))))
          + (f" {r['method']}" if "method" in r else "")]
         for r in rows]))
    by = {(r["row"], r["threads"], r["duration_s"]): r for r in rows}
    for threads in args.threads:
        si = by.get(("si_chain", threads, args.duration_s))
        ours, nwb = by.get(("ours", threads, args.duration_s)), by.get(("ours_nwb", threads, args.duration_s))
        if ours and nwb:
            print(f"threads={threads}: ours from the gzip NWB is {ours['x_realtime'] / nwb['x_realtime']:.2f}x "
                  "slower than from the raw binary (target <= 1.5)")
        for row in ("ours", "ours_f32"):
            ours = by.get((row, threads, args.duration_s))
            if ours and si:
                print(f"threads={threads}: {row} / SpikeInterface chain = {ours['x_realtime'] / si['x_realtime']:.2f}x")
        ours_p, si_p = by.get(("ours_peaks", threads, args.duration_s)), by.get(("si_peaks", threads, args.duration_s))
        if ours_p and si_p:
            print(f"threads={threads}: ours / SpikeInterface peaks = {ours_p['x_realtime'] / si_p['x_realtime']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "device": args.device}, indent=2))


if __name__ == "__main__":
    main()
