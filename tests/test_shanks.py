"""Multi-shank probes: shanks read from the electrodes table, motion fitted and corrected per shank, and no
template or unit's electrodes spanning two shanks (a 4-shank Neuropixels 2.0-like synthetic session)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION
from nwb_writers import add_series, edit_h5, ephys_traces, make_nwbfile, write
from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.motion import Motion, ShankMotion
from nwbflow.ephys.motion.correction import MotionCorrectedSource
from nwbflow.ephys.shanks import SHANK_CLEARANCE_UM, separate_shanks
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.nwb_io.read import open_session
from nwbflow.params import MotionParams, SessionParams, SortingParams
from nwbflow.synth import SynthConfig, write_synthetic_session

CONFIG = SynthConfig(duration_s=10.0, num_channels=64, num_units=12, shanks=4, drift=True, ophys=False)


def _two_group_file(path, *, shank_column: bool):
    nwbfile = make_nwbfile()
    device = nwbfile.create_device(name="probe", description="two-shank test probe")
    groups = [nwbfile.create_electrode_group(name=f"shank{k}", description="shank", location="CA1", device=device)
              for k in range(2)]
    if shank_column:
        nwbfile.add_electrode_column(name="shank_ids", description="shank")
    for row in range(8):
        extra = {"shank_ids": f"s{row // 4}"} if shank_column else {}
        nwbfile.add_electrode(group=groups[row // 4], location="CA1", rel_x=250.0 * (row // 4),
                              rel_y=20.0 * (row % 4), **extra)
    add_series(nwbfile, "ElectricalSeries", ephys_traces(num_channels=8), rate=30_000.0)
    return write(nwbfile, path)


def test_shanks_come_from_the_shank_column_else_the_groups(tmp_path):
    with open_session(_two_group_file(tmp_path / "column.nwb", shank_column=True)) as session:
        assert session.select_ephys().shank_ids.tolist() == ["s0"] * 4 + ["s1"] * 4
    path = _two_group_file(tmp_path / "groups.nwb", shank_column=False)
    with open_session(path) as session:
        assert session.select_ephys().shank_ids.tolist() == ["shank0"] * 4 + ["shank1"] * 4
    with edit_h5(path) as handle:  # an old writer without group_name: the group references' names
        del handle["general/extracellular_ephys/electrodes/group_name"]
    with open_session(path) as session:
        assert session.select_ephys().shank_ids.tolist() == ["shank0"] * 4 + ["shank1"] * 4


def test_one_group_is_one_shank(tmp_path):
    from nwb_writers import write_ephys_file

    with open_session(write_ephys_file(tmp_path / "one.nwb")) as session:
        assert session.select_ephys().shank_ids is None


def test_separated_shanks_keep_every_radius_on_one_shank():
    positions = np.array([[0.0, 0.0], [32.0, 15.0], [250.0, 0.0], [282.0, 15.0]])
    apart = separate_shanks(positions, ("0", "0", "1", "1"))
    np.testing.assert_array_equal(apart[:, 1], positions[:, 1])
    np.testing.assert_array_equal(apart[:2], positions[:2])
    assert apart[2, 0] - apart[1, 0] == SHANK_CLEARANCE_UM
    for radius in ("template_radius_um", "clustering_radius_um"):  # no radius allowed reaches across
        with pytest.raises(ValidationError):
            SortingParams(**{radius: SHANK_CLEARANCE_UM})


def test_each_shank_is_corrected_by_its_own_motion_from_its_own_channels():
    """Shank 0 moved 20 µm up, shank 1 not at all: shank 1 comes out unchanged, shank 0 reads 20 µm above."""
    rows = np.arange(16)
    positions = np.stack([250.0 * (rows // 8), 20.0 * (rows % 8)], axis=1)
    traces = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    up = Motion(np.array([0.5]), np.array([0.0]), np.array([[20.0]], np.float32))
    still = Motion(np.array([0.5]), np.array([0.0]), np.array([[0.0]], np.float32))
    motion = ShankMotion((up, still), rows // 8, ("a", "b"))
    params = MotionParams(correction_radius_um=1000.0, border="zeros")  # a radius that reaches the other shank
    out = MotionCorrectedSource(ArraySource(traces, 30000.0), positions, motion, params).get_traces(0, 50)
    np.testing.assert_allclose(out[:, 8:], traces[:, 8:], atol=1e-5)
    np.testing.assert_allclose(out[:, 0:7], traces[:, 1:8], atol=1e-2)  # channel c now reads channel c + 1
    assert np.all(out[:, 7] == 0.0)  # read above the probe's top: zeros


@pytest.fixture(scope="module")
def four_shanks(prefect_server, tmp_path_factory):
    from nwbflow.flows.session import process_session

    folder = tmp_path_factory.mktemp("shanks")
    raw, out = folder / "four.nwb", folder / "four_processed.nwb"
    write_synthetic_session(raw, CONFIG)
    params = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION,
                           stages=("preprocess", "peaks", "motion", "sorting"))
    summary = process_session(str(raw), str(out), params)
    return {"raw": raw, "out": out, "summary": summary}


def _stage(summary, name):
    return next(stage for stage in summary["stages"] if stage["stage"] == name)


def test_motion_is_estimated_per_shank(four_shanks):
    motion = _stage(four_shanks["summary"], "motion")
    assert motion["summary"]["shanks"] == 4
    with NWBHDF5IO(four_shanks["out"], "r") as io:
        nwbfile = io.read()
        estimates = sorted(name for name in nwbfile.processing["ecephys"].data_interfaces if name.startswith("motion"))
    assert estimates == [f"motion_shank{k}" for k in range(4)]


def test_no_template_or_units_electrodes_span_two_shanks(four_shanks):
    with open_session(four_shanks["raw"]) as session:
        shank_of = session.select_ephys().shank_ids
    sorting = _stage(four_shanks["summary"], "sorting")
    assert sorting["summary"]["units"] >= 6  # 12 units, 3 per shank
    templates = np.load(sorting["artifacts"]["templates"])
    for template in templates:
        on = np.flatnonzero(np.abs(template).max(axis=0) > 0)
        assert len(set(shank_of[on])) == 1
    with NWBHDF5IO(four_shanks["out"], "r") as io:
        units = io.read().units
        for index in range(len(units)):
            rows = units["electrodes"][index].index.to_numpy()
            assert len(set(shank_of[rows])) == 1


def test_the_shanks_are_named_in_provenance_and_the_record(four_shanks):
    with NWBHDF5IO(four_shanks["out"], "r") as io:
        rows = read_provenance(io.read())
    preprocess = next(row for row in rows if row["stage"] == "preprocess")
    assert "4 shanks" in json.dumps(preprocess)
    motion = next(row for row in rows if row["stage"] == "motion")
    assert sorted(motion["outputs"]) == [f"processing/ecephys/motion_shank{k}" for k in range(4)]
    record = json.loads(Path(_stage(four_shanks["summary"], "preprocess")["artifacts"]["recording"]).read_text())
    assert sorted(set(record["shank_ids"])) == ["0", "1", "2", "3"]


def test_a_shank_whose_peaks_cannot_be_fitted_is_left_uncorrected_not_the_probe(tmp_path):
    """A shank whose channels sit at one depth (its peaks too): zero motion for it, with a warning; the same
    peaks as a whole probe's still fail its stage."""
    from types import SimpleNamespace

    from nwbflow.errors import BadInputError
    from nwbflow.tasks.motion import _fit_and_save

    run = SimpleNamespace(directory=tmp_path, device="cpu", progress=lambda *args, **kwargs: None)
    spec = SimpleNamespace(nwb_path="x.nwb", policy=SimpleNamespace(seed=0))
    rng = np.random.default_rng(0)
    times, depths, amplitudes = np.sort(rng.uniform(0, 60, 500)), np.full(500, 40.0), rng.uniform(5, 50, 500)
    artifacts = {}
    motion, fit = _fit_and_save(run, spec, MotionParams(**FAST_MOTION), times, depths, amplitudes, "_shank3",
                                artifacts, "shank 3: ", one_of_many=True)
    assert fit is None and not motion.displacement_um.any()
    assert set(artifacts) == {"motion_shank3"}  # saved (zero), no figure
    with pytest.raises(BadInputError, match="same depth"):
        _fit_and_save(run, spec, MotionParams(**FAST_MOTION), times, depths, amplitudes, "", {}, "")
