"""Prefect task that writes the processed NWB file: every series' results and every stage's provenance row."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import task

from nwbflow.ephys.sorting.units import METRIC_DESCRIPTIONS
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.nwb_io.results import CalciumForNwb, MotionForNwb, PeaksForNwb, SessionResults, UnitsForNwb
from nwbflow.nwb_io.write import units_destination, write_processed
from nwbflow.params import SessionParams
from nwbflow.tasks.motion import motion_files
from nwbflow.tasks.plan import SeriesFailure, SeriesPlan, SessionPlan
from nwbflow.tasks.provenance import failure_record
from nwbflow.tasks.runner import StageOutcome


@task(name="write-back")
def write_back_task(plan: SessionPlan, out_path: str, finished: list[tuple[SeriesPlan, dict[str, StageOutcome]]],
                    failures: list[SeriesFailure], params: SessionParams) -> dict:
    """Export the input with every finished series' results, and a provenance row per stage run (failed
    series included), to ``out_path``; the input's own validation findings come back as warnings."""
    clock = time.perf_counter()
    units_path = units_destination(plan.nwb_path)
    parts = [_series_results(series, done, params, units_path) for series, done in finished]
    provenance = tuple(row for _, rows in parts for row in rows) + tuple(
        failure_record(f, plan) for f in failures)
    results = SessionResults(provenance=provenance,
                             **{kind: tuple(r for results, _ in parts for r in results.get(kind, ()))
                                for kind in ("peaks", "motion", "calcium", "units")})
    report = write_processed(plan.nwb_path, out_path, results, copy_raw=params.write.copy_raw)
    return {"path": str(report.path), "seconds": time.perf_counter() - clock, "dropped": list(report.dropped),
            "input_findings": [f"{f.validator}: {f.location}: {f.message}" for f in report.input_findings]}


def _series_results(series: SeriesPlan, done: dict[str, StageOutcome], params: SessionParams,
                    units_path: str) -> tuple[dict[str, list], list[ProvenanceRecord]]:
    """One series' results to write, and its stages' provenance rows with the NWB objects they went to."""
    results: dict[str, list] = {}
    rows = []
    for stage, outcome in done.items():
        if not outcome.artifacts:  # a skipped stage (motion on too few peaks, no units) wrote nothing
            continue
        kind, result, where = _result(stage, series, outcome, done, params, units_path)
        if isinstance(result, list):  # one per shank of a multi-shank probe
            results.setdefault(kind, []).extend(result)
            rows.append(dataclasses.replace(outcome.provenance, outputs=tuple(where)))
            continue
        if result is not None:
            results.setdefault(kind, []).append(result)
        rows.append(dataclasses.replace(outcome.provenance, outputs=(where,) if result is not None else ()))
    return results, rows


def _result(stage: str, series: SeriesPlan, outcome: StageOutcome, done: dict[str, StageOutcome],
            params: SessionParams, units_path: str) -> tuple[str, object, str]:
    """(kind, what to write, its object path) of one stage's outcome; (kind, None, "") when nothing goes in."""
    artifacts, label = outcome.artifacts, series.label
    if stage == "peaks" and params.peaks.write_to_nwb:
        name = layout.named(layout.PEAKS, label)
        rate_hz = float(done["preprocess"].summary["sampling_rate_hz"])
        unit = "noise standard deviations (whitened)" if params.preprocess.whiten else "µV"
        return "peaks", PeaksForNwb(Path(artifacts["peaks"]), series.object, rate_hz, unit, name), \
            layout.object_path(layout.ECEPHYS_MODULE, name)
    if stage == "motion":
        files = motion_files(artifacts)
        if list(files) == [""]:
            name = layout.named(layout.MOTION, label)
            return "motion", MotionForNwb(
                files[""], series.object, "medicine", outcome.provenance.parameters,
                f"MEDiCINe motion estimate (nwbflow) of {series.object} from its detected peaks' localized depths.",
                name), layout.object_path(layout.ECEPHYS_MODULE, name)
        names = {shank: layout.named(layout.named(layout.MOTION, label), f"shank{shank}") for shank in files}
        return "motion", [MotionForNwb(
            path, series.object, "medicine", outcome.provenance.parameters,
            f"MEDiCINe motion estimate (nwbflow) of shank {shank} of {series.object}, from the localized depths of "
            "the peaks on that shank's channels (each shank fitted and corrected on its own).", names[shank])
            for shank, path in files.items()], [layout.object_path(layout.ECEPHYS_MODULE, n) for n in names.values()]
    if stage == "sorting":
        return "units", UnitsForNwb(Path(artifacts["spikes"]), Path(artifacts["units"]), series.object,
                                    params.sorting.sorter, tuple(METRIC_DESCRIPTIONS.items()), label), units_path
    if stage == "calcium":
        summary = outcome.summary
        how = (f"CNN {summary['model']} (weights sha256 {summary['model_sha256']})" if summary["method"] == "cnn"
               else "non-negative AR(1) deconvolution")
        name = layout.named(layout.SPIKE_RATE, label)
        return "calcium", CalciumForNwb(
            Path(artifacts["spike_rate"]), series.object, summary["frame_rate_hz"],
            f"Spike rate (Hz) inferred by nwbflow from {series.object} ({summary['input_kind']}) with {how}; one "
            "value per frame of the source series, same ROIs.", name), f"{layout.OPHYS_RESULTS}/{name}"
    return stage, None, ""
