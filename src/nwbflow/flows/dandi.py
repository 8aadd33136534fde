"""``dandi-prep``: report what would block a DANDI upload, with the fix, and organize what is ready.

Every NWB file under a data root (raw and processed) is checked the way
``dandi upload`` checks it (dandi-cli 0.81: pynwb validation, nwbinspector
with the DANDI configuration, dandi's metadata extraction), plus what only
shows across files (shared identifiers or object ids). Processed files may get
metadata supplied in ``meta.yaml``, written into their copy only. Ready files
are placed under dandi organize's names in the Dandiset folder (hard link or
copy; originals never change); the report (JSON, markdown, Prefect artifacts)
lists each blocker with its fix. The run ends Failed when a file is blocked (calling
the flow then raises :class:`UploadBlockedError`, which names the report).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow
from prefect.states import Failed
from pydantic import Field

from nwbflow.dandi_prep import organize
from nwbflow.dandi_prep.metadata import DandiMetadata, load_metadata
from nwbflow.dandi_prep.plan import check_dirs, find_nwb_files, plan_assets
from nwbflow.dandi_prep.report import build_report, write_report
from nwbflow.errors import NwbflowError
from nwbflow.nwb_io.validate import require_dandi_validators
from nwbflow.tasks.dandi import inspect_task, prepare_task, publish_report_task

log = logging.getLogger(__name__)


class UploadBlockedError(NwbflowError):
    """Some files would be refused by ``dandi upload``; the report at ``report_path`` says why and how to fix."""

    def __init__(self, message: str, report_path: str):
        self.report_path = report_path
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.report_path))


def check_dandi_prep_inputs(root: str, out_dir: str,
                            metadata_path: str | None = None) -> tuple[Path, Path, DandiMetadata]:
    """Everything that can be wrong before any file is looked at (the CLI runs it before Prefect starts).

    Raises ValidatorMissingError without dandi/nwbinspector, BadInputError for ROOT, the Dandiset
    folder or ``meta.yaml``. Returns ROOT and the Dandiset folder (absolute) and the metadata.
    """
    require_dandi_validators()
    root_path, out_path = check_dirs(root, out_dir)
    return root_path, out_path, load_metadata(metadata_path)


@flow(name="dandi-prep", validate_parameters=True)
def dandi_prep(root: Annotated[str, Field(min_length=1)], out_dir: Annotated[str, Field(min_length=1)],
               metadata_path: str | None = None,
               files_mode: Literal["hardlink", "copy"] = "hardlink") -> dict:
    """Check NWB files for DANDI upload, report each blocker with its fix, organize the ready ones.

    Args:
        root: Absolute path of the data root: every `*.nwb` below it (raw and processed) is checked,
            never modified.
        out_dir: Absolute path of the Dandiset folder (ideally from `dandi download`); ready files go to
            `sub-<subject>/...` there.
        metadata_path: Optional absolute path of a `meta.yaml` with missing subject/session metadata;
            written into processed copies only.
        files_mode: How unchanged files are placed: `hardlink` (no copy; a copy where links are refused)
            or `copy`.

    Returns:
        The report: summary counts, one entry per file (status, DANDI path, blockers with fixes, warnings).
        When a file is blocked the run ends Failed instead (UploadBlockedError naming the report).
    """
    root_path, out_path, meta = check_dandi_prep_inputs(root, out_dir, metadata_path)
    out_path.mkdir(parents=True, exist_ok=True)
    inspections = [inspect_task(str(p), str(root_path)) for p in find_nwb_files(root_path, out_path)]
    plans, notes = plan_assets(inspections, meta)
    organize.clear_staging(out_path)
    record, results = organize.read_record(out_path), []
    for plan in plans:
        earlier = organize.pop_entry(record, plan.target, plan.inspection.source)
        result, entry = prepare_task(plan, str(out_path), files_mode, earlier)
        results.append(result)
        if entry is not None:
            record[plan.target] = entry
    # Entries of paths no file maps to any more stay while their file does: it is still ours to replace.
    organize.write_record(out_path, {k: v for k, v in record.items() if (out_path / k).is_file()})
    report = build_report(results, root=root_path, out_dir=out_path, metadata_file=metadata_path, notes=notes)
    json_path, md_path = write_report(report, out_path)
    report["report_files"] = {"json": str(json_path), "markdown": str(md_path)}
    publish_report_task(report)
    blocked = [r.relative for r in results if r.status != "ready"]
    log.info("dandi-prep: %d ready, %d blocked; report %s", len(results) - len(blocked), len(blocked), md_path)
    if blocked:
        message = (f"{len(blocked)} of {len(results)} file(s) would be refused by `dandi upload`: "
                   f"{', '.join(blocked)}; fixes in {md_path}")
        # A Failed state, not a raise: the run ends Failed with this message and no traceback in the
        # logs (nothing crashed); calling the flow still raises the UploadBlockedError.
        return Failed(message=message, data=UploadBlockedError(message, str(json_path)))
    return report
