"""Cache keys of stage runs and where their artifacts live, so a re-run resumes.

A stage's key hashes the input's identity (path, size, mtime and the content
hash of the series read), the stage's resolved parameters (with the part of the
execution policy that changes results), the nwbflow version and the keys of the
stages it reads from: never a run id. It is computed once per stage run
(``runner.StageSpec.build``). Prefect persists each task's small result under
that key; the artifacts sit in a directory named by the key, with a
``done.json`` marker written last. The runner refreshes a cached stage whose
marker is gone (artifacts deleted), so a cache hit never points at missing or
other-parameter files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nwbflow import __version__
from nwbflow.tasks.artifacts import save_json

DONE_MARKER = "done.json"
#: Versioned: hashes memoized before the value checks (NaN, flat, overflow) ran with them are not reused.
HASH_MEMO = "content-hashes-v2.json"


def stage_key(stage: str, identity: dict, parameters: dict, upstream: tuple[str, ...] = ()) -> str:
    """Hex key of one stage run's result (32 hex digits)."""
    payload = json.dumps({"stage": stage, "input": identity, "parameters": parameters,
                          "nwbflow": __version__, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    """Directory of a stage run's artifacts: ``<workdir>/<stage>-<key[:12]>``."""
    return Path(workdir) / f"{stage}-{key[:12]}"


def is_complete(directory: Path) -> bool:
    """Whether a stage finished writing its artifacts there (its marker is written last)."""
    return (directory / DONE_MARKER).is_file()


def mark_complete(directory: Path, summary: dict, artifacts: dict[str, str]) -> None:
    """Write the marker: the stage's counts and its artifacts (paths relative to ``directory``), the work
    directory's own record of what it holds (the processed file names NWB objects only)."""
    relative = {name: os.path.relpath(path, directory) for name, path in artifacts.items()}
    save_json(directory / DONE_MARKER, {"summary": summary, "artifacts": relative})


def file_identity(path: Path) -> tuple[int, int]:
    """(size bytes, mtime ns) of a file: what changes when its data are touched."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def memoized_content_hash(memo_dir: Path, path: Path, object_path: str, compute) -> str:
    """The content hash of ``object_path`` in ``path``, recomputed only when the file changed.

    ``compute()`` hashes the series (one full read); its result is kept in
    ``memo_dir/content-hashes-v2.json`` keyed by path, object, size and mtime.
    """
    memo_file = memo_dir / HASH_MEMO
    size, mtime_ns = file_identity(path)
    entry_key = f"{os.path.abspath(path)}::{object_path}"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    entry = memo.get(entry_key)
    if entry and entry["size"] == size and entry["mtime_ns"] == mtime_ns:
        return entry["sha256"]
    digest = compute()
    memo[entry_key] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    save_json(memo_file, memo)
    return digest
