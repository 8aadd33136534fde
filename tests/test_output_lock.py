"""Runs that meet: one output is written by one run at a time, shared stages by one run at a time.

Two runs on the same output: one completes, the other fails at once (CLI exit 4)
naming the output and its lock file. Lock files go when their run ends; one left
by a SIGKILLed run never blocks the next one. Two runs of the same input to different outputs share the stage
work: the second waits and finds it Cached. An output in a missing folder is
refused before anything runs (exit 2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL
from pynwb import NWBHDF5IO

from conftest import output_locked_by_another_thread, sha256_of
from nwbflow.errors import BadInputError, OutputBusyError
from nwbflow.flows.session import process_session
from nwbflow.locks import exclusive_lock, holder_note, output_lock, output_lock_file
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.params import SessionParams
from nwbflow.synth import SynthConfig, write_synthetic_session

PARAMS = SessionParams(execution={"device": "cpu"}, stages=("preprocess", "peaks"))
WAIT_S = 300

#: ``nwbflow`` CLI in a child, with one step made to wait: "plan" (the output's lock is held by then) or
#: "preprocess" (the preprocess stage's directory lock is held by then). On reaching it the child appends its
#: pid to the HOLDING file and waits for the test's RELEASE file. The lock module logs to stderr.
RUNNER = """
import logging, os, sys, time
from pathlib import Path
import nwbflow.flows.session as session
import nwbflow.tasks.preprocess as preprocess
from nwbflow import cli

step, holding, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def held(real):
    def wrapper(*args, **kwargs):
        with holding.open("a") as notes:
            notes.write(f"{os.getpid()}\\n")
        deadline = time.monotonic() + 300
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no release file after 300 s")
            time.sleep(0.05)
        return real(*args, **kwargs)
    return wrapper

if step == "plan":
    session.plan_session = held(session.plan_session)
else:
    preprocess.preprocess_to_binary = held(preprocess.preprocess_to_binary)
logging.getLogger("nwbflow.locks").setLevel(logging.INFO)
logging.getLogger("nwbflow.locks").addHandler(logging.StreamHandler())
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def session_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lock-session") / "raw.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=3.0, num_channels=16, num_units=4, ophys=False, seed=11))
    return path


class Child:
    """One ``nwbflow run`` child (see RUNNER); its output goes to ``<log>``."""

    def __init__(self, step: str, holding: Path, release: Path, session: Path, out: Path, workdir: Path,
                 log: Path):
        self.log = log
        args = ["run", str(session), "-o", str(out), "--device", "cpu", "--stages", "preprocess,peaks",
                "--workdir", str(workdir)]
        env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())  # the test session's server
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, step, str(holding), str(release), *args],
                                         env=env, stdout=handle, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _end(children: list[Child], release: Path) -> None:
    """Let the children go on (``release``), kill any still running, reap them all."""
    release.touch()
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(timeout=60)


def _wait_until(condition, children: list[Child], what: str) -> None:
    """Poll ``condition()`` (bounded); fail early with the children's output when one died before it held."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {WAIT_S} s:\n" + "\n".join(
            c.text()[-3000:] for c in children)
        time.sleep(0.05)


def _lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def _assert_valid(out: Path) -> None:
    with NWBHDF5IO(str(out), "r", load_namespaces=True) as io:
        assert [row["stage"] for row in read_provenance(io.read())] == ["preprocess", "peaks"], out
    assert not list(out.parent.glob(f".{out.name}*.partial*"))


def test_lock_nests_in_its_thread_and_excludes_other_threads_and_processes(tmp_path):
    lock_file = tmp_path / ".x.lock"
    probe = [sys.executable, "-c", "import sys; from nwbflow.locks import exclusive_lock\n"
             "with exclusive_lock(sys.argv[1], blocking=False): pass", str(lock_file)]

    def from_another_thread() -> str:
        result = []

        def attempt():
            try:
                with exclusive_lock(lock_file, blocking=False):
                    result.append("got it")
            except BlockingIOError:
                result.append("busy")

        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(30)
        return result[0]

    with exclusive_lock(lock_file, blocking=False):
        with exclusive_lock(lock_file, blocking=False):  # nested in one thread (nightly's claim, then the flow)
            assert f"pid {os.getpid()} " in holder_note(lock_file)
        assert from_another_thread() == "busy"  # still held after the nested block ended
        assert subprocess.run(probe, capture_output=True).returncode == 1
    assert from_another_thread() == "got it"
    assert subprocess.run(probe, capture_output=True).returncode == 0
    assert not lock_file.exists()  # removed by its holder on letting go


def test_lock_files_come_and_go_without_two_holders_at_once(tmp_path):
    """Holders remove the lock file on letting go; a waiter on a removed file must not count as a holder."""
    lock_file, counter = tmp_path / ".c.lock", tmp_path / "counter"
    counter.write_text("0")

    def increments():
        for _ in range(200):
            with exclusive_lock(lock_file):
                counter.write_text(str(int(counter.read_text()) + 1))

    threads = [threading.Thread(target=increments) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert int(counter.read_text()) == 800
    assert not lock_file.exists()


def test_two_runs_on_one_output_one_completes_the_other_fails_at_once(prefect_server, session_file, tmp_path):
    before = sha256_of(session_file)
    out, holding, release = tmp_path / "out.nwb", tmp_path / "holding", tmp_path / "release"
    children = [Child("plan", holding, release, session_file, out, tmp_path / "work", tmp_path / f"{n}.log")
                for n in ("a", "b")]
    try:
        # The winner holds the output's lock while it waits in its plan step; the loser must fail meanwhile
        # (were there no lock, both would reach the plan step: that ends the wait too, and the test fails).
        _wait_until(lambda: any(c.proc.poll() is not None for c in children) or _lines(holding) == 2, children,
                    "a run ending")
        loser = next(c for c in children if c.proc.poll() is not None)
        winner = next(c for c in children if c is not loser)
        assert not out.exists() and winner.proc.poll() is None
        release.touch()
        winner.proc.wait(timeout=WAIT_S)
    finally:
        _end(children, release)
    assert winner.proc.returncode == 0, winner.text()[-4000:]
    assert loser.proc.returncode == 4, loser.text()[-4000:]
    busy = [line for line in loser.text().splitlines() if line.startswith("nwbflow: busy:")]
    assert len(busy) == 1 and "another nwbflow run is writing" in busy[0], loser.text()[-4000:]
    assert str(out) in busy[0] and str(output_lock_file(out)) in busy[0]
    assert holding.read_text().split() == [str(winner.proc.pid)]  # the loser never got as far as planning
    _assert_valid(out)
    assert not output_lock_file(out).exists()
    assert sha256_of(session_file) == before


def test_lock_of_a_sigkilled_run_does_not_block_the_next(prefect_server, session_file, tmp_path):
    out, holding, release = tmp_path / "out.nwb", tmp_path / "holding", tmp_path / "release"
    killed = Child("plan", holding, release, session_file, out, tmp_path / "work", tmp_path / "killed.log")
    try:
        _wait_until(holding.exists, [killed], "the run taking the output's lock")
        killed.proc.send_signal(signal.SIGKILL)
    finally:
        killed.proc.kill()
        killed.proc.wait(timeout=60)
    assert killed.proc.returncode == -signal.SIGKILL
    assert f"pid {killed.proc.pid} " in holder_note(output_lock_file(out))  # its lock file is left behind
    summary = process_session(str(session_file), str(out), PARAMS, str(tmp_path / "work"))
    assert summary["output"] == str(out)
    _assert_valid(out)
    assert not output_lock_file(out).exists()  # taken over, then removed by the run that ended


def test_same_input_to_two_outputs_computes_each_stage_once(prefect_server, session_file, tmp_path):
    """Both runs share the stage directories: the second waits for the first, then reads its result."""
    kernel_runs, release = tmp_path / "kernel-runs", tmp_path / "release"
    children = [Child("preprocess", kernel_runs, release, session_file, tmp_path / f"{n}.nwb", tmp_path / "work",
                      tmp_path / f"{n}.log") for n in ("a", "b")]
    try:
        _wait_until(lambda: any("waiting for another run writing" in c.text() for c in children)
                    or _lines(kernel_runs) == 2, children, "a run waiting on the other's preprocess stage")
        release.touch()
        for child in children:
            child.proc.wait(timeout=WAIT_S)
    finally:
        _end(children, release)
    for child in children:
        assert child.proc.returncode == 0, child.text()[-4000:]
    assert _lines(kernel_runs) == 1  # preprocess ran once; the other run found it Cached
    _assert_valid(tmp_path / "a.nwb")
    _assert_valid(tmp_path / "b.nwb")
    assert not list(tmp_path.rglob("*.lock"))  # output and stage-directory locks alike


def test_output_in_a_missing_folder_is_refused_before_anything_runs(prefect_server, session_file, tmp_path):
    from prefect.client.orchestration import get_client

    out = tmp_path / "absent" / "out.nwb"
    state = process_session(str(session_file), str(out), PARAMS, return_state=True)
    assert state.is_failed()
    with pytest.raises(BadInputError, match="output directory does not exist") as error:
        state.result()
    assert str(out) in str(error.value)
    assert not (tmp_path / "absent").exists()  # not even the default work directory beside it
    with get_client(sync_client=True) as client:
        tasks = [r for r in client.read_task_runs() if r.flow_run_id == state.state_details.flow_run_id]
    assert tasks == []


def test_cli_output_in_a_missing_folder_exits_2(session_file, tmp_path):
    out = tmp_path / "absent" / "out.nwb"
    result = subprocess.run([sys.executable, "-m", "nwbflow.cli", "run", str(session_file), "-o", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("nwbflow: bad input:")]
    assert len(errors) == 1 and str(out) in errors[0] and "output directory does not exist" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "absent").exists()


def test_output_lock_error_names_the_output_the_lock_file_and_the_holder(tmp_path):
    out = tmp_path / "x.nwb"
    with output_locked_by_another_thread(out), pytest.raises(OutputBusyError) as error:
        with output_lock(out):
            pass
    message = str(error.value)
    assert str(out) in message and str(output_lock_file(out)) in message and f"pid {os.getpid()}" in message
    assert "wait for it or choose another output" in message
