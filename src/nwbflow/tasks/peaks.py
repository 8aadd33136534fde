"""Prefect task of the peaks stage: detection + localization on the preprocessed recording -> peaks.parquet."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.peaks import iter_peaks
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.params import PeakParams
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

PEAKS = "peaks.parquet"
PEAK_SCHEMA = pa.schema([("sample_index", pa.int64()), ("time_s", pa.float64()),
                         ("channel_index", pa.int32()), ("amplitude", pa.float32()),
                         ("x_um", pa.float32()), ("y_um", pa.float32())])


@task(name="peaks", **STAGE_TASK)
def peaks_task(spec: StageSpec, params: PeakParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """Locally exclusive threshold detection + localization -> peaks.parquet (times on the session clock)."""
    recording = PreprocessedRecording.load(upstream["preprocess"].directory)
    chunk_samples = max(int(round(spec.policy.chunks.peaks_s * recording.sampling_rate_hz)), 1)
    count = 0
    with StageRun(spec) as run:
        progress = run.progress(recording.num_samples)
        with atomic_path(run.directory / PEAKS) as tmp, pq.ParquetWriter(tmp, PEAK_SCHEMA) as writer:
            batches = iter_peaks(recording.open(), recording.channel_positions_um, params,
                                 whitening_inverse=recording.whitening_inverse, chunk_samples=chunk_samples,
                                 seed=spec.policy.seed, device=run.device)
            for index, batch in enumerate(batches):
                batch["time_s"] = recording.clock.times_s(batch["sample_index"])
                writer.write_table(pa.Table.from_pydict(batch, schema=PEAK_SCHEMA))
                count += len(batch["sample_index"])
                progress(min((index + 1) * chunk_samples, recording.num_samples))
        duration_s = recording.num_samples / recording.sampling_rate_hz
        return run.finish({"peaks": run.directory / PEAKS},
                          {"peaks": count, "rate_hz": round(count / duration_s, 1)})
