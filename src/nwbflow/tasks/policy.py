"""Retry policy of the stage tasks: transient failures only, exponential backoff with jitter.

Retried: I/O errors (``OSError``, which h5py's errors are), ``TransientError``,
out of device or host memory. Each retry runs with half the chunk size of the
attempt before (``retry_chunk_scale``), which is what cures an out-of-memory
error and costs little for the others. Bad input (``BadInputError``) and stage
timeouts fail at once with their message. A worker that dies takes its flow run
with it (Prefect marks it Crashed); the nightly flow picks such sessions up on
its next run, and deployments may set flow-level retries.
"""

from __future__ import annotations

import logging

import torch
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff

from nwbflow.errors import NwbflowError, TransientError

log = logging.getLogger(__name__)

RETRIES = 3
#: Seconds before retry k (0-based): BACKOFF_S * 2**k, each stretched by up to ±50 % jitter.
BACKOFF_S = 5.0


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix; False for bad input, timeouts and bugs."""
    if isinstance(exc, NwbflowError):
        return isinstance(exc, TransientError)
    return isinstance(exc, (OSError, MemoryError, torch.cuda.OutOfMemoryError))


def retry_if_transient(task, task_run_, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    exc = state.result(raise_on_failure=False)
    transient = isinstance(exc, BaseException) and is_transient(exc)
    log.info("task %s failed with %s: %s", task_run_.name, type(exc).__name__,
             "retrying" if transient else "not retried")
    return transient


def retry_chunk_scale() -> float:
    """1 on the first attempt, then halved on each retry (Prefect's run_count starts at 1)."""
    return 0.5 ** max((task_run.run_count or 1) - 1, 0)


STAGE_TASK_OPTIONS = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
