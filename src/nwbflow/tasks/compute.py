"""The compute device of a stage: resolved once per task, logged, GPU slots held while used."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from prefect.concurrency.sync import concurrency

from nwbflow.device import resolve_device, tune_host_allocator

log = logging.getLogger(__name__)

#: Name of the Prefect global concurrency limit GPU stages hold (one slot per GPU).
GPU_LIMIT = "gpu"


@contextmanager
def stage_device(requested: str, stage: str) -> Iterator[torch.device]:
    """Resolve ``requested`` ("auto" | "cpu" | "cuda") and hold a ``gpu`` slot while on CUDA.

    The host allocator is tuned first (:func:`~nwbflow.device.tune_host_allocator`).

    Global concurrency limits hand a slot to the next waiter faster than tag
    limits. Where no limit named ``gpu`` exists, the stage runs unthrottled
    (Prefect logs that); create one with ``prefect gcl create gpu --limit N``.
    """
    tune_host_allocator()
    device = resolve_device(requested)
    log.info("stage %s runs on %s", stage, device)
    if device.type != "cuda":
        yield device
        return
    with concurrency(GPU_LIMIT, occupy=1):
        yield device
