"""The thread policy (nwbflow.cpu_threads): how OpenMP threads wait, and a run's share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nwbflow.cpu_threads import (OPENMP_SPIN_COUNT, RUNS_AT_ONCE_ENV, default_threads, settle_openmp_waiting,
                                 usable_cores, worker_environment)
from nwbflow.device import torch_threads
from nwbflow.params import ExecutionPolicy

_CLEAN = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", RUNS_AT_ONCE_ENV)}


def _python(code: str, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", code], env={**_CLEAN, **env}, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_importing_nwbflow_sets_a_short_openmp_spin_before_torch_loads():
    # What a flow run's process does first: import nwbflow (the flow module), then torch comes with it.
    out = _python("import sys, os; import nwbflow.flows.session; "
                  "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    assert out == f"{OPENMP_SPIN_COUNT} True"
    out = _python("import sys, os; import nwbflow; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    assert out == f"{OPENMP_SPIN_COUNT} False"  # set before anything of ours imports torch


def test_importing_torch_first_is_warned_about():
    # Too late for libgomp, which read its spin when torch loaded it: the user is told what to do.
    done = subprocess.run([sys.executable, "-c", "import torch, logging; logging.basicConfig(); import nwbflow"],
                          env=_CLEAN, check=True, capture_output=True, text=True)
    assert "torch was imported before nwbflow" in done.stderr and "GOMP_SPINCOUNT=1000" in done.stderr


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")])
def test_a_users_own_openmp_wait_setting_is_left_in_charge(name, value):
    out = _python("import os, nwbflow; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))",
                  **{name: value})
    assert out == ("ACTIVE None" if name == "OMP_WAIT_POLICY" else "None 300000")
    assert settle_openmp_waiting({name: value}) is None


def test_a_run_takes_its_share_of_the_cores_it_may_use():
    cores = usable_cores()
    assert default_threads({}) == cores
    assert default_threads({RUNS_AT_ONCE_ENV: "2"}) == max(cores // 2, 1)
    assert default_threads({RUNS_AT_ONCE_ENV: "not a number"}) == cores
    # A process narrowed to one CPU (taskset, a container's cpuset) takes one thread.
    out = _python("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
                  "from nwbflow.params import ExecutionPolicy; print(ExecutionPolicy().cpu_threads())")
    assert out == "1"


def test_a_stage_runs_with_the_policys_threads_and_records_them(monkeypatch):
    monkeypatch.setenv(RUNS_AT_ONCE_ENV, str(10 * usable_cores()))
    policy = ExecutionPolicy()
    assert policy.cpu_threads() == 1 and policy.for_provenance("peaks", "cpu")["threads"] == 1
    assert ExecutionPolicy(threads=3).for_provenance("peaks", "cpu")["threads"] == 3
    before = torch.get_num_threads()
    with torch_threads(policy.cpu_threads()):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_worker_tells_its_runs_how_many_share_the_cores():
    env = worker_environment(["--pool", "p", "-l", "4"], {"PATH": "/bin"})
    assert env == {"PATH": "/bin", RUNS_AT_ONCE_ENV: "4"}
    assert worker_environment(["--pool", "p", "--limit", "4"], {RUNS_AT_ONCE_ENV: "2"})[RUNS_AT_ONCE_ENV] == "2"
