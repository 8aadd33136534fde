"""Work-directory artifacts, written atomically so a resumed run never reads half a file.

Each write goes to its own uniquely named temporary (``nwbflow.atomic``), so
two writers of one path (two runs of one stage) cannot mix their bytes: each
renames a whole file into place and the last one wins (the streamed binaries,
``preprocessed.bin`` and ``corrected.bin``, are written the same way by
``nwbflow.ephys.chunk_stream``). Stage directories are also locked by the
stage runner (``nwbflow.tasks.runner.run_stage``), so one stage's artifacts
are never computed twice at once.
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
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return path
