"""``nwbflow demo``: synthesize a session, process it on CPU, score it, validate it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nwbflow.evaluation import score_detection
from nwbflow.nwb_io.validate import validate_file
from nwbflow.params import SessionParams
from nwbflow.report import format_table, stage_table
from nwbflow.synth import SynthConfig, load_ground_truth, write_synthetic_session

#: Detections within this distance of a ground-truth spike count as hits (ms).
MATCH_TOLERANCE_MS = 0.4


def run_demo(out_dir: Path, config: SynthConfig = SynthConfig()) -> bool:
    """Run the demo end to end; print the stage table, accuracy and validation. True when valid."""
    from nwbflow.flows.session import process_session

    out_dir.mkdir(parents=True, exist_ok=True)
    raw, processed = out_dir / "demo_session.nwb", out_dir / "demo_session_processed.nwb"
    clock = time.perf_counter()
    write_synthetic_session(raw, config, overwrite=True)
    synth_s = time.perf_counter() - clock
    params = SessionParams(execution={"device": "cpu"})
    summary = process_session(str(raw), str(processed), params, str(out_dir / "work"))
    print(f"\nsynthetic session: {raw} ({synth_s:.1f} s to write)\n")
    print(stage_table(summary))
    print("\n" + _accuracy_table(raw, summary, params))
    return _print_validation(raw, processed)


def _accuracy_table(raw: Path, summary: dict, params: SessionParams) -> str:
    """Recall and precision of the detected peaks against the ground-truth spikes.

    Units whose ground-truth trough is below the detection threshold in raw
    noise units (|trough| < threshold_mad x noise) are reported apart: no
    threshold detector should find most of their spikes.
    """
    truth = load_ground_truth(raw)
    ephys = truth.metadata["ephys"]
    peaks_path = next(s["artifacts"]["peaks"] for s in summary["stages"] if s["stage"] == "peaks")
    detected = pq.read_table(peaks_path, columns=["sample_index"])["sample_index"].to_numpy()
    tolerance = int(round(MATCH_TOLERANCE_MS * 1e-3 * ephys["sampling_rate_hz"]))
    floor_uv = params.peaks.threshold_mad * ephys["noise_level_uv"]
    above = {u["unit_id"] for u in ephys["units"] if abs(u["trough_uv"]) >= floor_uv}
    is_above = np.isin(truth.ephys_unit_id, list(above))
    rows = [["ground-truth spikes (units)", f"{truth.ephys_sample_index.size} ({len(ephys['units'])})"],
            ["detected peaks", str(detected.size)]]
    for label, mask in ((f"units with |trough| >= {floor_uv:.0f} µV ({len(above)})", is_above),
                        (f"units below it ({len(ephys['units']) - len(above)})", ~is_above)):
        score = score_detection(detected, truth.ephys_sample_index[mask], tolerance)
        rows.append([f"recall (±{MATCH_TOLERANCE_MS} ms), {label}", f"{score.recall:.3f}"])
    overall = score_detection(detected, truth.ephys_sample_index, tolerance)
    rows.append([f"precision (±{MATCH_TOLERANCE_MS} ms)", f"{overall.precision:.3f}"])
    return format_table(["peak detection vs ground truth", "value"], rows)


def _print_validation(raw: Path, processed: Path) -> bool:
    baseline, report = validate_file(raw), validate_file(processed)
    rows = []
    for validator in ("pynwb", "nwbinspector", "dandi"):
        if validator in report.not_run:
            rows.append([validator, "not installed"])
            continue
        new = [f for f in report.introduced_over(baseline) if f.validator == validator]
        rows.append([validator, "pass" if not new else f"{len(new)} new problem(s): {new[0].message}"])
    print("\n" + format_table(["validator (processed file)", "result"], rows))
    return all(row[1] == "pass" for row in rows)
