"""Work-directory artifacts, written atomically so a resumed run never reads half a file.

Each write goes to its own uniquely named temporary (``nwbflow.atomic``), so
two writers of one path (two runs of one stage) cannot mix their bytes: each
renames a whole file into place and the last one wins. Stage directories are
also locked by the flow (``nwbflow.locks.directory_lock``), because the
streamed binaries (``preprocessed.bin``, ``corrected.bin``) use a fixed
``.partial`` name.
"""

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
