"""``resubmit-crashed``: a crashed run of an nwbflow deployment, run again from where it stopped.

A worker that dies (SIGKILL, a lost machine, an evicted pod) leaves its flow run "Running": nothing
is left to report its end. Two of Prefect's own mechanisms close that gap (deployments/README.md,
"When a worker dies"):

1. flow runs send a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (30, set on the
   deployments), and the automation in ``deployments/automations.yaml`` marks a run **Crashed** when
   its heartbeats stop for 3 periods;
2. the ``resubmit-crashed`` deployment's trigger (``prefect.yaml``) runs this flow for every Crashed
   run tagged ``nwbflow``; it creates a new run of the same deployment with the same parameters.

The new run finds the finished stages in the work directory (shared by the workers of a pool) and
shows them Cached; the output and stage locks keep it from writing beside a run that is still alive
somewhere. Attempts are bounded: each resubmission carries the tag ``nwbflow-attempt:N`` and none is
made past ``max_attempts``. One Crashed run gives at most one new run (an idempotency key), however
often the event is delivered.
"""

from __future__ import annotations

import logging
from typing import Annotated
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Failed
from pydantic import Field

log = logging.getLogger(__name__)

#: Tag of a resubmitted run: ``nwbflow-attempt:<n>`` (the first run has none, so it is attempt 1).
ATTEMPT_TAG = "nwbflow-attempt:"


def attempt_of(tags: list[str]) -> int:
    """The attempt number a run's tags record (1 for a run never resubmitted).

    >>> attempt_of(["nwbflow", "nwbflow-attempt:3"]), attempt_of(["nwbflow"])
    (3, 1)
    """
    numbers = [int(t[len(ATTEMPT_TAG):]) for t in tags if t.startswith(ATTEMPT_TAG) and t[len(ATTEMPT_TAG):].isdigit()]
    return max(numbers, default=1)


def run_id_of(resource_id: str) -> UUID:
    """A flow run id from an event's resource id (``prefect.flow-run.<id>``) or the bare id.

    >>> str(run_id_of("prefect.flow-run.0193a1b2-0000-7000-8000-000000000001"))
    '0193a1b2-0000-7000-8000-000000000001'
    """
    return UUID(resource_id.rsplit(".", 1)[-1])


@flow(name="resubmit-crashed", validate_parameters=True)
def resubmit_crashed(flow_run_id: Annotated[str, Field(min_length=1)],
                     max_attempts: Annotated[int, Field(ge=1, le=10)] = 3) -> dict:
    """Run a Crashed flow run's deployment again with its parameters (at most ``max_attempts`` runs in all).

    Args:
        flow_run_id: The crashed run (its id, or the event resource id ``prefect.flow-run.<id>``).
        max_attempts: Runs in all, the first included; when the crashed run was the last one allowed,
            nothing is created and this run ends Failed naming it.

    Returns:
        ``{"crashed": id, "resubmitted": new id or None, "attempt": n, "why": text}``.
    """
    run_id = run_id_of(flow_run_id)
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(run_id)
        attempt = attempt_of(crashed.tags) + 1
        outcome = {"crashed": str(run_id), "resubmitted": None, "attempt": attempt}
        if crashed.state is None or crashed.state.type != StateType.CRASHED:
            return {**outcome, "why": f"the run is {crashed.state.name if crashed.state else 'stateless'} now, "
                                      "not Crashed: left alone"}
        if crashed.deployment_id is None or crashed.parent_task_run_id is not None:
            return {**outcome, "why": "not a deployment's run (a subflow or `nwbflow run`): its parent or "
                                      "caller decides"}
        if attempt > max_attempts:
            message = (f"flow run {crashed.name} ({run_id}) crashed on attempt {attempt - 1} of {max_attempts}: "
                       "not resubmitted; look at its logs, then start it again by hand")
            log.error(message)
            return Failed(message=message, data={**outcome, "why": message})
        tags = [t for t in crashed.tags if not t.startswith(ATTEMPT_TAG)] + [f"{ATTEMPT_TAG}{attempt}"]
        new = client.create_flow_run_from_deployment(
            crashed.deployment_id, parameters=crashed.parameters, tags=tags, job_variables=crashed.job_variables,
            idempotency_key=f"nwbflow-resubmit-{run_id}")
    log.info("flow run %s (%s) crashed; resubmitted as %s (%s), attempt %d of %d", crashed.name, run_id, new.name,
             new.id, attempt, max_attempts)
    return {**outcome, "resubmitted": str(new.id), "why": "crashed: run again with the same parameters"}
