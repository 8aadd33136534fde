"""process_session end to end on a real (temporary) Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION, sha256_of
from nwbflow.cpu_threads import default_threads
from nwbflow.errors import BadInputError
from nwbflow.evaluation import score_detection
from nwbflow.flows.session import process_session
from nwbflow.nwb_io import layout
from nwbflow.nwb_io.read import open_session
from nwbflow.nwb_io.validate import validate_file
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.params import MotionParams, PeakParams, PreprocessParams, SessionParams
from nwbflow.synth import load_ground_truth


@pytest.fixture(scope="module")
def processed(prefect_server, small_session, tmp_path_factory):
    """Run the flow once; keep the state, output path and the input's hash from before the run, and who
    opened the input (the stage tasks' names) and each stage's cache-key computations during the run."""
    import traceback

    import nwbflow.tasks.runner as runner
    from nwbflow.nwb_io.read import NwbSession

    before = sha256_of(small_session)
    out = tmp_path_factory.mktemp("processed") / "small_processed.nwb"
    params = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, peaks=PeakParams(write_to_nwb=True))
    opened_by, keys = [], []
    real_init, real_key = NwbSession.__init__, runner.stage_key

    def counting_init(self, path, **kwargs):
        callers = [frame.name for frame in traceback.extract_stack()]
        opened_by.append(next(name for name in reversed(callers) if name.endswith("_task") or name == "plan_session"))
        real_init(self, path, **kwargs)

    def counting_key(stage, *args, **kwargs):
        keys.append(stage)
        return real_key(stage, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NwbSession, "__init__", counting_init)
        patch.setattr(runner, "stage_key", counting_key)
        state = process_session(str(small_session), str(out), params, return_state=True)
    return {"state": state, "out": out, "input_sha": before, "summary": state.result(), "opened_by": opened_by,
            "keys": keys}


def test_the_input_is_opened_by_plan_preprocess_and_calcium_only(processed):
    """No ephys stage after preprocess opens the NWB file: they read the preprocessed recording's record.
    (Write-back opens it once more, in its export process.)"""
    assert sorted(processed["opened_by"]) == ["calcium_task", "plan_session", "preprocess_task"]


def test_each_stage_computes_its_cache_key_once(processed):
    assert sorted(processed["keys"]) == sorted(["preprocess", "peaks", "motion", "sorting", "calcium"])


def test_flow_completes_on_the_server_and_leaves_input_unchanged(processed, small_session):
    assert processed["state"].is_completed()
    assert sha256_of(small_session) == processed["input_sha"]
    flow_run_id = processed["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.is_completed()
        task_runs = client.read_task_runs()
        names = {t.name for t in task_runs if t.flow_run_id == flow_run_id}
    series = "acquisition/ElectricalSeries"  # stage task runs are named by stage and series
    assert {f"{stage} {series}" for stage in ("preprocess", "peaks", "motion", "sorting")} <= names
    assert any(name.startswith("write-back") for name in names)


def test_provenance_rows_name_the_flow_run_inputs_and_outputs(processed, small_session):
    flow_run_id = str(processed["state"].state_details.flow_run_id)
    with open_session(small_session) as session:
        series = session.select_ephys(None)
        expected_input = {"file": small_session.name, "identifier": session.identifier,
                          "object": series.object_path, "sha256": series.content_hash()}
    with NWBHDF5IO(str(processed["out"]), "r") as io:
        rows = read_provenance(io.read())
    assert [r["stage"] for r in rows] == ["preprocess", "peaks", "motion", "sorting", "calcium"]  # calcium: the ROIs
    assert {r["flow_run_id"] for r in rows} == {flow_run_id}
    assert all(r["task_run_id"] for r in rows) and len({r["task_run_id"] for r in rows}) == 5
    for row in rows:
        if row["stage"] != "calcium":  # calcium reads the RoiResponseSeries (tests/test_calcium.py)
            assert row["inputs"] == [expected_input]
        assert row["start_time_utc"] <= row["end_time_utc"]
        assert row["device"] == "cpu" and row["software"] == "nwbflow"
        assert (row["status"], row["error"]) == ("completed", "")
        assert all(not output.startswith("/") for output in row["outputs"])  # NWB object paths, no host paths
        assert (row["status"], row["error"]) == ("completed", "")
        assert all(not output.startswith("/") for output in row["outputs"])  # NWB object paths, no host paths
    # the policy, in every row; threads unset: this run's share of the cores
    execution = {"device": "cpu", "threads": default_threads(), "seed": 0, "stage_timeout_s": None}
    assert rows[0]["parameters"] == {**PreprocessParams().model_dump(mode="json"),
                                     "execution": {**execution, "chunk": 1.0}}
    assert rows[1]["parameters"]["threshold_mad"] == PeakParams().threshold_mad
    assert layout.PEAKS_PATH in rows[1]["outputs"]
    assert rows[2]["parameters"] == {**MotionParams(**FAST_MOTION).model_dump(mode="json"),
                                     "execution": {**execution, "chunk": 1.0}}
    assert rows[3]["parameters"]["execution"] == {**execution, "chunk": 2.0}
    assert layout.MOTION_PATH in rows[2]["outputs"]


def test_motion_estimate_names_its_series_in_the_raw_file(processed, small_session):
    """The processed file is lean (no raw samples): the estimate names its series by the raw file's identifier
    and object path; the link to the series is there only in a self-contained copy (tests/test_write.py)."""
    motion = next(s for s in processed["summary"]["stages"] if s["stage"] == "motion")
    with np.load(motion["artifacts"]["motion"]) as saved:
        expected = {key: saved[key] for key in ("displacement_um", "time_bins_s", "depth_bins_um")}
    with NWBHDF5IO(str(processed["out"]), "r") as io:
        nwbfile = io.read()
        estimate = nwbfile.processing[layout.ECEPHYS_MODULE][layout.MOTION]
        np.testing.assert_array_equal(estimate.displacement[:], expected["displacement_um"])
        np.testing.assert_array_equal(estimate.time_bin_centers[:], expected["time_bins_s"])
        np.testing.assert_array_equal(estimate.depth_bin_centers[:], expected["depth_bins_um"])
        assert (estimate.method, estimate.direction, estimate.displacement__unit) == ("medicine", "y", "um")
        with open_session(small_session) as session:
            series_path, identifier = session.select_ephys(None).object_path, session.identifier
        assert (estimate.source_file_identifier, estimate.source_object_path) == (identifier, series_path)
        assert estimate.source_electrical_series is None
        assert series_path.split("/")[-1] not in nwbfile.acquisition  # the bulk data stayed in the raw file
    assert Path(motion["artifacts"]["figure"]).stat().st_size > 10_000
    corrected = Path(motion["artifacts"]["corrected"])
    record = json.loads(Path(motion["artifacts"]["recording"]).read_text())
    assert corrected.stat().st_size == record["num_samples"] * record["num_channels"] * 2  # float16
    preprocessed = next(s for s in processed["summary"]["stages"] if s["stage"] == "preprocess")
    assert not Path(preprocessed["artifacts"]["preprocessed"]).exists()  # the sorter read the corrected one
    assert any(str(f).endswith("_motion.png") for f in processed["summary"]["figures"])


def test_peaks_match_ground_truth_and_nwb_copy(processed, small_session):
    peaks_path = next(s["artifacts"]["peaks"] for s in processed["summary"]["stages"] if s["stage"] == "peaks")
    peaks = pq.read_table(peaks_path).to_pandas()
    truth = load_ground_truth(small_session)
    score = score_detection(peaks["sample_index"].to_numpy(), truth.ephys_sample_index, tolerance_samples=12)
    # Synthetic units span ~40-200 µV against 10 µV noise; at 5 MAD nearly all are above threshold.
    assert score.recall > 0.8, score
    assert score.precision > 0.9, score
    with NWBHDF5IO(str(processed["out"]), "r") as io:
        table = io.read().processing[layout.ECEPHYS_MODULE][layout.PEAKS]
        np.testing.assert_allclose(table["timestamp"][:], peaks["time_s"].to_numpy())


def test_processed_file_passes_the_three_validators(processed, small_session):
    report = validate_file(processed["out"])
    assert report.not_run == ()
    assert report.introduced_over(validate_file(small_session)) == ()
    assert not [f for f in report.findings if f.validator == "pynwb"]


def test_a_spikeinterface_sorter_runs_alone_on_the_raw_series(prefect_server, small_session, tmp_path):
    """The registry's SpikeInterface path: with only the sorting stage asked for, none of our ephys stages
    runs; the units' µV waveforms and metrics are read from the raw series through our preprocessing."""
    out = tmp_path / "si.nwb"
    params = SessionParams(stages=("sorting",), execution={"device": "cpu"}, sorting={"sorter": "simple"})
    summary = process_session(str(small_session), str(out), params, str(tmp_path / "work"))
    assert [s["stage"] for s in summary["stages"]] == ["sorting"]
    assert not list((tmp_path / "work").glob("*/preprocess-*"))
    counts = summary["stages"][0]["summary"]
    assert counts["sorter"] == "simple" and counts["units"] >= 3 and counts["spikes"] > 100
    with NWBHDF5IO(str(out), "r") as io:
        units = io.read().units
        troughs = np.array([w[:, 0].min() for w in units["waveform_mean"][:]])  # peak channel first
        assert len(units) == counts["units"] and np.all(np.isfinite(units["snr"][:]))
        assert np.all(troughs < 0) and np.median(units["amplitude_median"][:]) < 0
        spike_times = np.concatenate(list(units["spike_times"][:]))
    truth = load_ground_truth(small_session)
    score = score_detection(np.round(spike_times * 30_000.0).astype(np.int64), truth.ephys_sample_index, 12)
    assert score.precision > 0.8, score


def test_bad_input_fails_the_flow_with_a_clear_error(prefect_server, tmp_path):
    not_nwb = tmp_path / "notes.nwb"
    not_nwb.write_text("this is not HDF5")
    with pytest.raises(BadInputError, match="notes.nwb"):
        process_session(str(not_nwb), str(tmp_path / "out.nwb"), SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION))
    assert not (tmp_path / "out.nwb").exists()


def test_dandi_validate_passes_once_organized(processed, tmp_path):
    """The real `dandi validate` on a Dandiset holding the processed file (laid out by `dandi organize`)."""
    import subprocess
    import sys
    from pathlib import Path

    dandi = Path(sys.executable).with_name("dandi")
    (tmp_path / "dandiset.yaml").write_text("identifier: DANDI:000000\nname: nwbflow test\ndescription: test\n")
    organize = subprocess.run([str(dandi), "organize", "-f", "copy", "-d", str(tmp_path), str(processed["out"])],
                              capture_output=True, text=True, timeout=300)
    assert organize.returncode == 0, organize.stderr[-2000:]
    assert len(list(tmp_path.glob("sub-*/*.nwb"))) == 1
    result = subprocess.run([str(dandi), "validate", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "No errors found" in result.stdout + result.stderr


def test_sorted_units_are_a_units_table_with_waveforms_and_quality_metrics(processed, small_session):
    """The units table as DESIGN.md (and NeuroConv) lay it out; units match the ground truth's big units."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting

    from nwbflow.ephys.sorting.units import METRIC_NAMES

    with open_session(small_session) as session:
        series = session.select_ephys(None)
        rate, duration_s, rows = series.sampling_rate_hz, series.num_samples / series.sampling_rate_hz, \
            series.electrode_indices
    with NWBHDF5IO(str(processed["out"]), "r") as io:
        units = io.read().units
        assert units is not None and len(units) >= 4
        assert units.resolution == pytest.approx(1.0 / rate)
        assert units.waveform_unit == "microvolts" and units.waveform_rate == pytest.approx(rate)
        assert {"unit_name", "electrodes", "waveform_mean", "waveform_sd", *METRIC_NAMES} <= set(units.colnames)
        frame = units.to_dataframe()
        means = np.asarray(units["waveform_mean"].data[:])
        assert means.shape[:2] == (len(units), 61)
        for index in range(len(units)):
            electrodes = units["electrodes"][index].index.to_numpy()
            assert set(electrodes) <= set(rows.tolist()) and len(electrodes) == means.shape[2]
            # the first electrode is the unit's peak channel: its trough is the deepest
            assert np.abs(means[index][:, 0]).max() == pytest.approx(np.abs(means[index]).max())
            times = np.asarray(frame["spike_times"].iloc[index])
            assert np.all(np.diff(times) >= 0) and 0 <= times.min() and times.max() <= duration_s
        assert np.all(frame["firing_rate"] > 0) and np.all(frame["snr"] > 3)
        assert np.all(frame["amplitude_median"] < 0)
        trains = [np.round(np.asarray(t) * rate).astype(np.int64) for t in frame["spike_times"]]
    sorting = NumpySorting.from_samples_and_labels(
        [np.concatenate(trains)], [np.repeat(np.arange(len(trains)), [len(t) for t in trains])], rate)
    comparison = compare_sorter_to_ground_truth(load_ground_truth(small_session).to_sorting(), sorting,
                                                exhaustive_gt=True)
    assert len(comparison.get_well_detected_units(well_detected_score=0.8)) >= 4  # measured: 6 of 8
    assert Path(str(processed["out"]).replace(".nwb", "_units.png")).stat().st_size > 10_000
