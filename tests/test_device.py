"""The host allocator tuning: freed tensor memory is reused instead of being mapped again page by page."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")

# Minor page faults per step of a MEDiCINe fit (default batch and network: (8192, 96) activations).
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    from nwbflow.device import tune_host_allocator
    from nwbflow.ephys.motion.medicine import estimate_motion
    from nwbflow.params import MotionParams
    torch.set_num_threads(1)
    tuned = tune_host_allocator() if sys.argv[1] == "tune" else None
    rng = np.random.default_rng(0)
    peaks = rng.uniform(0, 60, 20000), rng.uniform(0, 300, 20000), rng.uniform(20, 200, 20000)
    params = MotionParams(training_steps=100, motion_noise_steps=50, early_stop_tolerance_um=0)
    estimate_motion(*peaks, params.model_copy(update={"training_steps": 10}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    estimate_motion(*peaks, params)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / params.training_steps
    print(json.dumps({"tuned": tuned, "faults_per_step": faults}))
""")


def _run(code: str, *args: str, **env: str) -> str:
    """Last stdout line of ``code`` run in a fresh interpreter, malloc variables replaced by ``env``."""
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()[-1]


def _probe(mode: str) -> dict:
    return json.loads(_run(_PROBE, mode))


def test_tuned_allocator_reuses_freed_tensor_memory():
    default, tuned = _probe("default"), _probe("tune")
    # Measured on the 2-core VM: 1100-1600 faults per step with glibc's defaults, 1-26 tuned. Late in two full
    # test runs the default's count was 189 and 204 (the machine's memory state; not pinned down further), so
    # the check is relative: tuned, at least 4x fewer faults than the default, and under 100.
    assert tuned["tuned"] is True and tuned["faults_per_step"] < 100
    assert tuned["faults_per_step"] * 4 < default["faults_per_step"], (default, tuned)


def test_malloc_settings_from_the_environment_are_left_in_charge():
    tune = "from nwbflow.device import tune_host_allocator; print(tune_host_allocator())"
    assert _run(tune) == "True"
    assert _run(tune, MALLOC_TOP_PAD_="1") == "False"


def test_freed_heap_memory_goes_back_to_the_os_at_most_once_per_interval(monkeypatch):
    import nwbflow.device as device_module
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    calls = []
    monkeypatch.setattr(device_module, "_malloc_trim", lambda: (lambda pad: calls.append(pad) or 1))
    monkeypatch.setattr(device_module, "_last_trim_s", [float("-inf")])
    assert device_module.release_freed_host_memory(60.0)
    assert not device_module.release_freed_host_memory(60.0)  # within the interval: not again
    assert device_module.release_freed_host_memory()  # a stage's end: always
    assert calls == [0, 0]
    seen = []
    backoff = device_module.OomBackoff(10)
    monkeypatch.setattr(device_module, "_last_trim_s", [float("-inf")])
    backoff.run(lambda lo, hi: seen.append((lo, hi)), 0, 30)
    assert seen == [(0, 10), (10, 20), (20, 30)] and calls == [0, 0, 0]  # one trim for three quick steps
