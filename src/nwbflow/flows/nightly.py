"""``nightly``: process every session under a data root that is new or changed since the last run.

A session is (re)processed when its file (size, mtime), its effective
parameters (the deployment's, overlaid with an optional per-session
``<session>.nwbflow.yaml`` beside it) or the nwbflow version changed, or its
output is gone. What was done is recorded in ``<out_dir>/.nwbflow-nightly.json``
(written atomically after each session), so a crashed night resumes where it
stopped; failures do not stop the other sessions, and the run ends Failed
naming them. A session some of whose series (probes, imaging planes) failed is
written with the others' results and recorded as partial: reported failed that
night, then left alone until its file or parameters change (a retry on the
same data would fail the same way).

Several nightly runs over one root at once (two workers, an overlapping
schedule) process each session once in total: a run claims a session by its
output's lock (the one ``process_session`` holds), re-reads the ledger under
the claim, and records the session before letting go; a session another run
holds is reported "busy" and left to it. The ledger is updated as a
read-modify-write under ``.nwbflow-nightly.lock``, so no run's entries are lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import Field

from nwbflow import __version__
from nwbflow.errors import BadInputError, NwbflowError, OutputBusyError, PartialResultsError
from nwbflow.flows.session import process_session
from nwbflow.locks import exclusive_lock, output_lock
from nwbflow.params import SessionParams
from nwbflow.tasks.artifacts import save_json
from nwbflow.tasks.caching import file_identity

log = logging.getLogger(__name__)

LEDGER = ".nwbflow-nightly.json"
LEDGER_LOCK = ".nwbflow-nightly.lock"
OVERRIDE_SUFFIX = ".nwbflow.yaml"
OUTPUT_SUFFIX = "_processed.nwb"
DEFAULT_OUT_DIR = "processed"


def data_root(root: str | Path) -> Path:
    """The data root as an absolute path; BadInputError when it is not a directory."""
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise BadInputError("data root is not a directory", path=root_path, fix="pass an existing folder")
    return root_path


def find_sessions(root: Path, out_dir: Path) -> list[Path]:
    """NWB files under ``root``, sorted; hidden paths, outputs and work directories are skipped."""
    found = []
    for path in sorted(root.rglob("*.nwb")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_relative_to(out_dir) or path.name.endswith(OUTPUT_SUFFIX) or not path.is_file():
            continue
        found.append(path)
    return found


def session_params(nwb_path: Path, base: SessionParams) -> SessionParams:
    """``base`` overlaid with ``<session>.nwbflow.yaml`` when that file exists."""
    override_file = nwb_path.with_name(nwb_path.stem + OVERRIDE_SUFFIX)
    if not override_file.is_file():
        return base
    try:
        override = yaml.safe_load(override_file.read_text()) or {}
        merged = _deep_merge(base.model_dump(mode="json"), override)
        return SessionParams.model_validate(merged)
    except (yaml.YAMLError, ValueError, AttributeError) as exc:
        raise BadInputError(f"invalid per-session parameters: {exc}", path=override_file,
                            fix="fix or remove the file; it overlays the deployment's parameters") from exc


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return merged


def session_key(nwb_path: Path, params: SessionParams) -> str:
    """What must be unchanged for a session to be skipped: file identity, parameters, code version."""
    size, mtime_ns = file_identity(nwb_path)
    payload = json.dumps({"size": size, "mtime_ns": mtime_ns, "params": json.loads(params.as_json()),
                          "nwbflow": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def output_for(root: Path, out_dir: Path, nwb_path: Path) -> Path:
    """``<out_dir>/<same relative folder>/<stem>_processed.nwb``."""
    relative = nwb_path.relative_to(root)
    return out_dir / relative.parent / (relative.stem + OUTPUT_SUFFIX)


@flow(name="nightly", validate_parameters=True)
def nightly(root: Annotated[str, Field(min_length=1)], out_dir: str | None = None,
            params: SessionParams = SessionParams(), workdir: str | None = None) -> dict:
    """Process the sessions under a data root that are new or changed since the last run.

    Args:
        root: Absolute path of the data root scanned for `*.nwb` (hidden paths skipped).
        out_dir: Where processed files go, mirroring the root's folders; default: `<root>/processed`.
        params: Parameters for every session; a `<session>.nwbflow.yaml` beside a file overlays them.
        workdir: Folder for intermediate artifacts; default: `<out_dir>/.nwbflow-work`.

    Returns:
        The sessions (paths relative to the root) processed, skipped (unchanged), busy (being processed by
        another run at the time; left to it) and failed (with the error).
    """
    root_path = data_root(root)
    out_path = Path(out_dir).resolve() if out_dir else root_path / DEFAULT_OUT_DIR
    out_path.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, list] = {"processed": [], "skipped": [], "busy": [], "failed": []}
    for nwb_path in find_sessions(root_path, out_path):
        relative = str(nwb_path.relative_to(root_path))
        try:
            result = _process_if_changed(root_path, out_path, nwb_path, params, workdir)
        except Exception as exc:  # noqa: BLE001 - one bad session must not stop the night; reported below
            log.error("session %s failed: %s", relative, exc)
            outcome["failed"].append({"session": relative, "error": f"{type(exc).__name__}: {exc}"})
            continue
        outcome[result].append(relative)
    _publish(outcome)
    if outcome["failed"]:
        names = ", ".join(f["session"] for f in outcome["failed"])
        raise NwbflowError(f"{len(outcome['failed'])} session(s) failed: {names}")
    return outcome


def _process_if_changed(root: Path, out_dir: Path, nwb_path: Path, base: SessionParams,
                        workdir: str | None) -> str:
    """Process one session unless it is up to date or another run holds it: "processed", "skipped" or "busy"."""
    relative = str(nwb_path.relative_to(root))
    params = session_params(nwb_path, base)
    key, target = session_key(nwb_path, params), output_for(root, out_dir, nwb_path)
    if _up_to_date(out_dir, relative, key, target):
        return "skipped"
    target.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as claim:
        try:
            claim.enter_context(output_lock(target))  # process_session takes it again (nested, same thread)
        except OutputBusyError as exc:
            log.warning("session %s is being processed by another run; left to it (%s)", relative, exc)
            return "busy"
        if _up_to_date(out_dir, relative, key, target):  # another run finished it since the first look
            return "skipped"
        entry = {"key": key, "output": str(target), "nwbflow": __version__,
                 "processed_utc": datetime.now(UTC).isoformat(), "flow_run_id": str(flow_run.id or "")}
        try:
            process_session(str(nwb_path), str(target), params, workdir or str(out_dir / ".nwbflow-work"))
        except PartialResultsError as exc:  # written with what succeeded: retried once its file or params change
            record_in_ledger(out_dir, relative, {**entry, "partial": [f["series"] for f in exc.summary["failed"]]})
            raise
        record_in_ledger(out_dir, relative, entry)
    return "processed"


def read_ledger(out_dir: Path) -> dict:
    """The ledger: session (path relative to the root) -> key, output, version, time, flow run id."""
    ledger_file = out_dir / LEDGER
    return json.loads(ledger_file.read_text()) if ledger_file.is_file() else {}


def _up_to_date(out_dir: Path, relative: str, key: str, target: Path) -> bool:
    entry = read_ledger(out_dir).get(relative)  # the ledger is replaced atomically: a read sees a whole version
    return bool(entry) and entry["key"] == key and target.is_file()


def record_in_ledger(out_dir: Path, relative: str, entry: dict) -> None:
    """Add one session's entry to the ledger: re-read, update, write, under the ledger's lock."""
    with exclusive_lock(out_dir / LEDGER_LOCK):
        ledger = read_ledger(out_dir)
        ledger[relative] = entry
        save_json(out_dir / LEDGER, ledger)


def _publish(outcome: dict) -> None:
    rows = ([{"session": s, "result": "processed", "error": ""} for s in outcome["processed"]]
            + [{"session": s, "result": "skipped (unchanged)", "error": ""} for s in outcome["skipped"]]
            + [{"session": s, "result": "busy (another run was processing it)", "error": ""}
               for s in outcome["busy"]]
            + [{"session": f["session"], "result": "failed", "error": f["error"]} for f in outcome["failed"]])
    create_table_artifact(table=rows, key="nightly-sessions", description="Sessions seen by the nightly run")
    log.info("nightly: %d processed, %d skipped, %d busy, %d failed", len(outcome["processed"]),
             len(outcome["skipped"]), len(outcome["busy"]), len(outcome["failed"]))
