"""deployments/prefect.yaml end to end: server, work pool, `prefect deploy`, worker, a run from the API.

Everything runs as it would on a machine serving nwbflow (tests/prefect_service.py): `prefect server
start`, once on SQLite and once on a real PostgreSQL, `prefect work-pool create`, `prefect deploy
--prefect-file deployments/prefect.yaml`, `nwbflow service-automations`, `nwbflow worker`, each a
subprocess talking to the server over HTTP on 127.0.0.1. Runs are created the way the UI's Run button
creates them (`POST /api/deployments/{id}/create_flow_run`). A worker killed mid-run is
tests/test_worker_loss.py (slow: heartbeats come every 30 s at the fastest).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION, sha256_of
from nwbflow.locks import output_lock
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.synth import SynthConfig, write_synthetic_session
from prefect_service import DATABASES, NWBFLOW, REPO, start_service

K8S_TEMPLATE = REPO / "deployments" / "kubernetes-gpu-job-template.json"


@pytest.fixture(scope="module", params=DATABASES)
def service(request, tmp_path_factory):
    """Server up on SQLite, then on PostgreSQL; pools, deployments and automations applied from the repo's files;
    one `nwbflow worker` on `nwbflow-cpu`."""
    service = start_service(tmp_path_factory.mktemp(f"service-{request.param}"), request.param)
    try:
        service.worker("test-worker")
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def session_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deployment-session") / "raw.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=5, num_channels=16, num_units=4, ophys=False, seed=1))
    return path


def test_deployments_are_registered_as_prefect_yaml_says(service):
    cpu, gpu = service.deployment("process-session"), service.deployment("process-session-gpu")
    for deployment in (cpu, gpu):
        assert deployment["entrypoint"] == "nwbflow.flows.session.process_session"
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["pull_steps"] == []
        env = deployment["job_variables"]["env"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "nwbflow"
        assert "OMP_NUM_THREADS" not in env and "OPENBLAS_NUM_THREADS" not in env
        schema = deployment["parameter_openapi_schema"]
        assert set(schema["required"]) == {"nwb_path", "out_path"}
        # The UI form is built from this schema: descriptions and bounds of the parameter models.
        threshold = schema["definitions"]["PeakParams"]["properties"]["threshold_mad"]
        assert threshold["description"] and threshold["exclusiveMinimum"] == 0
    assert (cpu["work_pool_name"], gpu["work_pool_name"]) == ("nwbflow-cpu", "nwbflow-gpu")
    assert cpu["parameters"] == {}
    assert gpu["parameters"] == {"params": {"execution": {"device": "cuda"}}}


def test_nightly_is_scheduled_with_parameters_from_the_environment(service):
    nightly = service.deployment("nightly", flow="nightly")
    assert nightly["entrypoint"] == "nwbflow.flows.nightly.nightly"
    assert nightly["enforce_parameter_schema"] is True
    assert nightly["work_pool_name"] == "nwbflow-cpu"
    assert nightly["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "nwbflow"
    assert nightly["parameters"] == {"root": service.env["NWBFLOW_DATA_ROOT"],
                                     "out_dir": service.env["NWBFLOW_OUT_DIR"]}
    [schedule] = nightly["schedules"]
    assert schedule["active"] is True
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == ("0 2 * * *", "UTC")


def test_dandi_prep_is_registered_and_refuses_an_unknown_files_mode(service):
    dandi = service.deployment("dandi-prep", flow="dandi-prep")
    assert dandi["entrypoint"] == "nwbflow.flows.dandi.dandi_prep"
    assert dandi["enforce_parameter_schema"] is True and dandi["work_pool_name"] == "nwbflow-cpu"
    assert dandi["parameters"] == {} and dandi["schedules"] == []
    schema = dandi["parameter_openapi_schema"]
    assert set(schema["required"]) == {"root", "out_dir"}
    assert schema["properties"]["files_mode"]["enum"] == ["hardlink", "copy"]
    response = service.client.post(f"/deployments/{dandi['id']}/create_flow_run", json={"parameters": {
        "root": "/data/raw", "out_dir": "/data/dandiset", "files_mode": "move"}})
    assert response.status_code == 409, response.text
    assert service.count_runs(dandi["id"]) == 0


@pytest.mark.parametrize("params", [{"peaks": {"threshold_mad": -1}}, {"bogus": 1}, {"execution": {"device": "tpu"}}],
                         ids=["out-of-bounds", "unknown-key", "bad-enum"])
def test_api_refuses_invalid_parameters_without_creating_a_run(service, params):
    deployment = service.deployment("process-session")
    before = service.count_runs(deployment["id"])
    response = service.client.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"nwb_path": "/nonexistent/raw.nwb", "out_path": "/nonexistent/out.nwb",
                             "params": params}})
    # Prefect 3.8 answers a schema violation with 409 Conflict ("Validation failed for field ...").
    assert response.status_code == 409, response.text
    assert "Validation failed for field 'params" in response.json()["detail"]
    assert service.count_runs(deployment["id"]) == before


def test_run_created_like_the_ui_run_button_completes_with_provenance(service, session_file, tmp_path):
    input_sha = sha256_of(session_file)
    out = tmp_path / "processed.nwb"
    deployment = service.deployment("process-session")
    response = service.client.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"nwb_path": str(session_file), "out_path": str(out),
                             "params": {"execution": {"device": "cpu"}, "motion": FAST_MOTION}}})
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]

    run = service.wait_for_run(flow_run_id)
    assert run["state"]["type"] == "COMPLETED", (
        f"flow run {run['state']['type']}: {run['state'].get('message')}\n{service.logs()}")
    assert out.exists()
    with NWBHDF5IO(str(out), "r") as io:
        nwbfile = io.read()
        rows = read_provenance(nwbfile)
        # This short session has fewer peaks than a motion fit needs: the motion stage is skipped (with a
        # warning), not failed, and leaves nothing in the file; sorting then reads the uncorrected traces.
        assert "ecephys" not in nwbfile.processing or "motion" not in nwbfile.processing["ecephys"].data_interfaces
        assert nwbfile.units is not None and len(nwbfile.units) > 0
    assert [r["stage"] for r in rows] == ["preprocess", "peaks", "sorting"]
    assert "motion stage skipped" in service.logs()
    # nwbflow's own INFO records reach the run's logs in the UI (PREFECT_LOGGING_EXTRA_LOGGERS on the deployment)
    logs = service.client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                     "limit": 200}).json()
    assert any(r["name"].startswith("nwbflow.") and r["level"] == 20 for r in logs), logs[:5]
    assert {r["flow_run_id"] for r in rows} == {flow_run_id}
    assert all(r["device"] == "cpu" for r in rows)
    assert sha256_of(session_file) == input_sha

    # The stage table artifact, read back as the UI reads it: one set of columns in every row (the UI takes
    # them from the first row), every stage's figures in them.
    artifacts = service.client.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["table"]}}}).json()
    [table] = [a for a in artifacts if a["key"].startswith("stages-")]
    table_rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert all(list(row) == list(table_rows[0]) for row in table_rows)
    assert {"stage", "seconds", "device", "x_realtime", "counts"} <= set(table_rows[0])
    by_stage = {row["stage"]: row for row in table_rows}
    assert {"preprocess", "peaks", "motion", "sorting", "write-back"} <= set(by_stage)
    assert "units=" in by_stage["sorting"]["counts"] and "peaks=" in by_stage["peaks"]["counts"]
    assert "skipped=" in by_stage["motion"]["counts"]


def _crashed_run(service, parameters: dict, tags: list[str]) -> str:
    """A process-session run that crashed: created for next year (no worker takes it), then set Crashed as
    the heartbeat automation sets a run whose worker died."""
    deployment = service.deployment("process-session")
    response = service.client.post(f"/deployments/{deployment['id']}/create_flow_run", json={
        "parameters": parameters, "tags": tags,
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}}})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    response = service.client.post(f"/flow_runs/{run_id}/set_state", json={
        "state": {"type": "CRASHED", "message": "no heartbeat (test)"}, "force": True})
    assert response.status_code in (200, 201), response.text
    return run_id


def _resubmissions_of(service, crashed_id: str, timeout_s: float = 120) -> list[dict]:
    """The finished resubmit-crashed runs for ``crashed_id`` (waits for the first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [r for r in service.flow_runs(tags={"all_": ["nwbflow-service"]})
                if r["parameters"].get("flow_run_id", "").endswith(crashed_id)]
        if runs and all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
            return runs
        time.sleep(1)
    raise AssertionError(f"no finished resubmit-crashed run for {crashed_id}\n{service.logs()}")


def test_the_documented_setup_declares_crash_detection_and_resubmission(service):
    crash_env = service.deployment("process-session")["job_variables"]["env"]
    assert crash_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    service.cli(NWBFLOW, "service-automations")  # again: updated by name, not duplicated
    automations = service.client.post("/automations/filter", json={}).json()
    names = [a["name"] for a in automations]
    assert names.count("nwbflow-crash-silent-runs") == 1, names
    [crash] = [a for a in automations if a["name"] == "nwbflow-crash-silent-runs"]
    assert crash["trigger"]["posture"] == "Proactive" and crash["trigger"]["within"] == 90  # 3 heartbeats
    assert crash["actions"] == [{**crash["actions"][0], "type": "change-flow-run-state", "state": "CRASHED"}]
    resubmit = service.deployment("resubmit-crashed", flow="resubmit-crashed")
    assert resubmit["entrypoint"] == "nwbflow.flows.resubmit.resubmit_crashed"
    assert "nwbflow" not in resubmit["tags"]  # its own runs are never resubmitted
    [trigger] = [a for a in automations if a["name"] == "nwbflow-resubmit-crashed-runs"]
    assert trigger["trigger"]["expect"] == ["prefect.flow-run.Crashed"]
    assert trigger["actions"][0]["deployment_id"] == resubmit["id"]


def test_a_crashed_run_is_run_again_once_with_its_parameters(service, session_file, tmp_path):
    parameters = {"nwb_path": str(session_file), "out_path": str(tmp_path / "again.nwb"),
                  "params": {"execution": {"device": "cpu"}, "stages": ["preprocess"]}}
    crashed = _crashed_run(service, parameters, tags=[])
    [resubmission] = _resubmissions_of(service, crashed)  # one, however often the event is delivered
    assert resubmission["state"]["type"] == "COMPLETED", service.logs()
    [again] = [r for r in service.flow_runs(tags={"all_": ["nwbflow-attempt:2"]}) if r["parameters"] == parameters]
    assert service.wait_for_run(again["id"])["state"]["type"] == "COMPLETED", service.logs()
    assert "nwbflow" in again["tags"] and (tmp_path / "again.nwb").exists()


def test_a_resubmitted_run_does_not_write_beside_a_run_still_alive(service, session_file, tmp_path):
    """A run marked Crashed whose process lives on somewhere (a machine cut off from the server) still holds
    its output's lock: the resubmitted run fails at once with OutputBusyError and writes nothing."""
    out = tmp_path / "held.nwb"
    parameters = {"nwb_path": str(session_file), "out_path": str(out),
                  "params": {"execution": {"device": "cpu"}, "stages": ["preprocess"]}}
    with output_lock(out):  # the run that is still alive
        crashed = _crashed_run(service, parameters, tags=[])
        _resubmissions_of(service, crashed)
        [again] = [r for r in service.flow_runs(tags={"all_": ["nwbflow-attempt:2"]}) if r["parameters"] == parameters]
        run = service.wait_for_run(again["id"])
    assert run["state"]["type"] == "FAILED" and "OutputBusyError" in run["state"]["message"], run["state"]
    assert not out.exists() and not (tmp_path / ".nwbflow-work").exists()  # no stage ran


def test_resubmission_stops_after_the_last_attempt(service, tmp_path):
    parameters = {"nwb_path": "/nonexistent/raw.nwb", "out_path": str(tmp_path / "never.nwb")}
    crashed = _crashed_run(service, parameters, tags=["nwbflow-attempt:3"])
    [resubmission] = _resubmissions_of(service, crashed)
    assert resubmission["state"]["type"] == "FAILED"
    assert "crashed on attempt 3 of 3: not resubmitted" in resubmission["state"]["message"]
    assert not service.flow_runs(tags={"all_": ["nwbflow-attempt:4"]})


def test_one_sigterm_stops_a_worker_started_with_sigint_ignored(service):
    """What systemd and Kubernetes send, to a worker started the way that defeated Prefect's own handler
    (in the background of a non-interactive shell, where SIGINT is ignored)."""
    worker = service.worker("sigterm-worker", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while "Worker 'sigterm-worker' started" not in (service.logdir / "sigterm-worker.log").read_text():
        assert worker.poll() is None and time.monotonic() < deadline, service.logs()
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    assert children  # `prefect worker start`, in a session of its own
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    print(f"worker stopped {time.monotonic() - started:.1f} s after one SIGTERM")
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]  # nothing left behind


def test_kubernetes_gpu_job_template_is_accepted_by_the_server(service):
    """The server checks a base job template: every {{ placeholder }} must be a declared variable."""
    template = json.loads(K8S_TEMPLATE.read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert template["variables"]["properties"]["env"]["default"] == {"PREFECT_LOGGING_EXTRA_LOGGERS": "nwbflow"}
    response = service.client.post("/work_pools/", json={"name": "nwbflow-gpu-k8s", "type": "kubernetes",
                                                          "base_job_template": template})
    assert response.status_code == 201, response.text
    assert response.json()["base_job_template"] == template
