"""Prefect task that writes the processed NWB file (atomic export with provenance)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import task

from nwbflow.ephys.sorting.units import METRIC_DESCRIPTIONS
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.write import (CalciumForNwb, MotionForNwb, PeaksForNwb, SessionResults, UnitsForNwb,
                                  write_processed)
from nwbflow.params import SessionParams
from nwbflow.tasks.plan import SessionPlan
from nwbflow.tasks.runner import StageOutcome


@task(name="write-back")
def write_back_task(plan: SessionPlan, out_path: str, outcomes: list[StageOutcome],
                    params: SessionParams) -> dict[str, str | float]:
    """Export the input with every stage's results and provenance rows to ``out_path``."""
    clock = time.perf_counter()
    outcomes = [o for o in outcomes if o.artifacts]  # a skipped stage (e.g. motion on too few peaks) wrote nothing
    by_stage = {o.stage: o for o in outcomes}
    peaks = None
    if params.peaks.write_to_nwb and "peaks" in by_stage:
        peaks = PeaksForNwb(
            parquet_path=Path(by_stage["peaks"].artifacts["peaks"]),
            electrical_series=plan.ephys.object,
            sampling_rate_hz=float(by_stage["preprocess"].summary["sampling_rate_hz"]),
            amplitude_unit="noise standard deviations (whitened)" if params.preprocess.whiten else "µV")
        record = by_stage["peaks"].provenance
        by_stage["peaks"] = dataclasses.replace(by_stage["peaks"], provenance=dataclasses.replace(
            record, outputs=record.outputs + (layout.PEAKS_PATH,)))
    motion = None
    if "motion" in by_stage:
        record = by_stage["motion"].provenance
        motion = MotionForNwb(npz_path=Path(by_stage["motion"].artifacts["motion"]),
                              electrical_series=plan.ephys.object, method="medicine",
                              parameters_json=record.parameters,
                              description="MEDiCINe motion estimate (nwbflow) from the detected peaks' "
                                          "localized depths.")
        by_stage["motion"] = dataclasses.replace(by_stage["motion"], provenance=dataclasses.replace(
            record, outputs=record.outputs + (layout.MOTION_PATH,)))
    units = None
    if "sorting" in by_stage:
        units = UnitsForNwb(spikes_path=Path(by_stage["sorting"].artifacts["spikes"]),
                            units_path=Path(by_stage["sorting"].artifacts["units"]),
                            electrical_series=plan.ephys.object, sorter=params.sorting.sorter,
                            metric_descriptions=tuple(METRIC_DESCRIPTIONS.items()))
        record = by_stage["sorting"].provenance
        by_stage["sorting"] = dataclasses.replace(by_stage["sorting"], provenance=dataclasses.replace(
            record, outputs=record.outputs + (layout.UNITS,)))
    calcium = None
    if "calcium" in by_stage:
        calcium, by_stage["calcium"] = _calcium_for_nwb(plan, by_stage["calcium"])
    results = SessionResults(provenance=tuple(by_stage[o.stage].provenance for o in outcomes), peaks=peaks,
                             motion=motion, calcium=calcium, units=units)
    written = write_processed(plan.nwb_path, out_path, results)
    return {"path": str(written), "seconds": time.perf_counter() - clock}


def _calcium_for_nwb(plan: SessionPlan, outcome: StageOutcome) -> tuple[CalciumForNwb, StageOutcome]:
    """The calcium result to write, and its outcome with the NWB object added to the provenance outputs."""
    summary = outcome.summary
    how = (f"CNN {summary['model']} (weights sha256 {summary['model_sha256']})" if summary["method"] == "cnn"
           else "non-negative AR(1) deconvolution")
    calcium = CalciumForNwb(
        npy_path=Path(outcome.artifacts["spike_rate"]), roi_series=plan.ophys.object,
        description=f"Spike rate (Hz) inferred by nwbflow from {plan.ophys.object} ({summary['input_kind']}) "
                    f"with {how}; one value per frame of the source series, same ROIs.")
    record = outcome.provenance
    return calcium, dataclasses.replace(outcome, provenance=dataclasses.replace(
        record, outputs=record.outputs + (layout.SPIKE_RATE_PATH,)))
