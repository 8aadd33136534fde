"""Work-directory artifacts, written atomically so a resumed run never reads half a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nwbflow.atomic import atomic_path


def save_json(path: Path, payload: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return path
