"""Faults during a run: SIGKILL in every stage then a re-run, a full disk at write-back, a read-only input folder.

In each case the input file is byte-for-byte unchanged and no partial output is
left; a killed run resumed to the end gives the same processed file as an
uninterrupted run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from prefect.settings import PREFECT_API_URL
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION, sha256_of
from nwbflow.errors import OutputWriteError
from nwbflow.flows.session import process_session
from nwbflow.nwb_io import layout
from nwbflow.params import PeakParams, SessionParams

PARAMS = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, peaks=PeakParams(write_to_nwb=True))
STAGES = ("preprocess", "peaks", "motion", "sorting", "calcium")

#: Runs the flow in a child that SIGKILLs itself inside one stage: at the stage's first progress report
#: (some of its work done, its artifacts not yet complete), or, for write-back, once the processed file
#: is exported under its temporary name but before the rename.
KILLED_RUNNER = textwrap.dedent("""
    import os, signal, sys
    from nwbflow.flows.session import process_session
    from nwbflow.nwb_io import write
    from nwbflow.params import SessionParams
    from nwbflow.tasks.progress import StageProgress

    nwb_path, out_path, workdir, params_json, kill_in = sys.argv[1:6]

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_in == "write-back":
        write._validate = die
    else:
        report = StageProgress.__call__
        def report_or_die(self, done, total=None):
            if self.stage == kill_in and done > 0:
                die()
            return report(self, done, total)
        StageProgress.__call__ = report_or_die
    process_session(nwb_path, out_path, SessionParams.model_validate_json(params_json), workdir)
""")


def _run_killed(session: Path, out: Path, workdir: Path, kill_in: str) -> int:
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())  # the test session's server
    child = subprocess.run([sys.executable, "-c", KILLED_RUNNER, str(session), str(out), str(workdir),
                            PARAMS.model_dump_json(), kill_in],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert child.returncode == -signal.SIGKILL, (kill_in, child.returncode, child.stderr.decode()[-3000:])
    return child.returncode


def _done_markers(workdir: Path) -> dict[str, int]:
    """Finished stages in the work directory: stage name -> mtime (ns) of its marker."""
    return {marker.parent.name.rsplit("-", 1)[0]: marker.stat().st_mtime_ns
            for marker in workdir.glob("*/*/done.json")}


def _results(path: Path) -> dict[str, np.ndarray]:
    """Every science result of a processed file, as arrays."""
    with NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        ecephys = nwbfile.processing[layout.ECEPHYS_MODULE]
        peaks = ecephys[layout.PEAKS]
        units = nwbfile.units
        rate = nwbfile.processing[layout.OPHYS_MODULE][layout.DECONVOLVED][layout.SPIKE_RATE]
        return {"peak_times": peaks["timestamp"][:], "peak_y": peaks["y_um"][:],
                "motion": ecephys[layout.MOTION].displacement[:],
                "unit_spike_counts": np.array([len(units["spike_times"][i]) for i in range(len(units))]),
                "spike_times": np.concatenate([units["spike_times"][i] for i in range(len(units))]),
                "waveforms": units["waveform_mean"][:], "spike_rate": rate.data[:]}


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, small_session, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    return Path(process_session(str(small_session), str(folder / "out.nwb"), PARAMS, str(folder / "work"))["output"])


def test_sigkill_in_every_stage_then_rerun_gives_the_uninterrupted_output(prefect_server, small_session,
                                                                          uninterrupted, tmp_path):
    """One work directory; each run is killed one stage further on and resumes the one before."""
    before = sha256_of(small_session)
    out, workdir = tmp_path / "out.nwb", tmp_path / "work"
    finished: dict[str, int] = {}
    for position, stage in enumerate((*STAGES, "write-back")):
        _run_killed(small_session, out, workdir, stage)
        markers = _done_markers(workdir)
        assert set(markers) == set(STAGES[:position]), f"killed in {stage}: finished stages {sorted(markers)}"
        assert {s: markers[s] for s in finished} == finished, "a finished stage was recomputed"
        assert not out.exists(), f"an output appeared after a kill in {stage}"
        assert sha256_of(small_session) == before, f"the input changed after a kill in {stage}"
        finished = markers
    assert list(tmp_path.glob(".out.nwb.*.partial.nwb")), "the write-back kill should leave its temporary"
    summary = process_session(str(small_session), str(out), PARAMS, str(workdir))
    assert _done_markers(workdir) == finished, "the resumed run recomputed a finished stage"
    assert not list(tmp_path.glob(".out.nwb.*.partial*")), "the killed writer's temporary was not cleaned up"
    assert sha256_of(small_session) == before
    resumed, reference = _results(Path(summary["output"])), _results(uninterrupted)
    for name, values in reference.items():
        # Same code, same data, same thread count: the same numbers; 1e-6 leaves room for float reductions.
        np.testing.assert_allclose(resumed[name], values, rtol=1e-6, atol=1e-6, err_msg=name)


#: The write-back of a session whose stages are all cached, in a child whose files may not exceed a size
#: limit (RLIMIT_FSIZE): the kernel refuses the write past it (EFBIG), as a full disk refuses with ENOSPC.
LIMITED_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from nwbflow.flows.session import process_session
    from nwbflow.params import SessionParams
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with an error instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[5]), int(sys.argv[5])))
    process_session(sys.argv[1], sys.argv[2], SessionParams.model_validate_json(sys.argv[4]), sys.argv[3])
""")


def test_disk_full_during_write_back_is_a_clear_error_and_leaves_nothing(prefect_server, small_session,
                                                                         uninterrupted, tmp_path):
    before = sha256_of(small_session)
    out, workdir = tmp_path / "out.nwb", uninterrupted.parent / "work"  # every stage cached there
    limit = uninterrupted.stat().st_size // 3
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    child = subprocess.run([sys.executable, "-c", LIMITED_WRITER, str(small_session), str(out), str(workdir),
                            PARAMS.model_dump_json(), str(limit)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 1, child.stderr[-3000:]
    assert OutputWriteError.__name__ in child.stderr and "nothing was written there" in child.stderr, \
        child.stderr[-3000:]
    assert str(out) in child.stderr
    assert _left_in(tmp_path) == [], "the failed write left files behind"
    assert sha256_of(small_session) == before
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


def test_too_little_free_space_is_refused_before_writing(prefect_server, small_session, uninterrupted, tmp_path,
                                                        monkeypatch):
    """A disk with less room than the input plus the results: refused before a byte is written."""
    from nwbflow.nwb_io import write

    monkeypatch.setattr(write.shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    before = sha256_of(small_session)
    with pytest.raises(OutputWriteError, match="not enough free space .* 1 MiB free") as excinfo:
        process_session(str(small_session), str(tmp_path / "out.nwb"), PARAMS, str(uninterrupted.parent / "work"))
    assert str(tmp_path / "out.nwb") in str(excinfo.value)
    assert _left_in(tmp_path) == []
    assert sha256_of(small_session) == before


def _left_in(folder: Path) -> list[str]:
    """What a run left in the output's folder, hidden files (temporaries, the output's lock) included."""
    return sorted(p.name for p in folder.iterdir())


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of a folder, hidden ones included: name -> (size, mtime ns), plus the folder's own mtime."""
    entries = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}
    entries["."] = (0, folder.stat().st_mtime_ns)
    return entries


def test_read_only_input_folder_processes_and_nothing_is_written_there(prefect_server, small_session,
                                                                        uninterrupted, tmp_path):
    """The input's folder is made read-only; as root (where modes are not enforced) the snapshot still proves
    that nothing (no lock, no work file, no HDF5 side file) was created or touched there."""
    inputs = tmp_path / "raw"
    inputs.mkdir()
    session = inputs / "session.nwb"
    session.write_bytes(small_session.read_bytes())
    session.chmod(0o444)
    inputs.chmod(0o555)
    try:
        before, sha = _snapshot(inputs), sha256_of(session)
        out = tmp_path / "out" / "session_processed.nwb"
        out.parent.mkdir()
        process_session(str(session), str(out), PARAMS, str(uninterrupted.parent / "work"))
        assert _snapshot(inputs) == before
        assert sha256_of(session) == sha
        assert out.is_file()
    finally:
        inputs.chmod(0o755)


NOT_WRITABLE_CHECK = textwrap.dedent("""
    import os, sys
    from nwbflow.errors import BadInputError
    from nwbflow.nwb_io.write import check_target
    if os.geteuid() == 0:
        os.setuid(65534)  # root writes anywhere: check as 'nobody', for whom the folder's mode holds
    try:
        check_target(sys.argv[1], sys.argv[2])
    except BadInputError as exc:
        print(exc.one_line())
""")


def test_output_folder_that_is_not_writable_is_refused(small_session):
    folder = Path(tempfile.mkdtemp(prefix="nwbflow-readonly-"))  # outside pytest's root-only tmp tree
    try:
        folder.chmod(0o555)
        child = subprocess.run([sys.executable, "-c", NOT_WRITABLE_CHECK, str(small_session),
                                str(folder / "out.nwb")], capture_output=True, text=True, timeout=120,
                               cwd=Path(__file__).resolve().parents[1])
        assert child.returncode == 0, child.stderr[-3000:]
        assert "output directory is not writable" in child.stdout and str(folder) in child.stdout
    finally:
        folder.chmod(0o755)
        folder.rmdir()


def test_the_input_guard_catches_a_run_that_changes_its_input(prefect_server, small_session, tmp_path, monkeypatch):
    """conftest's guard (every in-process run checks its input's SHA-256) fails a run that writes to its input."""
    import nwbflow.flows.session as session_flow

    session = tmp_path / "session.nwb"
    session.write_bytes(small_session.read_bytes())
    plan = session_flow.plan_session

    def plan_and_scribble(nwb_path, *args, **kwargs):
        with open(nwb_path, "ab") as handle:
            handle.write(b"\0")
        return plan(nwb_path, *args, **kwargs)

    monkeypatch.setattr(session_flow, "plan_session", plan_and_scribble)
    with pytest.raises(AssertionError, match="changed its input"):
        process_session(str(session), str(tmp_path / "out.nwb"), PARAMS.model_copy(update={"stages": ("preprocess",)}),
                        str(tmp_path / "work"))


def test_a_kernel_bad_input_error_is_given_the_file_and_series(prefect_server, small_session, tmp_path, monkeypatch):
    """Kernels know no file: the flow adds the input file and the series the stage reads to their errors."""
    from nwbflow.errors import BadInputError
    from nwbflow.tasks import calcium as calcium_tasks

    def refuse(*_args, **_kwargs):
        raise BadInputError("fluorescence baseline is not positive in ROI column 3", fix="pass raw fluorescence")

    monkeypatch.setattr(calcium_tasks, "spike_rate", refuse)
    params = PARAMS.model_copy(update={"stages": ("calcium",)})
    with pytest.raises(BadInputError) as excinfo:
        process_session(str(small_session), str(tmp_path / "out.nwb"), params, str(tmp_path / "work"))
    error = excinfo.value
    assert (error.path, error.obj, error.fix) == (str(small_session.resolve()), "processing/ophys/Fluorescence/"
                                                  "RoiResponseSeries", "pass raw fluorescence")
    assert error.one_line().startswith(f"{small_session.resolve()}: processing/ophys/")
    assert "calcium: fluorescence baseline is not positive" in error.one_line()
