"""Prefect tasks for the ephys stages: thin glue around the plain kernels in ``nwbflow.ephys``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from nwbflow.ephys.peaks import iter_peaks
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.nwb_io.read import open_session
from nwbflow.params import PeakParams, PreprocessParams
from nwbflow.tasks.artifacts import atomic_path, save_json, save_npy
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.provenance import stage_record, utc_now

log = logging.getLogger(__name__)

PREPROCESSED = "preprocessed.bin"
PREPROCESS_META = "preprocess.json"
WHITENING = "whitening.npy"
PEAKS = "peaks.parquet"

PEAK_SCHEMA = pa.schema([("sample_index", pa.int64()), ("time_s", pa.float64()),
                         ("channel_index", pa.int32()), ("amplitude", pa.float32()),
                         ("x_um", pa.float32()), ("y_um", pa.float32())])

#: The numpy kernels of this version run on the CPU whatever device is asked for.
KERNEL_DEVICE = "cpu"


@task(name="preprocess")
def preprocess_task(plan: SessionPlan, params: PreprocessParams) -> StageOutcome:
    """Offset, median CAR, zero-phase band-pass, whitening -> float32 scratch binary."""
    started, clock = utc_now(), time.perf_counter()
    workdir = Path(plan.workdir)
    with open_session(plan.nwb_path) as session:
        series = session.select_ephys(plan.ephys.object)
        result = preprocess_to_binary(series, params, workdir / PREPROCESSED)  # written atomically
        positions = series.channel_positions_um
        meta = {"num_samples": result.num_samples, "num_channels": result.num_channels,
                "sampling_rate_hz": series.sampling_rate_hz, "dtype": "float32",
                "channel_positions_um": positions.tolist(),
                "positions_are_fallback": bool(series.positions_are_fallback),
                "margin_samples": result.margin_samples, "source": plan.ephys.as_dict()}
    artifacts = {"preprocessed": str(workdir / PREPROCESSED)}
    if result.whitening is not None:
        artifacts["whitening"] = str(save_npy(workdir / WHITENING, result.whitening))
    artifacts["meta"] = str(save_json(workdir / PREPROCESS_META, meta))
    record = stage_record("preprocess", parameters_json=params.as_json(), inputs=(plan.ephys,),
                          outputs=tuple(artifacts.values()), start_time_utc=started, device=KERNEL_DEVICE)
    seconds = time.perf_counter() - clock
    duration_s = result.num_samples / series.sampling_rate_hz
    return StageOutcome("preprocess", seconds, record, artifacts,
                        {"channels": result.num_channels, "sampling_rate_hz": series.sampling_rate_hz,
                         "recording_s": round(duration_s, 3),
                         "x_realtime": round(duration_s / max(seconds, 1e-9), 1)})


@task(name="peaks")
def peaks_task(plan: SessionPlan, preprocessed: StageOutcome, params: PeakParams,
               chunk_duration_s: float) -> StageOutcome:
    """Locally exclusive threshold detection + center-of-mass localization -> peaks.parquet."""
    started, clock = utc_now(), time.perf_counter()
    meta = json.loads(Path(preprocessed.artifacts["meta"]).read_text())
    rate_hz = meta["sampling_rate_hz"]
    whitening = preprocessed.artifacts.get("whitening")
    whitening_inverse = None if whitening is None else np.linalg.inv(np.load(whitening))
    out = Path(plan.workdir) / PEAKS
    count = 0
    with open_session(plan.nwb_path) as session, atomic_path(out) as tmp:
        series = session.select_ephys(plan.ephys.object)
        with pq.ParquetWriter(tmp, PEAK_SCHEMA) as writer:
            for batch in iter_peaks(Path(preprocessed.artifacts["preprocessed"]), meta["num_channels"],
                                    np.asarray(meta["channel_positions_um"]), rate_hz, params,
                                    whitening_inverse=whitening_inverse,
                                    chunk_samples=int(chunk_duration_s * rate_hz)):
                batch["time_s"] = series.sample_times_s(batch["sample_index"])
                writer.write_table(pa.Table.from_pydict(batch, schema=PEAK_SCHEMA))
                count += len(batch["sample_index"])
    record = stage_record("peaks", parameters_json=params.as_json(), inputs=(plan.ephys,),
                          outputs=(str(out),), start_time_utc=started, device=KERNEL_DEVICE)
    seconds = time.perf_counter() - clock
    duration_s = meta["num_samples"] / rate_hz
    return StageOutcome("peaks", seconds, record, {"peaks": str(out)},
                        {"peaks": count, "rate_hz": round(count / duration_s, 1)})
