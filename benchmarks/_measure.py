"""What the benchmark scripts measure the same way (imported from the scripts' own folder)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, MB). Unlike ``ru_maxrss``, it is not inherited across
    exec from the parent (which may have held the generated recording)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_env(threads: int, device: str) -> dict[str, str]:
    """The environment of a row's child process: ``threads`` for every thread pool (OpenMP, MKL,
    OpenBLAS, numba), and CUDA hidden on ``device == "cpu"`` (some packages pick CUDA by themselves)."""
    env = dict(os.environ, **{name: str(threads) for name in
                              ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")})
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(command: list[str], row: str, env: dict[str, str] | None = None) -> dict:
    """Run one row's child process; its result is the JSON on its last stdout line. Raises on failure."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
