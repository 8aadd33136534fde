"""The one stage runner: cache key, stage directory and its lock, done marker, refresh, device, provenance.

A stage run is decided by the flow before it runs, as a :class:`StageSpec` (:meth:`StageSpec.build`
computes its cache key, once). :func:`run_stage` holds the stage directory's lock (two runs of one
input wait for each other instead of writing one directory), recomputes a stage whose done marker is
gone, and calls the task with the spec, whose key is the task's Prefect cache key. Inside the task,
:class:`StageRun` does what every stage does around its kernel: the directory, the GPU slot and
threads, progress with the stage's time limit, and, once the artifacts are written, the provenance
row and the done marker (written last, so a killed stage is recomputed). A task body is then only
"read, call the kernel, write the artifacts".
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect.concurrency.sync import concurrency

from nwbflow.device import release_freed_host_memory, torch_threads, tune_host_allocator
from nwbflow.errors import BadInputError
from nwbflow.locks import directory_lock
from nwbflow.nwb_io.provenance import ProvenanceRecord
from nwbflow.params import ExecutionPolicy
from nwbflow.tasks.caching import is_complete, mark_complete, stage_dir, stage_key
from nwbflow.tasks.progress import StageProgress
from nwbflow.tasks.provenance import SeriesInput, stage_record, utc_now
from nwbflow.tasks.retries import RETRY_OPTIONS

log = logging.getLogger(__name__)

#: Name of the Prefect global concurrency limit GPU stages hold (one slot per GPU). Where no limit of
#: that name exists, stages run unthrottled (Prefect logs it): ``prefect gcl create gpu --limit N``.
GPU_LIMIT = "gpu"


@dataclass(frozen=True)
class StageSpec:
    """One stage run: what the runner and the task need besides the data. Small; travels to the task.

    Attributes
    ----------
    stage : str
    key : str
        The cache key (32 hex digits), computed once by :meth:`build`.
    directory : str
        The stage's artifact directory, ``<workdir>/<stage>-<key[:12]>``.
    nwb_path : str
        The input file (opened only by plan, preprocess, calcium, a SpikeInterface sorter and write-back).
    series : str
        Object path of the series the stage works on.
    parameters : dict
        The resolved stage parameters, plus what else decides the result (e.g. a network's checksum).
    policy : ExecutionPolicy
    device : str
        The device, resolved once by the flow ("cpu", "cuda", ...).
    inputs : tuple of SeriesInput
        The NWB objects the stage's results derive from, with their content hashes.
    upstream : tuple of str
        Keys of the stages whose artifacts it reads.
    """

    stage: str
    key: str
    directory: str
    nwb_path: str
    series: str
    parameters: dict
    policy: ExecutionPolicy
    device: str
    inputs: tuple[SeriesInput, ...]
    upstream: tuple[str, ...] = ()

    @classmethod
    def build(cls, stage: str, *, workdir: str | Path, nwb_path: str, file_identity: dict, series: str,
              parameters: dict, policy: ExecutionPolicy, device: str, inputs: tuple[SeriesInput, ...],
              upstream: tuple[str, ...] = ()) -> StageSpec:
        """The spec, its key hashing the file's identity, the inputs' hashes, the parameters, the part of
        the policy that changes results, the code version and the upstream keys."""
        identity = {"file": file_identity, "inputs": [i.as_dict() for i in inputs]}
        key = stage_key(stage, identity, {**parameters, "execution": policy.result_affecting(stage)}, upstream)
        return cls(stage, key, str(stage_dir(workdir, stage, key)), nwb_path, series, parameters, policy, device,
                   inputs, upstream)

    @property
    def path(self) -> Path:
        return Path(self.directory)

    def provenance_parameters(self, device: str, notes: tuple[str, ...] = ()) -> str:
        """The parameters and the execution policy as the stage ran (on ``device``), as JSON; ``notes`` (what
        the stage found and acted on) are added to the plan's."""
        parameters = {**self.parameters, "execution": self.policy.for_provenance(self.stage, device)}
        if notes:
            parameters["notes"] = [*parameters.get("notes", []), *notes]
        return json.dumps(parameters, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class StageOutcome:
    """A finished stage: its key and directory, timing, artifacts (name -> path), counts, provenance row."""

    stage: str
    key: str
    directory: str
    seconds: float
    provenance: ProvenanceRecord
    artifacts: dict[str, str] = field(default_factory=dict)
    summary: dict[str, float | int | str] = field(default_factory=dict)


def _spec_key(_context, parameters: dict) -> str:
    return parameters["spec"].key


#: Options of every stage task: its result persisted under the spec's key, transient errors retried,
#: its task runs named by stage and series ("preprocess acquisition/ElectricalSeriesAPImec0").
STAGE_TASK = {"persist_result": True, "cache_key_fn": _spec_key, "task_run_name": "{spec.stage} {spec.series}",
              **RETRY_OPTIONS}


def run_stage(task, spec: StageSpec, *args):
    """Run a stage task on ``spec`` while holding the lock of its directory.

    Two runs of the same input (e.g. to two outputs) share stage directories; the second waits
    for the first and then finds the stage Cached, so no artifact is ever written by two runs at
    once. A stage whose done marker is gone (artifacts deleted) is recomputed instead of read from
    the cache. A BadInputError from a kernel (kernels know no file) gets the input file and series.
    """
    with directory_lock(spec.path):
        chosen = task if is_complete(spec.path) else task.with_options(refresh_cache=True)
        try:
            return chosen(spec, *args)
        except BadInputError as exc:
            if exc.path is not None:
                raise
            raise BadInputError(f"{spec.stage}: {exc.message}", path=spec.nwb_path, obj=exc.obj or spec.series,
                                fix=exc.fix) from exc


class StageRun:
    """What a stage task does around its kernel, as a ``with`` block (see the module docstring).

    ``device`` is the spec's device; CUDA stages hold a slot of the ``gpu`` concurrency limit for the
    block. glibc's malloc is tuned first (:func:`~nwbflow.device.tune_host_allocator`) and torch's
    threads set to the policy's. :meth:`finish` returns the outcome once the artifacts are written.
    """

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.directory = spec.path
        self.device = torch.device(spec.device)
        self._stack = ExitStack()

    def __enter__(self) -> StageRun:
        self.started, self._clock = utc_now(), time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        tune_host_allocator()
        self._stack.enter_context(torch_threads(self.spec.policy.cpu_threads()))
        if self.device.type == "cuda":
            self._stack.enter_context(concurrency(GPU_LIMIT, occupy=1))
        log.info("stage %s runs on %s", self.spec.stage, self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()
        release_freed_host_memory()  # what the stage freed goes back to the OS before the next stage

    def enter(self, context):
        """Enter ``context`` (e.g. an open NWB session) for the rest of the block; returns what it gives."""
        return self._stack.enter_context(context)

    def progress(self, total: int, unit: str = "samples") -> StageProgress:
        """A progress callback (bar, UI artifact) that stops the stage past its time limit; closed with the block."""
        progress = StageProgress(self.spec.stage, total, self.spec.policy.stage_timeout_s, unit=unit)
        self._stack.callback(progress.close)
        return progress

    def finish(self, artifacts: dict[str, str | Path], summary: dict, *, device: str | None = None,
               recording_s: float | None = None, notes: tuple[str, ...] = ()) -> StageOutcome:
        """Write the provenance row and the done marker (last); the stage's outcome.

        ``device`` overrides the device recorded (e.g. "none" for a stage that had nothing to compute);
        ``recording_s``, the duration of the recording processed (s), adds ``x_realtime`` to the summary;
        ``notes`` go into the provenance row's parameters (``notes``).
        """
        device = str(self.device) if device is None else device
        if recording_s is not None:
            summary = {**summary, "x_realtime": round(recording_s / max(time.perf_counter() - self._clock, 1e-9), 1)}
        artifacts = {name: str(path) for name, path in artifacts.items()}
        # The row's outputs are the NWB objects write-back puts the results in; artifacts stay in done.json.
        record = stage_record(self.spec.stage, parameters_json=self.spec.provenance_parameters(device, notes),
                              inputs=self.spec.inputs, outputs=(), start_time_utc=self.started, device=device)
        mark_complete(self.directory, summary, artifacts)
        return StageOutcome(self.spec.stage, self.spec.key, self.spec.directory, time.perf_counter() - self._clock,
                            record, artifacts, summary)
