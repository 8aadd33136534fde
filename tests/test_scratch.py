"""The preprocessed binary is deleted once a series' stages have run (the sorter read the motion-corrected one);
later runs reuse what is left and compute the preprocess stage again only when a stage must read its binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST_MOTION
from nwbflow.flows.session import process_session
from nwbflow.params import SessionParams

STAGES = ("preprocess", "peaks", "motion", "sorting")


def _run(session, out: Path, workdir: Path, **overrides) -> dict:
    params = SessionParams(execution={"device": "cpu", **overrides.pop("execution", {})}, motion=FAST_MOTION,
                           stages=STAGES, **overrides)
    summary = process_session(str(session), str(out), params, workdir=str(workdir))
    return {stage["stage"]: stage for stage in summary["stages"]}


@pytest.fixture(scope="module")
def first(prefect_server, small_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scratch")
    return folder, _run(small_session, folder / "a.nwb", folder / "work")


def test_the_preprocessed_binary_is_gone_and_the_corrected_one_kept(first):
    _, stages = first
    assert not Path(stages["preprocess"]["artifacts"]["preprocessed"]).exists()
    assert Path(stages["preprocess"]["artifacts"]["recording"]).is_file()  # the record and matrices stay
    assert Path(stages["motion"]["artifacts"]["corrected"]).is_file()


def test_resorting_reuses_the_stages_before_it(first, small_session):
    folder, stages = first
    again = _run(small_session, folder / "b.nwb", folder / "work", sorting={"match_threshold": 7.5})
    for stage in ("preprocess", "peaks", "motion"):  # the same stage directories, nothing computed again
        assert again[stage]["artifacts"] == stages[stage]["artifacts"]
    assert not Path(again["preprocess"]["artifacts"]["preprocessed"]).exists()  # not computed again
    assert again["sorting"]["artifacts"] != stages["sorting"]["artifacts"]


def test_a_stage_that_reads_the_deleted_binary_gets_it_computed_again(first, small_session):
    folder, _ = first
    again = _run(small_session, folder / "c.nwb", folder / "work", peaks={"threshold_mad": 6.0})
    assert again["peaks"]["summary"]["peaks"] > 0  # read the preprocessed binary, computed again for it
    assert not Path(again["preprocess"]["artifacts"]["preprocessed"]).exists()  # and deleted after the run


def test_keep_preprocessed_binary_keeps_it(prefect_server, small_session, tmp_path):
    stages = _run(small_session, tmp_path / "d.nwb", tmp_path / "work",
                  execution={"keep_preprocessed_binary": True})
    assert Path(stages["preprocess"]["artifacts"]["preprocessed"]).is_file()
