"""The nightly flow: new sessions processed once, unchanged ones skipped, changed ones redone."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from conftest import FAST_MOTION, output_locked_by_another_thread, sha256_of
from nwbflow.errors import NwbflowError
from nwbflow.flows import nightly as nightly_module
from nwbflow.flows.nightly import LEDGER, nightly, read_ledger, record_in_ledger
from nwbflow.params import SessionParams
from nwbflow.synth import SynthConfig, write_synthetic_session

PARAMS = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION)
CHEAP = SessionParams(execution={"device": "cpu"}, stages=("preprocess", "peaks"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly-root")
    for index, subject in enumerate(("m1", "m2", "m3")):
        (root / subject).mkdir()
        write_synthetic_session(root / subject / "session.nwb",
                                SynthConfig(duration_s=3.0, num_channels=16, num_units=4, ophys=False, seed=index))
    return root


def _hashes(root):
    return {p: sha256_of(p) for p in sorted(root.glob("m*/*.nwb"))}


def test_first_run_processes_all_then_none(prefect_server, data_root):
    before = _hashes(data_root)
    first = nightly(str(data_root), params=PARAMS)
    assert sorted(first["processed"]) == ["m1/session.nwb", "m2/session.nwb", "m3/session.nwb"]
    assert first["failed"] == []
    assert all((data_root / "processed" / s).with_name("session_processed.nwb").is_file() for s in ("m1/x", "m2/x"))
    assert (data_root / "processed" / LEDGER).is_file()
    second = nightly(str(data_root), params=PARAMS)
    assert second["processed"] == [] and len(second["skipped"]) == 3
    assert _hashes(data_root) == before


def test_touched_session_or_session_parameter_change_reprocesses_exactly_one(prefect_server, data_root):
    nightly(str(data_root), params=PARAMS)  # settle (no-op when the test above ran)
    session = data_root / "m2" / "session.nwb"
    stat = session.stat()
    os.utime(session, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert nightly(str(data_root), params=PARAMS)["processed"] == ["m2/session.nwb"]
    (data_root / "m3" / "session.nwbflow.yaml").write_text("peaks:\n  threshold_mad: 6.0\n")
    assert nightly(str(data_root), params=PARAMS)["processed"] == ["m3/session.nwb"]
    assert nightly(str(data_root), params=PARAMS)["processed"] == []


def test_deleted_output_is_redone_and_code_params_change_redoes_all(prefect_server, data_root):
    nightly(str(data_root), params=PARAMS)
    (data_root / "processed" / "m1" / "session_processed.nwb").unlink()
    assert nightly(str(data_root), params=PARAMS)["processed"] == ["m1/session.nwb"]
    changed = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, peaks={"exclusion_radius_um": 40.0})  # m3 overrides only the threshold
    assert len(nightly(str(data_root), params=changed)["processed"]) == 3


def test_a_broken_session_fails_alone_and_the_run_says_so(prefect_server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    write_synthetic_session(root / "good.nwb", SynthConfig(duration_s=2.0, num_channels=16, num_units=3,
                                                           ophys=False, seed=5))
    (root / "broken.nwb").write_text("not an HDF5 file")
    shutil.copy(root / "good.nwb", root / ".hidden.nwb")
    state = nightly(str(root), params=PARAMS, return_state=True)
    assert state.is_failed()
    with pytest.raises(NwbflowError, match="broken.nwb"):
        state.result()
    assert (root / "processed" / "good_processed.nwb").is_file()
    assert not (root / "processed" / ".hidden_processed.nwb").exists()


def test_session_override_does_not_mask_a_global_change_of_another_parameter(prefect_server, tmp_path):
    """An override of one parameter keeps that value while a changed global parameter still applies."""
    from nwbflow.flows.nightly import session_params

    nwb = tmp_path / "s.nwb"
    nwb.write_bytes(b"")
    (tmp_path / "s.nwbflow.yaml").write_text("peaks:\n  threshold_mad: 6.0\n")
    merged = session_params(nwb, SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, peaks={"threshold_mad": 5.5, "sweep_ms": 0.2}))
    assert (merged.peaks.threshold_mad, merged.peaks.sweep_ms, merged.execution.device) == (6.0, 0.2, "cpu")


def test_invalid_session_override_names_the_file(tmp_path):
    from nwbflow.errors import BadInputError
    from nwbflow.flows.nightly import session_params

    nwb = tmp_path / "s.nwb"
    nwb.write_bytes(b"")
    (tmp_path / "s.nwbflow.yaml").write_text("peaks:\n  threshold_mad: -1\n")
    with pytest.raises(BadInputError, match="s.nwbflow.yaml"):
        session_params(nwb, PARAMS)


@pytest.fixture
def two_sessions(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for index, name in enumerate(("a", "b")):
        write_synthetic_session(root / f"{name}.nwb", SynthConfig(duration_s=2.0, num_channels=8, num_units=3,
                                                                  ophys=False, seed=20 + index))
    return root


def test_a_session_another_run_holds_is_left_to_it_not_failed(prefect_server, two_sessions):
    """A session whose output another run is writing is reported busy; the next run does it, once."""
    out_dir = two_sessions / "processed"
    out_dir.mkdir()
    with output_locked_by_another_thread(out_dir / "b_processed.nwb"):
        state = nightly(str(two_sessions), params=CHEAP, return_state=True)
    assert state.is_completed()
    first = state.result()
    assert (first["processed"], first["busy"], first["failed"]) == (["a.nwb"], ["b.nwb"], [])
    assert sorted(read_ledger(out_dir)) == ["a.nwb"] and not (out_dir / "b_processed.nwb").exists()
    second = nightly(str(two_sessions), params=CHEAP)
    assert (second["processed"], second["skipped"], second["busy"]) == (["b.nwb"], ["a.nwb"], [])


def test_a_session_finished_by_another_run_meanwhile_is_not_redone(prefect_server, two_sessions, monkeypatch):
    """The ledger is read again once the session is claimed: a run that finished it since the first look wins."""
    nightly(str(two_sessions), params=CHEAP)
    looks = []
    real_up_to_date = nightly_module._up_to_date

    def first_look_before_the_other_run_recorded(*args):
        looks.append(args[1])
        return False if looks.count(args[1]) == 1 else real_up_to_date(*args)

    def process_session(*_args, **_kwargs):
        raise AssertionError("processed a session another run had recorded")

    monkeypatch.setattr(nightly_module, "_up_to_date", first_look_before_the_other_run_recorded)
    monkeypatch.setattr(nightly_module, "process_session", process_session)
    outcome = nightly(str(two_sessions), params=CHEAP)
    assert (outcome["processed"], outcome["skipped"]) == ([], ["a.nwb", "b.nwb"])
    assert looks == ["a.nwb", "a.nwb", "b.nwb", "b.nwb"]


def test_ledger_updates_from_concurrent_runs_are_all_kept(tmp_path):
    """Read-modify-write under the ledger's lock: no run's entry is lost to another's write."""

    def one_run(name: str) -> None:
        for index in range(25):
            record_in_ledger(tmp_path, f"{name}/{index}.nwb", {"key": name})

    threads = [threading.Thread(target=one_run, args=(name,)) for name in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    ledger = read_ledger(tmp_path)
    assert len(ledger) == 100 and {entry["key"] for entry in ledger.values()} == set("abcd")


def test_a_partial_session_is_reported_once_then_left_until_it_changes(prefect_server, tmp_path):
    """One probe of two fails: the session is written with the other, reported failed that night, and not
    retried on the same data every night after (it would fail the same way)."""
    from lab_writers import write_two_probe_session

    write_two_probe_session(tmp_path / "probes.nwb", nan_in_probe=1)
    with pytest.raises(NwbflowError, match="1 session"):
        nightly(str(tmp_path), params=CHEAP)
    entry = read_ledger(tmp_path / "processed")["probes.nwb"]
    assert entry["partial"] == ["acquisition/ElectricalSeriesAPImec1"]
    assert (tmp_path / "processed" / "probes_processed.nwb").is_file()
    again = nightly(str(tmp_path), params=CHEAP)
    assert (again["skipped"], again["failed"]) == (["probes.nwb"], [])
