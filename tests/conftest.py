"""Shared fixtures: a private Prefect home, a real (temporary) Prefect server, synthetic sessions."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# Before Prefect is imported anywhere: a private, throw-away Prefect home (SQLite database).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nwbflow-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import pytest  # noqa: E402
import torch  # noqa: E402

#: Motion settings for flow tests on 10-30 s sessions: the pipeline's plumbing, not the fit's accuracy
#: (tests/test_motion.py checks that, benchmarks/motion.py measures it). The defaults would take
#: ~3000 steps (about a minute on CI's CPU) per run.
FAST_MOTION = {"training_steps": 300, "motion_noise_steps": 100, "batch_size": 512, "hidden_features": [32, 32],
               "average_steps": 50, "early_stop_tolerance_um": 0.0, "time_kernel_width_s": 4.0}


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, to prove an input was not modified."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
