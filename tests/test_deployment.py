"""deployments/prefect.yaml end to end: server, work pool, `prefect deploy`, worker, a run from the API.

Everything runs as it would on a machine serving nwbflow: `prefect server start` (temporary
SQLite home), `prefect work-pool create`, `prefect deploy --prefect-file deployments/prefect.yaml`,
`prefect worker start`, each a subprocess of this test talking to the server over HTTP on
127.0.0.1. Runs are created the way the UI's Run button creates them
(`POST /api/deployments/{id}/create_flow_run`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pynwb import NWBHDF5IO

from conftest import FAST_MOTION, sha256_of
from nwbflow.nwb_io.provenance import read_provenance
from nwbflow.synth import SynthConfig, write_synthetic_session

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"
K8S_TEMPLATE = REPO / "deployments" / "kubernetes-gpu-job-template.json"
PREFECT = str(Path(sys.executable).with_name("prefect"))

SERVER_START_TIMEOUT_S = 180
CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, num_chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} (last {num_chars} chars) ---\n{text[-num_chars:]}"


@dataclass
class Service:
    """A running server + worker, their logs, and an HTTP client for the REST API."""

    api_url: str
    env: dict[str, str]
    logdir: Path
    client: httpx.Client
    procs: list[subprocess.Popen] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.logdir.glob("*.log")))

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start ``prefect *args`` in its own process group (so its children can be stopped with it)."""
        log = open(self.logdir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            log.close()  # the child holds its own copy
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> str:
        """Run ``prefect *args`` to completion; fail with its output and the service logs if it fails."""
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT_S)
        output = done.stdout + done.stderr
        with (self.logdir / "cli.log").open("a") as log:
            log.write(f"$ prefect {' '.join(args)}\n{output}\n")
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
        return output

    def stop(self) -> None:
        """Terminate every process group started here (newest first), then kill what is left."""
        for proc in reversed(self.procs):
            _stop_group(proc)
        self.client.close()


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # the leader may be gone while children of its group (uvicorn, flow runs) remain
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace_s)


def _wait_for_health(service: Service, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited with {server.returncode}\n{service.logs()}"
        try:
            if service.client.get("/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"no answer from {service.api_url}/health after {SERVER_START_TIMEOUT_S} s\n"
                         f"{service.logs()}")


def _service_env(root: Path, api_url: str) -> dict[str, str]:
    """This process's environment without PREFECT_* or NWBFLOW_* settings, plus the test service's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NWBFLOW_"))}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
               PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2",  # the worker polls every 2 s instead of 10 s
               # read by `prefect deploy` for the nightly deployment's parameters
               NWBFLOW_DATA_ROOT=str(root / "data"), NWBFLOW_OUT_DIR=str(root / "processed"))
    return env


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Server up, pools created, deployments applied from prefect.yaml, one worker on `nwbflow-cpu`."""
    root = tmp_path_factory.mktemp("service")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    service = Service(api_url=api_url, env=_service_env(root, api_url), logdir=root,
                      client=httpx.Client(base_url=api_url, timeout=30))
    try:
        server = service.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait_for_health(service, server)
        for pool in ("nwbflow-cpu", "nwbflow-gpu"):
            service.cli("work-pool", "create", pool, "--type", "process")
        service.cli("deploy", "--prefect-file", PREFECT_FILE, "--all", "--no-prompt")
        service.start("worker", "worker", "start", "--pool", "nwbflow-cpu", "--name", "test-worker")
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def session_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deployment-session") / "raw.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=5, num_channels=16, num_units=4, ophys=False, seed=1))
    return path


def _deployment(service: Service, name: str, flow: str = "process-session") -> dict:
    response = service.client.get(f"/deployments/name/{flow}/{name}")
    assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:500]}"
    return response.json()


def _count_runs(service: Service, deployment_id: str) -> int:
    response = service.client.post("/flow_runs/count",
                                   json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return response.json()


def _wait_for_run(service: Service, flow_run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = service.client.get(f"/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished after {RUN_TIMEOUT_S} s "
                         f"(state {run['state']['type']})\n{service.logs()}")


def test_deployments_are_registered_as_prefect_yaml_says(service):
    cpu, gpu = _deployment(service, "process-session"), _deployment(service, "process-session-gpu")
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
    nightly = _deployment(service, "nightly", flow="nightly")
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
    dandi = _deployment(service, "dandi-prep", flow="dandi-prep")
    assert dandi["entrypoint"] == "nwbflow.flows.dandi.dandi_prep"
    assert dandi["enforce_parameter_schema"] is True and dandi["work_pool_name"] == "nwbflow-cpu"
    assert dandi["parameters"] == {} and dandi["schedules"] == []
    schema = dandi["parameter_openapi_schema"]
    assert set(schema["required"]) == {"root", "out_dir"}
    assert schema["properties"]["files_mode"]["enum"] == ["hardlink", "copy"]
    response = service.client.post(f"/deployments/{dandi['id']}/create_flow_run", json={"parameters": {
        "root": "/data/raw", "out_dir": "/data/dandiset", "files_mode": "move"}})
    assert response.status_code == 409, response.text
    assert _count_runs(service, dandi["id"]) == 0


@pytest.mark.parametrize("params", [{"peaks": {"threshold_mad": -1}}, {"bogus": 1}, {"execution": {"device": "tpu"}}],
                         ids=["out-of-bounds", "unknown-key", "bad-enum"])
def test_api_refuses_invalid_parameters_without_creating_a_run(service, params):
    deployment = _deployment(service, "process-session")
    before = _count_runs(service, deployment["id"])
    response = service.client.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"nwb_path": "/nonexistent/raw.nwb", "out_path": "/nonexistent/out.nwb",
                             "params": params}})
    # Prefect 3.8 answers a schema violation with 409 Conflict ("Validation failed for field ...").
    assert response.status_code == 409, response.text
    assert "Validation failed for field 'params" in response.json()["detail"]
    assert _count_runs(service, deployment["id"]) == before


def test_run_created_like_the_ui_run_button_completes_with_provenance(service, session_file, tmp_path):
    input_sha = sha256_of(session_file)
    out = tmp_path / "processed.nwb"
    deployment = _deployment(service, "process-session")
    response = service.client.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"nwb_path": str(session_file), "out_path": str(out),
                             "params": {"execution": {"device": "cpu"}, "motion": FAST_MOTION}}})
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]

    run = _wait_for_run(service, flow_run_id)
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
    assert {r["flow_run_id"] for r in rows} == {flow_run_id}
    assert all(r["device"] == "cpu" for r in rows)
    assert sha256_of(session_file) == input_sha


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
