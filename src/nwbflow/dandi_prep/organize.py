"""Put files under their DANDI names without ever changing the originals or files we did not write.

A raw file, or a processed one that needs no metadata, is hard-linked to its
DANDI path (same bytes, no copy; ``files_mode="copy"``, or a link refused
across file systems, copies it instead). A processed file that gets
``meta.yaml`` metadata is copied and patched under a staging name, checked
there, and renamed to its DANDI path only when it is ready. Every write goes
through a temporary beside its target and an atomic rename, so a killed run
leaves each DANDI path absent, as it was, or complete.

What was placed is recorded in ``<out>/.nwbflow-dandi-prep/placed.json``
(DANDI path -> source, how, and the placed file's inode, size and mtime). A
file at a DANDI path is replaced or removed only if it is provably ours: a hard
link to the source, an identical copy (same size and mtime), or what the
record says we put there. Anything else is left alone and the asset is
reported blocked. The record also lets a later run reuse a patched copy while
its source and metadata are unchanged.

Hard links share the original's bytes: never edit organized files in place
(nothing in dandi does); use ``files_mode="copy"`` for independent copies.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from nwbflow.atomic import atomic_path, fsync
from nwbflow.nwb_io.dandi_patch import MetadataPatch, write_patched_copy

log = logging.getLogger(__name__)

#: Hidden (dandi skips dot-paths) folder of dandi-prep's own files inside the Dandiset folder.
STATE_DIR = ".nwbflow-dandi-prep"
PLACED_RECORD = "placed.json"
STAGING = "staging"
#: errno values of a refused hard link (another file system, not supported, too many links).
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def is_ours(source: Path, target: Path, entry: dict | None) -> bool:
    """Whether the file at ``target`` may be replaced or removed for ``source``.

    True for a hard link to ``source``, an identical copy of it (same size and mtime, as
    ``shutil.copy2`` leaves it), or the file ``entry`` (our record of ``target``) describes.
    """
    if not target.is_file():
        return False
    if target.samefile(source) or _same_copy(source, target):
        return True
    stat = _stat_of(target)
    return entry is not None and stat == {k: entry.get(k) for k in stat}


def link_or_copy(source: Path, target: Path, files_mode: str) -> str:
    """Make ``target`` hold ``source``'s bytes; returns how: "hardlink", "copy" or "unchanged (...)".

    ``files_mode`` is "hardlink" (falls back to a copy where links are refused) or "copy". The caller
    has checked with :func:`is_ours` that an existing ``target`` may be replaced; it is replaced
    atomically unless it already is ``source`` (same inode) or an identical copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and target.samefile(source):
        return "unchanged (hard link)"
    if files_mode == "hardlink":
        try:
            with atomic_path(target, suffix=".nwb") as tmp:
                os.link(source, tmp)
            return "hardlink"
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            log.info("hard link %s -> %s refused (%s): copying instead", source, target, exc.strerror)
    if _same_copy(source, target):
        return "unchanged (copy)"
    with atomic_path(target, suffix=".nwb") as tmp:
        shutil.copy2(source, tmp)
    return "copy"


def _same_copy(source: Path, target: Path) -> bool:
    if not target.is_file():
        return False
    a, b = source.stat(), target.stat()
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _stat_of(target: Path) -> dict:
    stat = target.stat()
    return {"target_ino": stat.st_ino, "target_size": stat.st_size, "target_mtime_ns": stat.st_mtime_ns}


def patch_fingerprint(source: Path, patch: MetadataPatch) -> dict:
    """What must be unchanged for an existing patched copy to be reused."""
    stat = source.stat()
    return {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "patch": patch.described()}


def reusable_copy(target: Path, fingerprint: dict, entry: dict | None) -> bool:
    """Whether ``target`` is the patched copy recorded in ``entry`` for this ``fingerprint``, unchanged since."""
    if entry is None or not target.is_file() or {k: entry.get(k) for k in fingerprint} != fingerprint:
        return False
    stat = _stat_of(target)
    return stat == {k: entry.get(k) for k in stat}


def stage_patched_copy(source: Path, out_dir: Path, patch: MetadataPatch) -> Path:
    """Write the patched copy of ``source`` under ``<out>/.nwbflow-dandi-prep/staging/`` and return it."""
    staging = out_dir / STATE_DIR / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    return write_patched_copy(source, staging / f"{uuid.uuid4().hex}.nwb", patch)


def clear_staging(out_dir: Path) -> None:
    """Remove staged copies a killed run left behind (they were never placed)."""
    staging = out_dir / STATE_DIR / STAGING
    for leftover in staging.glob("*.nwb") if staging.is_dir() else ():
        leftover.unlink()


def promote(staged: Path, target: Path) -> None:
    """Rename a checked staged copy to its DANDI path (same file system: atomic), fsyncing the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    fsync(target.parent)


def placed_entry(source: Path, target: Path, relative: str, how: str, fingerprint: dict | None = None) -> dict:
    """Our record of what is at ``target`` (DANDI path ``relative``) now."""
    return {"source": str(source), "target": relative, "how": how, **(fingerprint or {}), **_stat_of(target)}


def pop_entry(record: dict, target: str, source: str) -> dict | None:
    """Take the record's entry for an asset: by its DANDI path, or by source when it has no name now."""
    if target:
        return record.pop(target, None)
    key = next((k for k, v in record.items() if v.get("source") == source), None)
    return None if key is None else record.pop(key)


def remove(target: Path) -> None:
    """Remove a file :func:`is_ours` allowed (a hard link's removal leaves its source untouched)."""
    target.unlink()
    fsync(target.parent)


def read_record(out_dir: Path) -> dict:
    """DANDI path -> entry of what earlier runs placed (empty when none)."""
    path = out_dir / STATE_DIR / PLACED_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(out_dir: Path, record: dict) -> None:
    path = out_dir / STATE_DIR / PLACED_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
