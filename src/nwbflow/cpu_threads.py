"""How nwbflow shares the CPU with whatever else runs on the machine: the thread policy.

Two rules, each with one home here:

1. **OpenMP threads wait passively after a short spin.** torch's CPU kernels
   run on an OpenMP pool (GNU libgomp in the pip builds). By default an idle
   libgomp thread spins ~300 000 times before it sleeps, which is right when
   the process owns its cores and ruinous when it does not: with two runs on
   two cores, each run's threads spin on cores the other needs at every one of
   the thousands of small ops of a MEDiCINe fit. Measured on the 2-core VM
   (a 600-step fit, 20 000 peaks, 2 threads): 6.8 s alone, 40 s each with two
   at once (a 6x collapse); with a spin of ``OPENMP_SPIN_COUNT`` iterations:
   6.1 s alone, 10.6 s each with two at once. :func:`settle_openmp_waiting`
   sets ``GOMP_SPINCOUNT`` before torch loads libgomp (``import nwbflow`` calls
   it); a user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is left in
   charge.
2. **A run's threads are its share of the cores.** Unless the run's
   ``execution.threads`` says otherwise, a stage uses the cores this process
   may run on (its CPU affinity, which containers and ``taskset`` narrow)
   divided by the runs that share them: ``NWBFLOW_RUNS_AT_ONCE``, which
   ``nwbflow worker --limit N`` sets for its flow runs (default 1). See
   :func:`default_threads`.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

#: Spins of an idle libgomp thread before it sleeps (libgomp's own default: 300 000).
OPENMP_SPIN_COUNT = 1000
#: Environment variables through which a user (or a worker) decides how OpenMP threads wait.
OPENMP_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: How many runs share this machine's cores; ``nwbflow worker --limit N`` sets it for its runs.
RUNS_AT_ONCE_ENV = "NWBFLOW_RUNS_AT_ONCE"


def settle_openmp_waiting(environ: dict | None = None) -> str | None:
    """Set ``GOMP_SPINCOUNT`` to ``OPENMP_SPIN_COUNT`` unless the environment already decides how OpenMP waits.

    Effective only before libgomp is loaded (``import torch``): ``nwbflow/__init__.py`` calls it first
    thing, and a worker's flow runs inherit it. Returns the variable it set, or None.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in OPENMP_WAIT_SETTINGS):
        return None
    environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    if "torch" in sys.modules and environ is os.environ:
        log.warning("torch was imported before nwbflow, so its OpenMP threads keep libgomp's long spin: two jobs "
                    "sharing these cores will slow each other severalfold; import nwbflow first, or set "
                    "GOMP_SPINCOUNT=%d in the environment", OPENMP_SPIN_COUNT)
    return "GOMP_SPINCOUNT"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity; the machine's count where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runs_at_once(environ: dict | None = None) -> int:
    """Runs sharing this machine's cores, from ``NWBFLOW_RUNS_AT_ONCE`` (1 when unset or not a positive integer)."""
    value = (os.environ if environ is None else environ).get(RUNS_AT_ONCE_ENV, "")
    try:
        return max(int(value), 1)
    except ValueError:
        if value:
            log.warning("%s=%r is not a whole number; taking 1", RUNS_AT_ONCE_ENV, value)
        return 1


def default_threads(environ: dict | None = None) -> int:
    """Threads one run's stages use when ``execution.threads`` is unset: its share of the usable cores, >= 1.

    >>> default_threads({RUNS_AT_ONCE_ENV: "1"}) == usable_cores()
    True
    >>> default_threads({RUNS_AT_ONCE_ENV: str(10 * usable_cores())})
    1
    """
    return max(usable_cores() // runs_at_once(environ), 1)


def worker_environment(worker_args: list[str], environ: dict | None = None) -> dict:
    """The environment of ``prefect worker start WORKER_ARGS``: ours, plus ``NWBFLOW_RUNS_AT_ONCE`` from its
    ``--limit`` (the flow runs it runs at once, which then share the cores), unless already set.

    >>> worker_environment(["--pool", "p", "--limit", "2"], {})[RUNS_AT_ONCE_ENV]
    '2'
    >>> worker_environment(["--pool", "p", "--limit=3"], {})[RUNS_AT_ONCE_ENV]
    '3'
    >>> RUNS_AT_ONCE_ENV in worker_environment(["--pool", "p"], {})
    False
    """
    environ = dict(os.environ if environ is None else environ)
    limit = None
    for i, arg in enumerate(worker_args):
        if arg in ("--limit", "-l") and i + 1 < len(worker_args):
            limit = worker_args[i + 1]
        elif arg.startswith("--limit="):
            limit = arg.split("=", 1)[1]
    if limit is not None and RUNS_AT_ONCE_ENV not in environ:
        environ[RUNS_AT_ONCE_ENV] = limit
    return environ
