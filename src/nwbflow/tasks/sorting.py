"""Prefect task of the sorting stage: a registered sorter, then the units' waveforms and metrics, and a figure."""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from nwbflow.atomic import atomic_path
from nwbflow.ephys.preprocess import PreprocessedSource
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.ephys.shanks import separate_shanks
from nwbflow.ephys.sorting.registry import SORTERS
from nwbflow.ephys.sorting.traces import SnippetGeometry
from nwbflow.ephys.sorting.units import METRIC_NAMES, MatchedTemplates, UnitReport, UnwhitenedSource, describe_units
from nwbflow.nwb_io.read import open_session
from nwbflow.nwb_io.si_recording import NwbSeriesRecording
from nwbflow.params import PreprocessParams, SortingParams
from nwbflow.plots import unit_summary_png
from nwbflow.tasks.artifacts import save_npy
from nwbflow.tasks.runner import STAGE_TASK, StageOutcome, StageRun, StageSpec

log = logging.getLogger(__name__)

SPIKES = "spikes.parquet"
UNITS = "units.npz"
TEMPLATES = "templates.npy"
TEMPLATE_UNITS = "template_units.npy"
FIGURE = "units.png"
SPIKE_SCHEMA = pa.schema([("sample_index", pa.int64()), ("time_s", pa.float64()), ("unit", pa.int64()),
                          ("amplitude_uv", pa.float32())])


@task(name="sorting", **STAGE_TASK)
def sorting_task(spec: StageSpec, params: SortingParams, upstream: dict[str, StageOutcome]) -> StageOutcome:
    """Sort with ``params.sorter``: ours on the motion-corrected (else preprocessed) recording, a
    SpikeInterface sorter on the raw series; then waveforms, amplitudes and quality metrics (µV)."""
    sorter = SORTERS[params.sorter]
    with StageRun(spec) as run:
        if sorter.reads == "preprocessed":
            recording = PreprocessedRecording.load(_sorted_recording(upstream))
            source = recording.open()
            shanks = recording.shank_ids
            result = sorter.run(source, separate_shanks(recording.channel_positions_um, shanks), params,
                                device=run.device, whitening_inverse=recording.whitening_inverse,
                                chunk_duration_s=spec.policy.chunks.sorting_s, seed=spec.policy.seed,
                                progress=run.progress(source.num_samples * (2 + params.template_update_passes)))
            trains = (result.spike_samples, result.spike_units, result.num_units, result.nothing_found)
            matched = MatchedTemplates(result.spike_templates, result.spike_amplitudes, result.templates,
                                       result.template_units)
            traces = UnwhitenedSource(source, recording.whitening_inverse)
            times_s, positions, inverse = recording.clock.times_s, recording.channel_positions_um, \
                recording.whitening_inverse
            excluded = recording.bad_channels
        else:
            raw = run.enter(closing(NwbSeriesRecording(spec.nwb_path, spec.series)))
            found = sorter.run(raw, params, run.directory / "spikeinterface")
            trains = (found.samples, found.units, found.num_units, f"{params.sorter} returned no units")
            matched = inverse = None
            series = run.enter(open_session(spec.nwb_path)).select_ephys(spec.series)
            traces = _filtered(series, spec)
            times_s, positions = series.sample_times_s, series.channel_positions_um
            excluded = traces.estimates.bad_indices
            shanks = () if series.shank_ids is None else tuple(series.shank_ids)
        samples, units, num_units, nothing_found = trains
        if num_units == 0:  # a silent or too short recording: no units, nothing written, the session goes on
            log.warning("sorting stage on %s found no units: %s", spec.nwb_path, nothing_found)
            return run.finish({}, {"skipped": nothing_found})
        # a unit's electrodes are the channels nearest its peak on its own shank
        report = describe_units(traces, samples, units, num_units, separate_shanks(positions, shanks), params,
                                seed=spec.policy.seed,
                                matched=matched, whitening_inverse=inverse, excluded_channels=excluded)
        artifacts = _save(run.directory, samples, times_s(samples), units, report, positions, params,
                          traces.sampling_rate_hz)
        if matched is not None:  # our templates (whitened scale) and which unit each belongs to
            artifacts["templates"] = save_npy(run.directory / TEMPLATES, matched.templates)
            artifacts["template_units"] = save_npy(run.directory / TEMPLATE_UNITS, matched.template_units)
        summary = {"sorter": params.sorter, "units": int(num_units), "spikes": int(len(samples)),
                   "median_snr": round(float(np.nanmedian(report.metrics["snr"])), 2)}
        return run.finish(artifacts, summary, recording_s=traces.num_samples / traces.sampling_rate_hz)


def _sorted_recording(upstream: dict[str, StageOutcome]) -> str:
    """The directory of the recording our sorter reads: the motion-corrected one when the motion stage
    wrote it, else the preprocessed one."""
    motion = upstream.get("motion")
    return motion.directory if motion is not None and "recording" in motion.artifacts else \
        upstream["preprocess"].directory


def _filtered(series, spec: StageSpec) -> PreprocessedSource:
    """The raw series preprocessed on demand without whitening (µV) for a SpikeInterface sorter's units;
    the session's preprocess parameters (``waveform_preprocess`` in the spec) decide the filter."""
    params = PreprocessParams.model_validate({**spec.parameters["waveform_preprocess"], "whiten": False})
    return PreprocessedSource(series, params, seed=spec.policy.seed, device=spec.device,
                              channel_positions_um=series.channel_positions_um)


def _save(out_dir: Path, samples, times_s, units, report: UnitReport, positions, params: SortingParams,
          fs: float) -> dict[str, Path]:
    waveforms, channels = report.waveforms, report.channels
    spikes = out_dir / SPIKES
    with atomic_path(spikes) as tmp:
        pq.write_table(pa.Table.from_pydict({"sample_index": samples, "time_s": times_s, "unit": units,
                                             "amplitude_uv": report.amplitudes_uv}, schema=SPIKE_SCHEMA), tmp)
    npz = out_dir / UNITS
    rows = np.arange(len(channels))[:, None]
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, unit_channels=channels, peak_channel=waveforms.peak_channel,
                 waveform_mean_uv=waveforms.mean_uv[rows, :, channels].transpose(0, 2, 1),
                 waveform_sd_uv=waveforms.sd_uv[rows, :, channels].transpose(0, 2, 1),
                 before=SnippetGeometry.of(params, fs).before, sampling_rate_hz=fs,
                 **{name: report.metrics[name] for name in METRIC_NAMES})
    png = out_dir / FIGURE
    with atomic_path(png, suffix=".png") as tmp:
        unit_summary_png(waveforms.mean_uv, positions, times_s, units, report.amplitudes_uv, fs, tmp,
                         f"{params.sorter}: {len(waveforms.mean_uv)} units, {len(samples)} spikes")
    return {"spikes": spikes, "units": npz, "figure": png}
