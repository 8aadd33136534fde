"""dandi-prep: every upload blocker found with its fix, ready files organized under dandi's names.

Broken files are built with pynwb (and raw h5py where pynwb refuses: naive datetimes); each must
produce the blocker dandi-cli 0.81 would stop the upload on, with our fix text. A complete
session (raw + processed) must come out ready, under the names `dandi organize` gives, and pass
`dandi validate`. Originals are checked bit for bit after every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO
from pynwb.file import Subject

from conftest import sha256_of
from nwb_writers import add_electrodes, add_series, ephys_traces, make_nwbfile, write
from nwbflow import cli
from nwbflow.dandi_prep.assets import prepare_asset
from nwbflow.dandi_prep.metadata import load_metadata
from nwbflow.dandi_prep.model import BLOCKED, READY
from nwbflow.dandi_prep.organize import pop_entry
from nwbflow.dandi_prep.plan import check_dirs, find_nwb_files, inspect_source, plan_assets
from nwbflow.errors import BadInputError
from nwbflow.flows.dandi import UploadBlockedError, dandi_prep
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.nwb_io.validate import ValidatorMissingError, require_dandi_validators
from nwbflow.nwb_io.results import SessionResults
from nwbflow.nwb_io.write import write_processed
from nwbflow.synth import SynthConfig, write_synthetic_session

DANDI = str(Path(sys.executable).with_name("dandi"))
DANDISET_YAML = "identifier: DANDI:000000\nname: nwbflow test\ndescription: dandi-prep test Dandiset\n"


def _record() -> ProvenanceRecord:
    return ProvenanceRecord(stage="peaks", parameters=json.dumps({"threshold_mad": 5.0}),
                            inputs=({"file": "raw.nwb", "object": "acquisition/ElectricalSeries",
                                     "sha256": "sha256:abc"},),
                            outputs=("work/peaks.parquet",), start_time_utc="2026-01-01T00:00:00+00:00",
                            end_time_utc="2026-01-01T00:00:01+00:00", host="test", device="cpu")


def _processed(raw: Path, out: Path) -> Path:
    return write_processed(raw, out, SessionResults((_record(),))).path


def _session_file(path: Path, *, subject: Subject | None, identifier: str, session_id: str = "s1") -> Path:
    """A small ephys file (float32 volts, 4 channels) with the given Subject."""
    nwbfile = make_nwbfile(subject=False, identifier=identifier)
    nwbfile.fields["session_id"] = session_id
    if subject is not None:
        nwbfile.subject = subject
    add_electrodes(nwbfile, 4)
    add_series(nwbfile, "ElectricalSeries", ephys_traces(600, 4, dtype=np.float32), rate=30_000.0)
    return write(nwbfile, path)


def _strip_timezones(path: Path) -> None:
    """Rewrite the file's datetimes without UTC offset, as old or careless writers do."""
    with h5py.File(path, "r+") as h5:
        for name in ("session_start_time", "timestamps_reference_time"):
            naive = h5[name][()].decode()[:19]
            del h5[name]
            h5.create_dataset(name, data=naive, dtype=h5py.string_dtype("ascii"))
        dates = [d.decode()[:19] for d in h5["file_create_date"][()]]
        del h5["file_create_date"]
        h5.create_dataset("file_create_date", data=dates, dtype=h5py.string_dtype("ascii"))


def _subject(**changes) -> Subject:
    fields = {"subject_id": "m1", "species": "Mus musculus", "sex": "M", "age": "P90D"} | changes
    return Subject(**{k: v for k, v in fields.items() if v is not None})


def _prepare(root: Path, out: Path, metadata: Path | None = None, files_mode: str = "hardlink",
             record: dict | None = None):
    """The flow's steps without Prefect: inspect, plan, prepare; returns results by relative path.

    ``record`` (DANDI path -> entry, as the flow keeps it in placed.json) is read and updated in place.
    """
    record = {} if record is None else record
    inspections = [inspect_source(p, root) for p in find_nwb_files(root, out)]
    plans, _notes = plan_assets(inspections, load_metadata(metadata))
    results = {}
    for plan in plans:
        earlier = pop_entry(record, plan.target, plan.inspection.source)
        result, entry = prepare_asset(plan, out, files_mode, earlier)
        results[result.relative] = result
        if entry is not None:
            record[plan.target] = entry
    return results


@pytest.fixture(scope="module")
def complete_root(tmp_path_factory) -> Path:
    """One synthetic session (ephys + ophys, 1 s) and its nwbflow-processed file."""
    root = tmp_path_factory.mktemp("complete-root")
    (root / "m1").mkdir()
    write_synthetic_session(root / "m1" / "session.nwb", SynthConfig(duration_s=1.0, num_channels=4, num_units=2,
                                                                     num_rois=2, fov_px=16, seed=3))
    _processed(root / "m1" / "session.nwb", root / "m1" / "session_processed.nwb")
    return root


BROKEN = {  # case: (subject or None, expected check, text the fix must contain)
    "no_subject": (None, "NWBI.check_subject_exists", "add a Subject with subject_id, species, sex"),
    "age_90_days": (_subject(age="90 days"), "NWBI.check_subject_age",
                    "set Subject.age to an ISO 8601 duration: 'P90D', not '90 days'"),
    "missing_species": (_subject(species=None), "NWBI.check_subject_species_exists",
                        "set Subject.species, e.g. 'Mus musculus'"),
    "sex_spelled_out": (_subject(sex="male"), "NWBI.check_subject_sex", "set Subject.sex to one of M, F, U"),
    "naive_start_time": (_subject(), "pynwb.Error", "give NWBFile.session_start_time a UTC offset"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_metadata_gives_the_blocker_and_its_fix(case, tmp_path):
    subject, check, fix = BROKEN[case]
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    path = _session_file(root / "raw.nwb", subject=subject, identifier=f"id-{case}")
    if case == "naive_start_time":
        _strip_timezones(path)
    before = sha256_of(path)
    result = _prepare(root, out)["raw.nwb"]
    assert result.status == BLOCKED
    matching = [b for b in result.blockers if b.check == check]
    assert matching, [b.as_dict() for b in result.blockers]
    assert fix in matching[0].fix
    assert "raw files are never changed" in matching[0].fix  # a raw file: the fix is at its source
    if case == "naive_start_time":
        assert {b.location for b in matching} >= {"session_start_time", "timestamps_reference_time"}
    assert not list(out.rglob("*.nwb")), "a blocked file must not be organized"
    assert sha256_of(path) == before


def test_duplicate_identifiers_block_both_files_naming_each_other(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _session_file(root / "a" / "raw.nwb", subject=_subject(), identifier="same-id", session_id="s1")
    _session_file(root / "b" / "raw.nwb", subject=_subject(), identifier="same-id", session_id="s2")
    results = _prepare(root, out)
    for this, other in (("a/raw.nwb", "b/raw.nwb"), ("b/raw.nwb", "a/raw.nwb")):
        [blocker] = results[this].blockers
        assert blocker.check == "nwbflow.duplicate_identifier"
        assert other in blocker.message and "'same-id'" in blocker.message
        assert "its own NWBFile.identifier" in blocker.fix
    assert not list(out.rglob("*.nwb"))


def test_complete_session_is_ready_organized_and_passes_dandi_validate(prefect_server, complete_root, tmp_path):
    out = tmp_path / "dandiset"
    out.mkdir()
    (out / "dandiset.yaml").write_text(DANDISET_YAML)  # what `dandi download` leaves
    originals = {p: sha256_of(p) for p in complete_root.rglob("*.nwb")}
    assert cli.main(["dandi-prep", str(complete_root), "--out", str(out)]) == cli.EXIT_OK

    report = json.loads((out / ".nwbflow-dandi-prep" / "report.json").read_text())
    assets = {a["relative"]: a for a in report["assets"]}
    assert report["summary"] == {"ready": 2, "blocked": 0} and report["notes"] == []
    raw, processed = assets["m1/session.nwb"], assets["m1/session_processed.nwb"]
    with h5py.File(complete_root / "m1" / "session.nwb", "r") as h5:
        session_id = h5["general/session_id"][()].decode()
    stem = f"sub-synth-mouse-3/sub-synth-mouse-3_ses-{session_id}"
    assert raw["target"] == f"{stem}_ecephys+ophys.nwb"
    assert processed["target"] == f"{stem}_desc-processed_ecephys+ophys.nwb"
    assert raw["object_id"] != processed["object_id"] and raw["identifier"] != processed["identifier"]
    for asset in (raw, processed):
        assert asset["status"] == READY and asset["blockers"] == [] and asset["placed"] == "hardlink"
        assert (out / asset["target"]).samefile(asset["source"])
    assert {p: sha256_of(p) for p in originals} == originals

    done = subprocess.run([DANDI, "validate", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DANDI_CACHE": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _table_artifact_rows(out) == 2


def _table_artifact_rows(out: Path) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from nwbflow.tasks.report import artifact_key

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key("dandi-prep", str(out))])), limit=1)
    data = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    return len(data)


def test_names_are_those_dandi_organize_gives(complete_root, tmp_path):
    """dandi organize itself (session_id required) vs ours: same names, `_desc-processed` for its `_obj-`."""
    from dandi.organize import FileOperationMode, organize

    ours = _prepare(complete_root, tmp_path / "ours")
    theirs_dir = tmp_path / "theirs"
    organize([str(complete_root)], str(theirs_dir), files_mode=FileOperationMode.HARDLINK,
             required_fields=["session_id"], jobs=1)
    theirs = {}
    for placed in theirs_dir.rglob("*.nwb"):
        source = next(p for p in complete_root.rglob("*.nwb") if placed.samefile(p))
        theirs[source.relative_to(complete_root).as_posix()] = placed.relative_to(theirs_dir).as_posix()
    assert set(theirs) == set(ours) == {"m1/session.nwb", "m1/session_processed.nwb"}
    for relative, result in ours.items():
        # dandi tells raw and processed apart by `_obj-<crc32 of object id>` on both; we by desc.
        assert re.fullmatch(r".*_obj-[0-9a-z]+_.*", theirs[relative])
        expected = re.sub(r"_obj-[0-9a-z]+", "_desc-processed" if "processed" in relative else "",
                          theirs[relative])
        assert result.target == expected


def test_meta_yaml_fills_the_processed_copy_only(prefect_server, tmp_path):
    """Age and the clock's UTC offset supplied in meta.yaml: the processed copy gets them, raw does not."""
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    raw = _session_file(root / "raw.nwb", subject=_subject(age=None), identifier="raw-1")
    processed = _processed(raw, root / "raw_processed.nwb")
    _strip_timezones(raw)
    _strip_timezones(processed)
    meta = tmp_path / "meta.yaml"
    meta.write_text("subjects:\n  m1: {age: P90D}\nsessions:\n  s1: {utc_offset: '-05:00'}\n")
    originals = {p: sha256_of(p) for p in (raw, processed)}

    with pytest.raises(UploadBlockedError) as blocked:
        dandi_prep(str(root), str(out), str(meta))
    report = json.loads(Path(blocked.value.report_path).read_text())
    assets = {a["relative"]: a for a in report["assets"]}
    done, kept = assets["raw_processed.nwb"], assets["raw.nwb"]
    assert done["status"] == READY and done["placed"] == "patched copy"
    assert done["applied_metadata"] == {"Subject.age": "P90D", "UTC offset of naive datetimes": "-05:00"}
    target = out / done["target"]
    assert not target.samefile(processed)
    with h5py.File(target, "r") as h5:
        assert h5["general/subject/age"][()].decode() == "P90D"
        assert h5["session_start_time"][()].decode() == "2024-01-02T03:04:05-05:00"
    assert kept["status"] == BLOCKED and kept["placed"] == "" and kept["applied_metadata"] == {}
    assert {b["check"] for b in kept["blockers"]} == {"NWBI.check_subject_age", "pynwb.Error"}
    assert any("raw files are never changed" in note for note in kept["notes"])
    markdown = (out / ".nwbflow-dandi-prep" / "report.md").read_text()
    assert "written into this processed copy only" in markdown and "set Subject.age, e.g. P90D" in markdown
    assert {p: sha256_of(p) for p in originals} == originals

    with pytest.raises(UploadBlockedError) as second:  # a second run checks its copy instead of rewriting it
        dandi_prep(str(root), str(out), str(meta))
    again = json.loads(Path(second.value.report_path).read_text())
    assert {a["relative"]: a["placed"] for a in again["assets"]}["raw_processed.nwb"] == "unchanged (patched copy)"
    assert list((out / ".nwbflow-dandi-prep" / "staging").iterdir()) == []


def test_cli_exits_3_with_the_fixes_when_a_file_is_blocked(prefect_server, tmp_path, capsys):
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    _session_file(root / "raw.nwb", subject=_subject(age="90 days"), identifier="cli-1")
    assert cli.main(["dandi-prep", str(root), "--out", str(out)]) == cli.EXIT_BLOCKED
    captured = capsys.readouterr()
    assert "raw.nwb" in captured.out and "blocked" in captured.out and "'P90D', not '90 days'" in captured.out
    assert "would be refused by `dandi upload`" in captured.err
    assert "no dandiset.yaml" in captured.out


@pytest.mark.parametrize("case", ["missing_root", "bad_age", "unquoted_offset", "unknown_key"])
def test_bad_input_exits_2_before_prefect_with_one_line(case, complete_root, tmp_path, capsys):
    meta = tmp_path / "meta.yaml"
    root = str(tmp_path / "nope") if case == "missing_root" else str(complete_root)
    meta.write_text({"missing_root": "{}", "bad_age": "subjects:\n  m1: {age: 90 days}\n",
                     "unquoted_offset": "sessions:\n  s1: {utc_offset: +1:00}\n",
                     "unknown_key": "subjects:\n  m1: {agee: P90D}\n"}[case])
    assert cli.main(["dandi-prep", root, "--out", str(tmp_path / "out"), "--metadata", str(meta)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    expected = {"missing_root": "data root is not a directory", "bad_age": "subjects.m1.age",
                "unquoted_offset": "sessions.s1.utc_offset", "unknown_key": "subjects.m1.agee"}[case]
    assert line.startswith("nwbflow: bad input:") and expected in line
    assert not (tmp_path / "out").exists()


def test_without_dandi_the_message_says_what_to_install(monkeypatch, complete_root, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "dandi", None)  # import dandi -> ImportError
    with pytest.raises(ValidatorMissingError, match=re.escape("pip install 'nwbflow[validate]'")):
        require_dandi_validators()
    assert cli.main(["dandi-prep", str(complete_root), "--out", str(tmp_path / "out")]) == cli.EXIT_FAILURE
    assert "DANDI checks need dandi" in capsys.readouterr().err


def test_refused_hard_link_falls_back_to_a_copy(monkeypatch, complete_root, tmp_path):
    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "link", refuse)
    results = _prepare(complete_root, tmp_path / "out")
    for result in results.values():
        target = tmp_path / "out" / result.target
        assert result.placed == "copy" and not target.samefile(result.source)
        assert sha256_of(target) == sha256_of(result.source)


def test_meta_yaml_values_are_checked_like_dandi_checks_the_file(tmp_path):
    meta = tmp_path / "meta.yaml"
    meta.write_text("subjects:\n  m1: {age: P90D, sex: F, species: Mus musculus, "
                    "date_of_birth: '2023-10-01T00:00:00+00:00'}\n")
    assert load_metadata(meta).subjects["m1"].given()["date_of_birth"] == "2023-10-01T00:00:00+00:00"
    for bad, field in (("{sex: female}", "sex"), ("{species: mouse}", "species"),
                       ("{date_of_birth: '2023-10-01T00:00:00'}", "date_of_birth")):
        meta.write_text(f"subjects:\n  m1: {bad}\n")
        with pytest.raises(BadInputError, match=f"subjects.m1.{field}"):
            load_metadata(meta)


def test_out_dir_must_not_be_or_hold_the_data_root(complete_root):
    for out in (complete_root, complete_root.parent):
        with pytest.raises(BadInputError, match="is ROOT or contains it"):
            check_dirs(complete_root, out)


def test_meta_yaml_gives_a_processed_file_without_subject_a_whole_subject(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    raw = _session_file(root / "raw.nwb", subject=None, identifier="raw-2")
    processed = _processed(raw, root / "raw_processed.nwb")
    meta = tmp_path / "meta.yaml"
    meta.write_text("sessions:\n  s1: {subject_id: mouse-7}\n"
                    "subjects:\n  mouse-7: {species: Mus musculus, sex: F, age: P60D, strain: C57BL/6J}\n")
    before = sha256_of(processed)
    results = _prepare(root, out, meta)
    done, kept = results["raw_processed.nwb"], results["raw.nwb"]
    assert done.status == READY, [b.as_dict() for b in done.blockers]
    assert done.target == "sub-mouse-7/sub-mouse-7_ses-s1_desc-processed_ecephys.nwb"
    assert done.applied == {"Subject.subject_id": "mouse-7", "Subject.species": "Mus musculus",
                            "Subject.sex": "F", "Subject.age": "P60D", "Subject.strain": "C57BL/6J"}
    with NWBHDF5IO(str(out / done.target), "r") as io:  # pynwb reads the Subject we created
        subject = io.read().subject
        assert (subject.subject_id, subject.sex, subject.age, subject.strain) == ("mouse-7", "F", "P60D",
                                                                                  "C57BL/6J")
    assert kept.status == BLOCKED and [b.check for b in kept.blockers] == ["NWBI.check_subject_exists"]
    assert kept.target == "" and "sessions.<session_id>" not in kept.blockers[0].fix
    assert sha256_of(processed) == before


def test_a_file_not_put_there_by_dandi_prep_is_never_replaced(complete_root, tmp_path):
    out = tmp_path / "out"
    first = _prepare(complete_root, out)
    target = out / first["m1/session.nwb"].target
    target.unlink()
    target.write_bytes(b"someone else's file")
    again = _prepare(complete_root, out)["m1/session.nwb"]
    assert again.status == BLOCKED and [b.check for b in again.blockers] == ["nwbflow.target_occupied"]
    assert target.read_bytes() == b"someone else's file"


def test_an_asset_blocked_later_is_taken_out_and_a_replaced_source_relinked(complete_root, tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    shutil.copytree(complete_root, root)
    record: dict = {}
    first = _prepare(root, out, record=record)
    raw_target = out / first["m1/session.nwb"].target
    processed_target = out / first["m1/session_processed.nwb"].target
    assert raw_target.samefile(root / "m1" / "session.nwb") and processed_target.is_file()

    # The processed file is written again (a new inode, as nightly re-processing does): it is re-linked.
    source = root / "m1" / "session_processed.nwb"
    shutil.copy2(source, tmp_path / "new.nwb")
    os.replace(tmp_path / "new.nwb", source)
    assert not processed_target.samefile(source)
    # ... and a copy of the raw file appears under ROOT: both copies are blocked, the placed one taken out.
    shutil.copy2(root / "m1" / "session.nwb", root / "session_copy.nwb")
    second = _prepare(root, out, record=record)
    assert second["m1/session_processed.nwb"].placed == "hardlink" and processed_target.samefile(source)
    assert second["m1/session.nwb"].status == BLOCKED and not raw_target.exists()
    assert (root / "m1" / "session.nwb").is_file()
