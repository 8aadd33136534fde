"""What a Prefect server serving nwbflow needs besides its deployments, and how its workers are run.

``apply_automations`` creates or updates, by name, the automations of a YAML file
(``deployments/automations.yaml``: runs whose heartbeats stop are marked Crashed), so the setup can be
run again after an edit without duplicating them. ``run_worker`` starts a Prefect worker that stops
on one SIGTERM (what systemd and Kubernetes send): see its docstring.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from nwbflow.cpu_threads import worker_environment
from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)

#: Seconds a stopping worker's flow run gets between SIGTERM and SIGKILL (Kubernetes' default grace).
WORKER_STOP_GRACE_S = 30


def apply_automations(path: str | Path) -> list[tuple[str, str]]:
    """Create or update (matched by name) each automation of the YAML file at ``path`` on the server of
    ``PREFECT_API_URL``; returns ``[(name, "created" | "updated")]``."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read the automations: {exc}", path=path,
                            fix="pass deployments/automations.yaml of this nwbflow") from exc
    entries = data.get("automations") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BadInputError("no `automations:` list in this file", path=path,
                            fix="pass deployments/automations.yaml of this nwbflow")
    done = []
    with get_client(sync_client=True) as client:
        for entry in entries:
            automation = AutomationCore.model_validate(entry)
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                for duplicate in existing[1:]:  # created twice by hand: one is enough
                    client.delete_automation(duplicate.id)
                done.append((automation.name, "updated"))
            else:
                client.create_automation(automation)
                done.append((automation.name, "created"))
            log.info("automation %s %s", automation.name, done[-1][1])
    return done


def run_worker(worker_args: list[str]) -> int:
    """Run ``prefect worker start WORKER_ARGS`` and stop it, and its flow runs, on one SIGTERM or SIGINT.

    Prefect 3.8's worker turns a SIGTERM into a SIGINT to itself, which does nothing where SIGINT is
    ignored (a process started in the background of a non-interactive shell), and it leaves its flow-run
    processes (each in a session of its own) running as orphans. Here the worker runs as a child with
    SIGINT at its default; the first SIGTERM or SIGINT goes, as SIGTERM, to the worker and to each of its
    flow-run processes: **the worker and its runs stop at once**. Each run ends Crashed ("aborted by
    Python system exit call"), the ``resubmit-crashed`` deployment runs it again, and it resumes from
    its cached stages on the next free worker. What is still alive ``WORKER_STOP_GRACE_S`` seconds after
    the signal is killed. Returns the worker's exit code (0 when it was stopped by the signal).
    """
    prefect = str(Path(sys.executable).with_name("prefect"))
    # SIGINT back to its default in the worker: Prefect's worker stops on a SIGINT it sends itself, which a
    # process started in the background of a non-interactive shell (SIGINT ignored) would never see.
    child = subprocess.Popen([prefect, "worker", "start", *worker_args], start_new_session=True,
                             preexec_fn=_default_sigint, env=worker_environment(worker_args))
    stopped_at: list[float] = []  # monotonic time of the first signal
    flow_runs: list[int] = []  # the worker's flow-run processes (each in its own session) when it came

    def stop(signum, _frame) -> None:
        if not stopped_at:
            log.info("worker: %s received, stopping the worker and its flow runs", signal.Signals(signum).name)
            stopped_at.append(time.monotonic())
            flow_runs.extend(_descendants(child.pid))
            _signal_group(child.pid, signal.SIGTERM)
            _signal_each(flow_runs, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stopped_at and time.monotonic() - stopped_at[0] > WORKER_STOP_GRACE_S:
                    log.warning("worker: still running %d s after the signal; killing it", WORKER_STOP_GRACE_S)
                    _signal_group(child.pid, signal.SIGKILL)
                    _signal_each(flow_runs, signal.SIGKILL)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _end_group(child.pid)  # processes the worker left behind
    _wait_then_kill(flow_runs, (stopped_at[0] if stopped_at else time.monotonic()) + WORKER_STOP_GRACE_S)
    return 0 if stopped_at else code


def _default_sigint() -> None:
    """In the worker, before it starts: SIGINT at its default, SIGTERM when this process dies (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), read from /proc; [] where there is none."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def _wait_then_kill(pids: list[int], deadline: float) -> None:
    """Wait (until the monotonic ``deadline``) for ``pids`` to end; SIGKILL those still alive then (only
    those: the number of one that ended may already belong to another process)."""
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    _signal_each([pid for pid in pids if Path(f"/proc/{pid}").exists()], signal.SIGKILL)


def _signal_each(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False when no process of it is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _end_group(pgid: int) -> None:
    """SIGTERM to what is left of the group, SIGKILL after ``WORKER_STOP_GRACE_S`` seconds."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + WORKER_STOP_GRACE_S
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)
