"""Resolve the compute device once, at the task boundary; out-of-memory helpers."""

from __future__ import annotations

import logging

import torch

from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)


def resolve_device(requested: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda[:N]" into a torch.device, checking it exists."""
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInputError("device 'cuda' was asked for but no CUDA device is available",
                                fix="use --device cpu or auto")
    log.info("compute device: %s", device)
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device (CUDA) or host out-of-memory error."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
