"""Shared fixtures: a private Prefect home, a real (temporary) Prefect server, synthetic sessions."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Before Prefect is imported anywhere: a private, throw-away Prefect home (SQLite database).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nwbflow-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its heartbeat logged "database is locked"

import pytest  # noqa: E402
import torch  # noqa: E402

#: Motion settings for flow tests on 10-30 s sessions: the pipeline's plumbing, not the fit's accuracy
#: (tests/test_motion.py checks that, benchmarks/motion.py measures it). The defaults would take
#: ~3000 steps (about a minute on CI's CPU) per run.
FAST_MOTION = {"training_steps": 300, "motion_noise_steps": 100, "batch_size": 512, "hidden_features": [32, 32],
               "average_steps": 50, "early_stop_tolerance_um": 0.0, "time_kernel_width_s": 4.0}


@contextmanager
def output_locked_by_another_thread(out_path: str | Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold ``out_path``'s output lock in another thread (as another run would) for the ``with`` block."""
    from nwbflow.locks import output_lock

    held, release = threading.Event(), threading.Event()

    def other_run():
        with output_lock(out_path):
            held.set()
            release.wait(2 * timeout_s)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(timeout_s), "the other thread never took the lock"
        yield
    finally:
        release.set()
        thread.join(timeout_s)


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, to prove an input was not modified."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def pipeline_inputs_stay_unchanged():
    """Every pipeline run in this process proves its input file unchanged: SHA-256 before and after.

    ``process_session`` (and through it ``nightly``, the deployments and the CLI) runs its stages in
    ``_run_stages``; wrapped here, a run that changed its input fails with an AssertionError whatever the test
    expected. Tests that run the pipeline in a child process compare the hashes themselves.
    """
    import nwbflow.flows.session as session_flow

    run_stages = session_flow._run_stages

    def run_stages_checking_input(nwb_path, *args, **kwargs):
        path = Path(nwb_path)
        before = sha256_of(path) if path.is_file() else None
        try:
            return run_stages(nwb_path, *args, **kwargs)
        finally:
            assert before is None or sha256_of(path) == before, f"the pipeline changed its input {path}"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_flow, "_run_stages", run_stages_checking_input)
        yield


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def device(request) -> str:
    """Every kernel test runs on the CPU, and on CUDA where there is one."""
    return request.param


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (uvicorn subprocess, temporary SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def small_session(tmp_path_factory) -> Path:
    """A 10 s, 32-channel, 8-unit synthetic session with ophys, written once per test session."""
    from nwbflow.synth import SynthConfig, write_synthetic_session

    path = tmp_path_factory.mktemp("sessions") / "small.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=10.0, num_channels=32, num_units=8,
                                              num_rois=6, seed=7))
    return path
