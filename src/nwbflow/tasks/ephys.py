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
from nwbflow.atomic import atomic_path
from nwbflow.tasks.artifacts import save_json, save_npy
from nwbflow.tasks.caching import mark_complete, stage_dir, stage_key
from nwbflow.tasks.compute import stage_device
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.policy import STAGE_TASK_OPTIONS, retry_chunk_scale
from nwbflow.tasks.progress import StageProgress
from nwbflow.tasks.provenance import stage_record, utc_now

log = logging.getLogger(__name__)

PREPROCESSED = "preprocessed.bin"
PREPROCESS_META = "preprocess.json"
WHITENING = "whitening.npy"
PEAKS = "peaks.parquet"

PEAK_SCHEMA = pa.schema([("sample_index", pa.int64()), ("time_s", pa.float64()),
                         ("channel_index", pa.int32()), ("amplitude", pa.float32()),
                         ("x_um", pa.float32()), ("y_um", pa.float32())])

def preprocess_key(plan: SessionPlan, params: PreprocessParams) -> str:
    return stage_key("preprocess", plan.input_identity, params.as_json())


def peaks_key(plan: SessionPlan, preprocessed: StageOutcome, params: PeakParams) -> str:
    return stage_key("peaks", plan.input_identity, params.as_json(), (preprocessed.key,))


@task(name="preprocess", persist_result=True, **STAGE_TASK_OPTIONS,
      cache_key_fn=lambda _ctx, p: preprocess_key(p["plan"], p["params"]))
def preprocess_task(plan: SessionPlan, params: PreprocessParams, device: str = "auto",
                    timeout_s: float | None = None) -> StageOutcome:
    """Offset, median CAR, zero-phase band-pass, whitening -> float16/float32 scratch binary."""
    started, clock = utc_now(), time.perf_counter()
    key = preprocess_key(plan, params)
    out_dir = stage_dir(plan.workdir, "preprocess", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    params_run = params.model_copy(update={"chunk_duration_s": params.chunk_duration_s * retry_chunk_scale()})
    with stage_device(device, "preprocess") as torch_device, open_session(plan.nwb_path) as session:
        series = session.select_ephys(plan.ephys.object)
        progress = StageProgress("preprocess", series.num_samples, timeout_s)
        try:
            result = preprocess_to_binary(series, params_run, out_dir / PREPROCESSED, progress=progress,
                                          device=torch_device)
        finally:
            progress.close()
        meta = {"num_samples": result.num_samples, "num_channels": result.num_channels,
                "sampling_rate_hz": series.sampling_rate_hz, "dtype": result.dtype,
                "channel_positions_um": series.channel_positions_um.tolist(),
                "positions_are_fallback": bool(series.positions_are_fallback),
                "margin_samples": result.margin_samples, "source": plan.ephys.as_dict()}
    artifacts = {"preprocessed": str(out_dir / PREPROCESSED)}
    if result.whitening is not None:
        artifacts["whitening"] = str(save_npy(out_dir / WHITENING, result.whitening))
    artifacts["meta"] = str(save_json(out_dir / PREPROCESS_META, meta))
    record = stage_record("preprocess", parameters_json=params.as_json(), inputs=(plan.ephys,),
                          outputs=tuple(artifacts.values()), start_time_utc=started, device=str(torch_device))
    seconds = time.perf_counter() - clock
    duration_s = result.num_samples / series.sampling_rate_hz
    summary = {"channels": result.num_channels, "sampling_rate_hz": series.sampling_rate_hz,
               "recording_s": round(duration_s, 3), "x_realtime": round(duration_s / max(seconds, 1e-9), 1)}
    mark_complete(out_dir, summary)
    return StageOutcome("preprocess", key, seconds, record, artifacts, summary)


@task(name="peaks", persist_result=True, **STAGE_TASK_OPTIONS,
      cache_key_fn=lambda _ctx, p: peaks_key(p["plan"], p["preprocessed"], p["params"]))
def peaks_task(plan: SessionPlan, preprocessed: StageOutcome, params: PeakParams, chunk_duration_s: float,
               device: str = "auto", timeout_s: float | None = None) -> StageOutcome:
    """Locally exclusive threshold detection + center-of-mass localization -> peaks.parquet."""
    started, clock = utc_now(), time.perf_counter()
    key = peaks_key(plan, preprocessed, params)
    out_dir = stage_dir(plan.workdir, "peaks", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads(Path(preprocessed.artifacts["meta"]).read_text())
    rate_hz, num_samples = meta["sampling_rate_hz"], meta["num_samples"]
    whitening = preprocessed.artifacts.get("whitening")
    whitening_inverse = None if whitening is None else np.linalg.inv(np.load(whitening))
    chunk_samples = max(int(chunk_duration_s * retry_chunk_scale() * rate_hz), 1)
    out, count = out_dir / PEAKS, 0
    progress = StageProgress("peaks", num_samples, timeout_s)
    with stage_device(device, "peaks") as torch_device, open_session(plan.nwb_path) as session, \
            atomic_path(out) as tmp:
        series = session.select_ephys(plan.ephys.object)
        with pq.ParquetWriter(tmp, PEAK_SCHEMA) as writer:
            batches = iter_peaks(Path(preprocessed.artifacts["preprocessed"]), meta["num_channels"],
                                 np.asarray(meta["channel_positions_um"]), rate_hz, params,
                                 whitening_inverse=whitening_inverse, chunk_samples=chunk_samples,
                                 device=torch_device, binary_dtype=meta["dtype"])
            for index, batch in enumerate(batches):
                batch["time_s"] = series.sample_times_s(batch["sample_index"])
                writer.write_table(pa.Table.from_pydict(batch, schema=PEAK_SCHEMA))
                count += len(batch["sample_index"])
                progress(min((index + 1) * chunk_samples, num_samples))
    progress.close()
    record = stage_record("peaks", parameters_json=params.as_json(), inputs=(plan.ephys,),
                          outputs=(str(out),), start_time_utc=started, device=str(torch_device))
    seconds = time.perf_counter() - clock
    summary = {"peaks": count, "rate_hz": round(count / (num_samples / rate_hz), 1)}
    mark_complete(out_dir, summary)
    return StageOutcome("peaks", key, seconds, record, {"peaks": str(out)}, summary)
