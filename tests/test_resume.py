"""Resume after a kill, retries of transient failures only, stage timeouts, the GPU slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prefect import flow
from prefect.settings import PREFECT_API_URL

from conftest import FAST_MOTION, sha256_of
from nwbflow.errors import BadInputError, StageTimeoutError
from nwbflow.flows.session import process_session
from nwbflow.params import PeakParams, SessionParams
from nwbflow.synth import SynthConfig, write_synthetic_session
from nwbflow.tasks import preprocess as preprocess_tasks
from nwbflow.tasks.plan import plan_session

PARAMS = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION)

RUNNER = """
import sys
from nwbflow.flows.session import process_session
from nwbflow.params import SessionParams
process_session(sys.argv[1], sys.argv[2], SessionParams.model_validate_json(sys.argv[4]), sys.argv[3])
"""


@pytest.fixture(scope="module")
def long_session(tmp_path_factory) -> Path:
    """60 s x 32 channels: peaks take long enough (> 1 s) to be killed in the middle."""
    path = tmp_path_factory.mktemp("resume") / "long.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=60.0, num_channels=32, num_units=10, ophys=False, seed=3))
    return path


def _task_states(state) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    flow_run_id = state.state_details.flow_run_id
    # stage task runs are named "<stage> <series>", the others "<task>-<suffix>"
    return {r.name.split(" ")[0].rsplit("-", 1)[0]: r.state.name for r in runs if r.flow_run_id == flow_run_id}


def test_killed_run_resumes_recomputing_only_unfinished_stages(prefect_server, long_session, tmp_path):
    before = sha256_of(long_session)
    out, workdir = tmp_path / "out.nwb", tmp_path / "work"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(long_session), str(out), str(workdir),
                               PARAMS.model_dump_json()],
                              env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),  # the tests' server
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not list(workdir.glob("*/peaks-*/.peaks.parquet.*.partial")):  # peaks stage is under way
            assert runner.poll() is None, "the flow ended before the peaks stage could be killed"
            assert time.monotonic() < deadline, "the peaks stage never started"
            time.sleep(0.01)
        runner.send_signal(signal.SIGKILL)
    finally:
        runner.kill()
        runner.wait(timeout=60)
    assert not out.exists()
    preprocess_done = next(workdir.glob("*/preprocess-*/done.json"))
    finished_at = preprocess_done.stat().st_mtime_ns
    state = process_session(str(long_session), str(out), PARAMS, str(workdir), return_state=True)
    assert state.is_completed()
    states = _task_states(state)
    assert states["preprocess"] == "Cached", states
    assert states["peaks"] == "Completed", states
    assert preprocess_done.stat().st_mtime_ns == finished_at  # not recomputed
    assert next(workdir.glob("*/peaks-*/done.json")).is_file() and out.is_file()
    assert sha256_of(long_session) == before
    # A third run on unchanged input recomputes nothing.
    again = process_session(str(long_session), str(out), PARAMS, str(workdir), return_state=True)
    assert {k: v for k, v in _task_states(again).items() if k in ("preprocess", "peaks")} == {
        "preprocess": "Cached", "peaks": "Cached"}


def test_parameter_change_or_deleted_artifacts_recompute(prefect_server, small_session, tmp_path):
    workdir = tmp_path / "work"
    process_session(str(small_session), str(tmp_path / "a.nwb"), PARAMS, str(workdir))
    changed = SessionParams(execution={"device": "cpu"}, motion=FAST_MOTION, peaks=PeakParams(threshold_mad=6.0))
    states = _task_states(process_session(str(small_session), str(tmp_path / "b.nwb"), changed, str(workdir),
                                          return_state=True))
    assert (states["preprocess"], states["peaks"]) == ("Cached", "Completed")
    for marker in workdir.glob("*/preprocess-*/done.json"):
        marker.unlink()  # as if someone cleaned the work directory
    states = _task_states(process_session(str(small_session), str(tmp_path / "c.nwb"), changed, str(workdir),
                                          return_state=True))
    assert states["preprocess"] == "Completed", states


def _run_preprocess_task(small_session, workdir):
    """The preprocess task alone, in a flow, on a fresh plan (no cache, retries without delay)."""
    plan = plan_session(small_session, PARAMS, workdir)
    task = preprocess_tasks.preprocess_task.with_options(retry_delay_seconds=0, refresh_cache=True)

    @flow
    def run():
        return task(plan.spec(plan.series[0], "preprocess", PARAMS, {}), PARAMS.preprocess, {})

    return run()


def test_out_of_memory_is_the_kernels_to_cure_not_a_prefect_retry(prefect_server, small_session, tmp_path,
                                                                   monkeypatch):
    """An out-of-memory error that reaches the task (the kernel's backoff could not cure it) fails the stage at
    once: halving the chunk is the kernels' job (tests/test_preprocess.py), Prefect retries I/O only."""
    calls = []

    def out_of_memory(*_args, **_kwargs):
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(preprocess_tasks, "preprocess_to_binary", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _run_preprocess_task(small_session, tmp_path / "work")
    assert calls == [1]


def test_a_transient_io_error_is_retried(prefect_server, small_session, tmp_path, monkeypatch):
    calls = []
    real = preprocess_tasks.preprocess_to_binary

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess_tasks, "preprocess_to_binary", flaky)
    outcome = _run_preprocess_task(small_session, tmp_path / "work")
    assert calls == [1, 1] and Path(outcome.artifacts["preprocessed"]).is_file()


def test_bad_input_is_not_retried(prefect_server, small_session, tmp_path, monkeypatch):
    calls = []

    def bad(*_args, **_kwargs):
        calls.append(1)
        raise BadInputError("NaN in samples 0-10", path=small_session, obj="acquisition/ElectricalSeries")

    monkeypatch.setattr(preprocess_tasks, "preprocess_to_binary", bad)
    with pytest.raises(BadInputError, match="NaN"):
        _run_preprocess_task(small_session, tmp_path / "work")
    assert calls == [1]


def test_stage_timeout_stops_the_stage_without_retry(prefect_server, long_session, tmp_path):
    params = SessionParams(execution={"device": "cpu", "stage_timeout_s": 0.5}, motion=FAST_MOTION)
    with pytest.raises(StageTimeoutError, match="preprocess"):
        process_session(str(long_session), str(tmp_path / "out.nwb"), params, str(tmp_path / "work"))
    assert not (tmp_path / "out.nwb").exists()
    assert not list((tmp_path / "work").glob("*/preprocess-*/preprocessed.bin"))


def test_cuda_stage_holds_the_gpu_slot(prefect_server, tmp_path):
    """On CUDA a stage takes a slot of the `gpu` global concurrency limit (no GPU needed: the slot is Prefect's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from nwbflow.params import ExecutionPolicy
    from nwbflow.tasks.provenance import SeriesInput
    from nwbflow.tasks.runner import GPU_LIMIT, StageRun, StageSpec

    spec = StageSpec.build("preprocess", workdir=tmp_path, nwb_path="x.nwb", file_identity={}, series="acquisition/x",
                           parameters={}, policy=ExecutionPolicy(), device="cuda:0",
                           inputs=(SeriesInput("x.nwb", "raw-1", "acquisition/x", "sha256:0"),))
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        with StageRun(spec) as run:
            assert run.device.type == "cuda"
            held = client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots
        released = client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots
    assert (held, released) == (1, 0)
