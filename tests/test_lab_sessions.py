"""Sessions as labs' writers lay them out (tests/lab_writers.py): every probe, ROI series by role, the
input's own schema problems, a lean processed file with no host path in it."""

from __future__ import annotations

import numpy as np
import pytest
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION, sha256_of
from lab_writers import AP_RATE_HZ, FRAME_RATE_HZ, write_ophys_session, write_two_probe_session
from nwbflow.errors import BadInputError, PartialResultsError
from nwbflow.nwb_io._hdf5 import text_values
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.nwb_io.validate import validate_file
from nwbflow.params import SessionParams

PARAMS = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION)
PROBES = ("acquisition/ElectricalSeriesAPImec0", "acquisition/ElectricalSeriesAPImec1")


def _process(path, params=PARAMS, name="processed"):
    from nwbflow.flows.session import process_session

    out = path.with_name(f"{path.stem}_{name}.nwb")
    return out, process_session(str(path), str(out), params, str(path.parent / "work"))


@pytest.fixture(scope="module")
def two_probes(prefect_server, tmp_path_factory):
    """NeuroConv's two-probe SpikeGLX layout (AP and LF bands of two probes), processed with defaults."""
    folder = tmp_path_factory.mktemp("two-probes")
    path, truths = write_two_probe_session(folder / "probes.nwb")
    before = sha256_of(path)
    out, summary = _process(path)
    return {"path": path, "truths": truths, "out": out, "summary": summary, "before": before, "folder": folder}


def test_both_probes_are_sorted_into_one_units_table(two_probes):
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting

    with NWBHDF5IO(str(two_probes["out"]), "r") as io:
        units = io.read().units.to_dataframe()
    assert set(units["electrical_series"]) == set(PROBES)  # NeuroConv's column: each unit's source series
    assert units.index.is_unique and all(name.startswith("ElectricalSeriesAPImec") for name in units["unit_name"])
    for probe, (series, truth) in enumerate(zip(PROBES, two_probes["truths"])):
        trains = [np.round(np.asarray(t) * AP_RATE_HZ).astype(np.int64)
                  for t in units.loc[units["electrical_series"] == series, "spike_times"]]
        electrodes = {int(e) for table in units.loc[units["electrical_series"] == series, "electrodes"]
                      for e in table.index}
        assert electrodes <= set(range(16 * probe, 16 * probe + 16))  # the probe's own electrodes
        sorting = NumpySorting.from_samples_and_labels(
            [np.concatenate(trains)], [np.repeat(np.arange(len(trains)), [len(t) for t in trains])], AP_RATE_HZ)
        comparison = compare_sorter_to_ground_truth(truth, sorting, exhaustive_gt=True)
        # 4 units a probe at 8 Hz for 8 s (~64 spikes each): at least 3 found with accuracy >= 0.8.
        assert len(comparison.get_well_detected_units(well_detected_score=0.8)) >= 3, (series, comparison)


def test_each_probe_has_its_own_stages_motion_and_provenance(two_probes):
    summary = two_probes["summary"]
    assert {s["object"] for s in summary["series"]} == set(PROBES)  # the LF bands are skipped
    assert len({s["workdir"] for s in summary["series"]}) == 2
    with NWBHDF5IO(str(two_probes["out"]), "r") as io:
        nwbfile = io.read()
        ecephys = nwbfile.processing["ecephys"].data_interfaces
        for series in PROBES:
            name = series.rsplit("/", 1)[1]
            assert ecephys[f"motion_{name}"].source_object_path == series
            assert ecephys[f"motion_{name}"].source_file_identifier == "two-probe-probes"
        rows = read_provenance(nwbfile)
    for series in PROBES:
        stages = [r["stage"] for r in rows if r["inputs"][0]["object"] == series]
        assert stages == ["preprocess", "peaks", "motion", "sorting"]
    assert {r["inputs"][0]["file"] for r in rows} == {"probes.nwb"}


def test_the_processed_file_is_lean_holds_no_host_path_and_the_input_is_unchanged(two_probes):
    out, folder = two_probes["out"], two_probes["folder"]
    assert sha256_of(two_probes["path"]) == two_probes["before"]
    with NWBHDF5IO(str(out), "r") as io:
        assert len(io.read().acquisition) == 0  # AP and LF bands stay in the raw file
    assert out.stat().st_size < 0.05 * two_probes["path"].stat().st_size
    strings = text_values(out)
    assert strings and not [s for s in strings if str(folder) in s or "/tmp/" in s or "/home/" in s]


def test_both_forms_of_the_processed_file_pass_the_three_validators(two_probes):
    params = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, write={"copy_raw": True})
    full, summary = _process(two_probes["path"], params, "full")  # the stages are cached: write-back only
    assert summary["dropped"] == []
    baseline = validate_file(two_probes["path"])
    for out in (two_probes["out"], full):
        report = validate_file(out)
        assert report.not_run == () and report.introduced_over(baseline) == (), (out.name, report.findings)
    with NWBHDF5IO(str(full), "r") as io:
        nwbfile = io.read()
        motion = nwbfile.processing["ecephys"]["motion_ElectricalSeriesAPImec1"]
        assert motion.source_electrical_series is nwbfile.acquisition["ElectricalSeriesAPImec1"]
    assert full.stat().st_size > 10 * two_probes["out"].stat().st_size


def test_a_failing_probe_fails_alone(prefect_server, tmp_path, capsys):
    from nwbflow import cli

    path, _ = write_two_probe_session(tmp_path / "broken.nwb", nan_in_probe=1)
    out = tmp_path / "broken_processed.nwb"
    code = cli.main(["run", str(path), "-o", str(out), "--device", "cpu", "--stages", "preprocess,peaks",
                     "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 5, err[-2000:]
    assert "ElectricalSeriesAPImec1" in err and "NaN" in err
    with NWBHDF5IO(str(out), "r") as io:
        rows = read_provenance(io.read())
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["inputs"][0]["object"] for r in failed] == [PROBES[1]] and "sample 100, channel 3" in failed[0]["error"]
    assert {r["inputs"][0]["object"] for r in rows if r["status"] == "completed"} == {PROBES[0]}
    assert "broken.nwb: " in failed[0]["error"]  # the error names the input by its name, not its host path
    assert not [s for s in text_values(out) if str(tmp_path) in s]


@pytest.fixture(scope="module")
def ophys(prefect_server, tmp_path_factory):
    """Each ophys layout processed with defaults: {layout: (output, summary)}."""
    folder = tmp_path_factory.mktemp("ophys")
    done = {}
    for layout in ("suite2p", "caiman", "optinist", "two_planes", "old_index"):
        path = write_ophys_session(folder / f"{layout}.nwb", layout)
        done[layout] = (path, *_process(path))
    return done


def _calcium_rows(out) -> list[dict]:
    with NWBHDF5IO(str(out), "r") as io:
        return [r for r in read_provenance(io.read()) if r["stage"] == "calcium"]


def test_suite2p_traces_are_chosen_with_their_neuropil(ophys):
    _, out, summary = ophys["suite2p"]
    (row,) = _calcium_rows(out)
    assert [i["object"] for i in row["inputs"]] == ["processing/ophys/Fluorescence/RoiResponseSeries",
                                                    "processing/ophys/Fluorescence/Neuropil"]
    assert row["parameters"]["roi_kind"] == "fluorescence"
    with NWBHDF5IO(str(out), "r") as io:
        rate = io.read().processing["ophys"]["Deconvolved"]["inferred_spike_rate"]
        assert rate.unit == "Hz" and rate.data.shape == (900, 5)


def test_caiman_traces_take_the_imaging_plane_rate(ophys):
    _, out, summary = ophys["caiman"]
    (row,) = _calcium_rows(out)
    assert row["inputs"][0]["object"] == "processing/ophys/Fluorescence/RoiResponseSeries"  # not the background
    assert any("imaging_rate" in note for note in row["parameters"]["notes"])
    assert summary["stages"][0]["summary"]["frame_rate_hz"] == FRAME_RATE_HZ
    with NWBHDF5IO(str(out), "r") as io:  # the result carries the rate used, not the source's 0
        assert io.read().processing["ophys"]["Deconvolved"]["inferred_spike_rate"].rate == FRAME_RATE_HZ


def test_traces_stored_rois_first_are_read_as_meant(ophys):
    """optinist stores (ROIs, frames): same traces as the CaImAn layout, so the very same spike rates."""
    _, out, summary = ophys["optinist"]
    _, caiman_out, _ = ophys["caiman"]
    with NWBHDF5IO(str(out), "r") as io, NWBHDF5IO(str(caiman_out), "r") as other:
        rate = io.read().processing["ophys"]["Deconvolved"]["inferred_spike_rate"]
        expected = other.read().processing["ophys"]["Deconvolved"]["inferred_spike_rate"].data[:]
        assert rate.data.shape == (900, 5) and rate.rate == FRAME_RATE_HZ
        np.testing.assert_array_equal(rate.data[:], expected)
    assert summary["stages"][0]["summary"]["frames"] == 900 and summary["stages"][0]["summary"]["rois"] == 5


def test_two_planes_are_each_processed(ophys):
    _, out, _ = ophys["two_planes"]
    with NWBHDF5IO(str(out), "r") as io:
        names = set(io.read().processing["ophys"]["Deconvolved"].roi_response_series)
    assert names == {"inferred_spike_rate_Fluorescence_plane0_RoiResponseSeries",
                     "inferred_spike_rate_Fluorescence_plane1_RoiResponseSeries"}


def test_the_inputs_own_schema_problem_is_reported_not_blocking(ophys):
    path, out, summary = ophys["old_index"]
    assert summary["input_findings"] and all("pixel_mask_index" in f for f in summary["input_findings"])
    assert validate_file(out, ("pynwb",)).introduced_over(validate_file(path, ("pynwb",))) == ()


def test_a_genuinely_ambiguous_segmentation_is_refused_listing_its_candidates(tmp_path):
    from nwbflow.tasks.plan import check_input

    path = write_ophys_session(tmp_path / "ambiguous.nwb", "ambiguous")
    with pytest.raises(BadInputError) as caught:
        check_input(path, PARAMS)
    message = caught.value.one_line()
    assert "processing/ophys/Fluorescence/Raw, processing/ophys/Fluorescence/RoiResponseSeries" in message
    assert "DfOverF" not in message  # raw fluorescence wins: the ΔF/F series is no candidate
    assert check_input(path, SessionParams(calcium={"roi_series": "processing/ophys/Fluorescence/Raw"}))[1] == [
        "processing/ophys/Fluorescence/Raw"]


def test_partial_results_error_carries_the_summary():
    error = PartialResultsError({"failed": [{"series": "acquisition/X", "stage": "plan", "error": "BadInputError: x"}],
                                 "output": "out.nwb"})
    assert "acquisition/X (plan: BadInputError: x)" in str(error) and "out.nwb" in str(error)
