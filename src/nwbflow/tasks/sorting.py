"""Prefect task for the sorting stage: our sorter or a SpikeInterface one, then waveforms, metrics, figure."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.chunks import open_binary
from nwbflow.ephys.sorting import sort_traces
from nwbflow.ephys.sorting.features import SnippetGeometry
from nwbflow.ephys.sorting.metrics import (METRIC_NAMES, UnwhitenedSource, filtered_noise_uv, quality_metrics,
                                           spike_amplitudes_uv, unit_waveforms)
from nwbflow.nwb_io.read import open_session
from nwbflow.params import SortingParams
from nwbflow.plots import unit_summary_png
from nwbflow.tasks.artifacts import save_npy
from nwbflow.tasks.caching import mark_complete, stage_dir, stage_key
from nwbflow.tasks.compute import stage_device
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.policy import STAGE_TASK_OPTIONS, retry_chunk_scale
from nwbflow.tasks.progress import StageProgress
from nwbflow.tasks.provenance import stage_record, utc_now
from nwbflow.tasks.sorters import run_spikeinterface_sorter

log = logging.getLogger(__name__)

SPIKES = "spikes.parquet"
UNITS = "units.npz"
TEMPLATES = "templates.npy"
TEMPLATE_UNITS = "template_units.npy"
FIGURE = "units.png"
SPIKE_SCHEMA = pa.schema([("sample_index", pa.int64()), ("time_s", pa.float64()), ("unit", pa.int64()),
                          ("amplitude_uv", pa.float32())])


def sorting_key(plan: SessionPlan, preprocessed: StageOutcome, motion: StageOutcome | None,
                params: SortingParams) -> str:
    upstream = (preprocessed.key,) + ((motion.key,) if motion is not None else ())
    return stage_key("sorting", plan.input_identity, params.as_json(), upstream)


@task(name="sorting", persist_result=True, **STAGE_TASK_OPTIONS,
      cache_key_fn=lambda _ctx, p: sorting_key(p["plan"], p["preprocessed"], p.get("motion"), p["params"]))
def sorting_task(plan: SessionPlan, preprocessed: StageOutcome, motion: StageOutcome | None, params: SortingParams,
                 device: str = "auto", timeout_s: float | None = None) -> StageOutcome:
    """Sort the motion-corrected traces (or the preprocessed ones when motion was skipped) -> units."""
    started, clock = utc_now(), time.perf_counter()
    key = sorting_key(plan, preprocessed, motion, params)
    out_dir = stage_dir(plan.workdir, "sorting", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads(Path(preprocessed.artifacts["meta"]).read_text())
    fs, positions = float(meta["sampling_rate_hz"]), np.asarray(meta["channel_positions_um"])
    traces_path = (motion.artifacts.get("corrected") if motion is not None else None) \
        or preprocessed.artifacts["preprocessed"]
    source = open_binary(traces_path, meta["num_channels"], fs, dtype=meta["dtype"])
    whitening = preprocessed.artifacts.get("whitening")
    whitening_inverse = None if whitening is None else np.linalg.inv(np.load(whitening))
    geometry = SnippetGeometry.of(params, fs)
    with stage_device(device, "sorting") as torch_device:
        if params.sorter == "nwbflow":
            progress = StageProgress("sorting", source.num_samples * (2 + params.template_update_passes), timeout_s)
            try:
                params_run = params.model_copy(update={"chunk_duration_s": params.chunk_duration_s
                                                       * retry_chunk_scale()})
                result = sort_traces(source, positions, params_run, device=torch_device, progress=progress)
            finally:
                progress.close()
            samples, units, num_units = result.spike_samples, result.spike_units, result.num_units
        else:
            samples, units, num_units = run_spikeinterface_sorter(plan.nwb_path, plan.ephys.object, params,
                                                                  out_dir / "spikeinterface")
            result = None
    if num_units == 0:  # a silent or too short recording: no units, nothing written, the session goes on
        reason = result.nothing_found if result is not None else f"{params.sorter} returned no units"
        log.warning("sorting stage on %s found no units: %s", plan.nwb_path, reason)
        record = stage_record("sorting", parameters_json=params.as_json(), inputs=(plan.ephys,), outputs=(),
                              start_time_utc=started, device=str(torch_device))
        mark_complete(out_dir, {"skipped": reason})
        return StageOutcome("sorting", key, time.perf_counter() - clock, record, {}, {"skipped": reason})
    unwhitened = UnwhitenedSource(source, whitening_inverse)
    waveforms = unit_waveforms(unwhitened, samples, units, num_units, geometry.before, geometry.width,
                               params.waveform_spikes, params.seed)
    if result is not None:
        amplitudes = spike_amplitudes_uv(result.spike_templates, result.spike_amplitudes, result.templates,
                                         result.template_units, waveforms, whitening_inverse)
    else:  # a SpikeInterface sorter: the trace at the unit's peak channel and the spike's sample
        amplitudes = _values_at(unwhitened, samples, waveforms.peak_channel[units])
    metrics = quality_metrics(samples, units, num_units, source.num_samples, fs, amplitudes, waveforms,
                              filtered_noise_uv(unwhitened, params.seed), params.refractory_ms,
                              params.presence_bin_s)
    with open_session(plan.nwb_path) as session:
        times_s = session.select_ephys(plan.ephys.object).sample_times_s(samples)
    artifacts = _save(out_dir, samples, times_s, units, amplitudes, waveforms, metrics, positions, geometry,
                      params, fs)
    if result is not None:  # our templates (whitened scale) and which unit each belongs to
        artifacts["templates"] = str(save_npy(out_dir / TEMPLATES, result.templates))
        artifacts["template_units"] = str(save_npy(out_dir / TEMPLATE_UNITS, result.template_units))
    record = stage_record("sorting", parameters_json=params.as_json(), inputs=(plan.ephys,),
                          outputs=tuple(artifacts.values()), start_time_utc=started, device=str(torch_device))
    seconds = time.perf_counter() - clock
    summary = {"sorter": params.sorter, "units": int(num_units), "spikes": int(len(samples)),
               "median_snr": round(float(np.nanmedian(metrics["snr"])), 2) if num_units else None}
    mark_complete(out_dir, summary)
    return StageOutcome("sorting", key, seconds, record, artifacts, summary)


def _values_at(source: UnwhitenedSource, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
    values = np.zeros(len(samples), np.float32)
    for index, (sample, channel) in enumerate(zip(samples.tolist(), channels.tolist())):
        values[index] = source.get_traces(sample, sample + 1)[0, channel]
    return values


def _save(out_dir: Path, samples, times_s, units, amplitudes, waveforms, metrics, positions, geometry, params,
          fs) -> dict[str, str]:
    spikes = out_dir / SPIKES
    with atomic_path(spikes) as tmp:
        pq.write_table(pa.Table.from_pydict({"sample_index": samples, "time_s": times_s, "unit": units,
                                             "amplitude_uv": amplitudes}, schema=SPIKE_SCHEMA), tmp)
    npz = out_dir / UNITS
    channels = unit_channels(positions, waveforms.peak_channel, params.template_radius_um)
    rows = np.arange(len(channels))[:, None]
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, unit_channels=channels, peak_channel=waveforms.peak_channel,
                 waveform_mean_uv=waveforms.mean_uv[rows, :, channels].transpose(0, 2, 1),
                 waveform_sd_uv=waveforms.sd_uv[rows, :, channels].transpose(0, 2, 1),
                 before=geometry.before, sampling_rate_hz=fs, **{name: metrics[name] for name in METRIC_NAMES})
    png = out_dir / FIGURE
    with atomic_path(png, suffix=".png") as tmp:
        unit_summary_png(waveforms.mean_uv, positions, times_s, units, amplitudes, fs, tmp,
                         f"{params.sorter}: {len(waveforms.mean_uv)} units, {len(samples)} spikes")
    return {"spikes": str(spikes), "units": str(npz), "figure": str(png)}


def unit_channels(positions: np.ndarray, peak_channel: np.ndarray, radius_um: float) -> np.ndarray:
    """(U, K) each unit's K channels nearest its peak channel, nearest first (peak channel first).

    K is the most channels any channel has within ``radius_um``, so every unit gets the same count
    (NWB's waveform_mean is rectangular and ordered as the unit's ``electrodes``).
    """
    distance = np.linalg.norm(positions[:, None, :2] - positions[None, :, :2], axis=2)
    count = int((distance <= radius_um).sum(axis=1).max()) if len(positions) else 0
    order = np.argsort(distance, axis=1, kind="stable")[:, :count]
    return order[peak_channel].astype(np.int64)
