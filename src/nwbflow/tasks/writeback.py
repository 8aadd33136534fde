"""Prefect task that writes the processed NWB file (atomic export with provenance)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import task

from nwbflow.nwb_io import layout
from nwbflow.nwb_io.write import MotionForNwb, PeaksForNwb, SessionResults, write_processed
from nwbflow.params import SessionParams
from nwbflow.tasks.outcome import StageOutcome
from nwbflow.tasks.plan import SessionPlan


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
    results = SessionResults(provenance=tuple(by_stage[o.stage].provenance for o in outcomes), peaks=peaks,
                             motion=motion)
    written = write_processed(plan.nwb_path, out_path, results)
    return {"path": str(written), "seconds": time.perf_counter() - clock}
