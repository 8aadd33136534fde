"""Two runs at once vs one alone, under nwbflow's thread policy and under libgomp's default spin.

The case of issue 23: a worker beside another job, or two workers, on this 2-core machine. Rows:

  fit       MEDiCINe's fit alone (``--fit-steps`` steps, ``--fit-peaks`` random peaks over 300 s, 2 threads),
            then two such processes started together
  run       the whole ``nwbflow run`` (every stage, its own temporary Prefect server) on a seeded
            ``--num-channels``-channel ``--duration-s`` drifting session, alone, then two started together
            on the same input (each with its own work directory and output: nothing is shared or cached)

each under two policies:

  nwbflow   the environment as it is (nwbflow sets ``GOMP_SPINCOUNT=1000`` when imported; nothing else set)
  spin      ``GOMP_SPINCOUNT=300000``: libgomp's own default, what every run had before the thread policy

``x alone`` is each run's wall time at once over the same row's time alone (2.0 is a fair share of two
cores; the target is <= 2.5). Prints a table and writes JSON. Measure with nothing else running.

    .venv/bin/python benchmarks/concurrency.py --out benchmarks/results/concurrency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENVIRON_AT_START = dict(os.environ)  # before nwbflow (imported next) sets its OpenMP spin

from nwbflow.report import format_table  # noqa: E402

POLICIES = {"nwbflow": {}, "spin": {"GOMP_SPINCOUNT": "300000"}}
FIT = """
import nwbflow  # first, as in a flow run: its thread policy must come before torch loads libgomp
import sys, time, numpy as np, torch
from nwbflow.device import tune_host_allocator
from nwbflow.ephys.motion.medicine import estimate_motion
from nwbflow.params import MotionParams
tune_host_allocator()
peaks, steps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
t = rng.uniform(0, 300, peaks)
clock = time.perf_counter()
estimate_motion(t, rng.uniform(0, 3800, peaks) + 10 * np.sin(t / 30), rng.gamma(3, 30, peaks),
                MotionParams(training_steps=steps))
print(time.perf_counter() - clock)
"""


def _env(policy: str) -> dict[str, str]:
    """This process's environment before nwbflow was imported (``ENVIRON_AT_START``), with ``policy``'s settings."""
    return {**ENVIRON_AT_START, **POLICIES[policy], "CUDA_VISIBLE_DEVICES": ""}


def _timed(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> list[float]:
    """Start every command at once; the wall time of each (s). Raises if one fails."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT) for c, log in
             zip(commands, logs)]
    seconds = [0.0] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                seconds[i] = time.perf_counter() - started
                pending.discard(i)
        time.sleep(0.05)
    for proc, log in zip(procs, logs):
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def _row(kind: str, policy: str, commands, work: Path) -> dict:
    env = _env(policy)
    alone = _timed([commands(work / f"{kind}-{policy}-alone")], env, [work / f"{kind}-{policy}-alone.log"])[0]
    pair = _timed([commands(work / f"{kind}-{policy}-pair{i}") for i in (0, 1)], env,
                  [work / f"{kind}-{policy}-pair{i}.log" for i in (0, 1)])
    row = {"kind": kind, "policy": policy, "alone_s": round(alone, 1), "together_s": [round(s, 1) for s in pair],
           "x_alone": round(max(pair) / alone, 2)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-channels", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--fit-peaks", type=int, default=20000)
    parser.add_argument("--fit-steps", type=int, default=600)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--kinds", nargs="+", default=["fit", "run"], choices=["fit", "run"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/concurrency.json"))
    args = parser.parse_args()
    nwbflow = str(Path(sys.executable).with_name("nwbflow"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="nwbflow-concurrency-") as tmp:
        work = Path(tmp)
        session = work / "session.nwb"
        subprocess.run([nwbflow, "synth", str(session), "--num-channels", str(args.num_channels), "--duration-s",
                        str(args.duration_s), "--drift", "--no-ophys"], check=True, capture_output=True)
        commands = {
            "fit": lambda out: [sys.executable, "-c", FIT, str(args.fit_peaks), str(args.fit_steps)],
            "run": lambda out: [nwbflow, "run", str(session), "-o", str(out) + ".nwb", "--workdir", str(out),
                                "--device", "cpu"],
        }
        for kind in args.kinds:
            for policy in args.policies:
                rows.append(_row(kind, policy, commands[kind], work))
    header = ["row", "policy", "alone s", "two at once s", "x alone"]
    print(format_table(header, [[r["kind"], r["policy"], r["alone_s"], " / ".join(map(str, r["together_s"])),
                                 r["x_alone"]] for r in rows], 100))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                    "session": {"num_channels": args.num_channels, "duration_s": args.duration_s},
                                    "fit": {"peaks": args.fit_peaks, "steps": args.fit_steps}, "rows": rows},
                                   indent=2))


if __name__ == "__main__":
    main()
