"""Retry policy of the stage tasks: transient I/O failures only, exponential backoff with jitter.

Retried: I/O errors (``OSError``, which h5py's errors are) and ``TransientError``. Out-of-memory
errors are not Prefect's to retry: the kernels halve their chunk and go on within the same run
(``nwbflow.device.OomBackoff``). Bad input (``BadInputError``) and stage timeouts fail at once with
their message. A worker that dies takes its flow run with it (Prefect marks it Crashed); the
nightly flow picks such sessions up on its next run, and deployments may set flow-level retries.
"""

from __future__ import annotations

import logging

from prefect.tasks import exponential_backoff

from nwbflow.device import is_out_of_memory
from nwbflow.errors import NwbflowError, TransientError

log = logging.getLogger(__name__)

RETRIES = 3
#: Seconds before retry k (0-based): BACKOFF_S * 2**k, each stretched by up to ±50 % jitter.
BACKOFF_S = 5.0


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix (I/O); False for bad input, timeouts, out of memory and bugs."""
    if isinstance(exc, NwbflowError):
        return isinstance(exc, TransientError)
    return isinstance(exc, OSError) and not is_out_of_memory(exc)


def retry_if_transient(task, task_run_, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    exc = state.result(raise_on_failure=False)
    transient = isinstance(exc, BaseException) and is_transient(exc)
    log.info("task %s failed with %s: %s", task_run_.name, type(exc).__name__,
             "retrying" if transient else "not retried")
    return transient


RETRY_OPTIONS = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
