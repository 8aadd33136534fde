"""A worker that dies mid-run: its run is marked Crashed from its missing heartbeats and run again elsewhere.

The service is set up as deployments/README.md says (tests/prefect_service.py). A process-session run
starts on worker A; once preprocess and peaks have finished and motion is running, worker A, its `prefect worker`
and the run's process are killed with SIGKILL (the machine is gone: nothing reports anything). Worker B
is started. The heartbeat automation must mark the run Crashed (heartbeats every 30 s, Crashed after 90 s
of silence), `resubmit-crashed` must run it again with its parameters, and the new run must complete on
worker B with preprocess and peaks Cached. Slow (about 2.5 min: 90 s of that is the silence the automation waits
for), so it is its own step of `.ci/run` (`make test-service`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pynwb import NWBHDF5IO

from conftest import sha256_of
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.synth import SynthConfig, write_synthetic_session
from prefect_service import start_service

pytestmark = pytest.mark.slow

HEARTBEAT_S = 30
#: Kill to Crashed: the automation's 90 s (3 heartbeats) after the last heartbeat, which came at most one
#: period before the kill, plus its evaluation; 5 periods is generous.
CRASHED_WITHIN_S = 5 * HEARTBEAT_S


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout
        found += [int(p) for p in children.split()]
        frontier += [int(p) for p in children.split()]
    return found


def _wait(condition, timeout_s: float, what: str, service):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what}: not after {timeout_s} s\n{service.logs()}")


def test_a_run_whose_worker_died_is_crashed_and_resumed_on_another_worker(tmp_path):
    session = tmp_path / "data" / "session.nwb"
    session.parent.mkdir()
    write_synthetic_session(session, SynthConfig(duration_s=40, num_channels=32, num_units=6, ophys=False, seed=3))
    input_sha = sha256_of(session)
    out = tmp_path / "processed" / "session_processed.nwb"
    out.parent.mkdir()
    (tmp_path / "service").mkdir()
    service = start_service(tmp_path / "service")
    try:
        worker_a = service.worker("worker-a")
        deployment = service.deployment("process-session")
        parameters = {"nwb_path": str(session), "out_path": str(out),
                      "params": {"execution": {"device": "cpu"}}}  # MEDiCINe's full fit: ~20 s to kill it in
        response = service.client.post(f"/deployments/{deployment['id']}/create_flow_run",
                                       json={"parameters": parameters})
        assert response.status_code == 201, response.text
        first = response.json()["id"]

        def stage_states(run_id):
            return {t["name"].split(" ")[0].rsplit("-", 1)[0]: t["state"]["type"] for t in service.task_runs(run_id)}

        # Killed inside motion, the long stage: peaks takes about a second here, so a kill aimed at it may land
        # after its result is stored but before the server hears of it (the resumed run then finds it Cached).
        _wait(lambda: stage_states(first).get("motion") == "RUNNING", 180, "motion running", service)
        processes = [worker_a.pid, *_descendants(worker_a.pid)]
        assert len(processes) >= 3, processes  # nwbflow worker, prefect worker, the flow run's process
        for pid in processes:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        worker_a.wait(timeout=30)
        at_kill = stage_states(first)  # read after the kill: nothing can change it any more
        service.worker("worker-b")

        crashed = _wait(lambda: (r := service.client.get(f"/flow_runs/{first}").json())["state"]["type"] == "CRASHED"
                        and r, CRASHED_WITHIN_S, "the killed run marked Crashed", service)
        crashed_after_s = time.monotonic() - killed
        assert "no heartbeat" in crashed["state"]["message"]

        def resubmitted():
            runs = [r for r in service.flow_runs(tags={"all_": ["nwbflow-attempt:2"]}) if r["parameters"] == parameters]
            return runs[0] if runs else None
        again = _wait(resubmitted, 120, "the resubmitted run", service)
        finished = service.wait_for_run(again["id"], timeout_s=300)
        resumed_after_s = time.monotonic() - killed
        assert finished["state"]["type"] == "COMPLETED", f"{finished['state']}\n{service.logs()}"
        print(f"\nkilled with stages {at_kill}; -> Crashed {crashed_after_s:.0f} s, -> resubmitted run Completed "
              f"{resumed_after_s:.0f} s")

        done_before = {stage for stage, state in at_kill.items() if state == "COMPLETED"}
        assert {"preprocess", "peaks"} <= done_before and at_kill["motion"] == "RUNNING", at_kill
        states = {t["name"].split(" ")[0].rsplit("-", 1)[0]: t["state"]["name"] for t in service.task_runs(again["id"])}
        for stage in ("preprocess", "peaks", "motion", "sorting"):  # finished before the kill: not computed again
            assert states[stage] == ("Cached" if stage in done_before else "Completed"), (stage, states)
        assert all(not Path(f"/proc/{pid}").exists() for pid in processes)
        with NWBHDF5IO(str(out), "r") as io:
            rows = read_provenance(io.read())
        run_of = {r["stage"]: r["flow_run_id"] for r in rows}  # who computed each stage, recorded so
        assert run_of == {stage: first if stage in done_before else again["id"] for stage in run_of}, run_of
        assert sha256_of(session) == input_sha
    finally:
        service.stop()
