"""Prepare one planned asset: apply its metadata (processed copies), judge it, put it in place.

A file is **ready** when ``dandi upload`` would take it: no finding of
severity ERROR/CRITICAL (pynwb validation, nwbinspector with the DANDI
configuration, dandi's metadata extraction), no identifier or object id shared
with another file, a DANDI name that passes dandi's layout rule and is free (or
holds what dandi-prep put there). Only ready files are placed in the Dandiset
folder, so the folder always uploads; what an earlier run placed for a file
that is blocked now is taken out again (a hard link's removal leaves its
source untouched).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nwbflow.dandi_prep import organize
from nwbflow.dandi_prep.fixes import problem_for
from nwbflow.dandi_prep.model import BLOCKED, PROCESSED, READY, AssetPlan, AssetResult, Problem
from nwbflow.dandi_prep.naming import layout_findings
from nwbflow.nwb_io.validate import dandi_upload_findings

log = logging.getLogger(__name__)

NO_NAME_FIX = "set Subject.subject_id (DANDI names files sub-<subject_id>/...)"
OCCUPIED_FIX = ("move that file out of the Dandiset folder (or pass another --out): dandi-prep never replaces "
                "files it did not put there")


def prepare_asset(plan: AssetPlan, out_dir: Path, files_mode: str,
                  entry: dict | None) -> tuple[AssetResult, dict | None]:
    """Judge and place one asset.

    Parameters
    ----------
    plan : from :func:`nwbflow.dandi_prep.plan.plan_assets`.
    out_dir : the Dandiset folder.
    files_mode : "hardlink" or "copy" (for files placed unchanged).
    entry : what an earlier run recorded for this asset (``placed.json``: at its DANDI path, or for its
        source when it has no name now), if anything.

    Returns
    -------
    The result, and the record of what is at the DANDI path now (None when nothing of ours is there).
    """
    inspection = plan.inspection
    facts = inspection.facts
    if facts is None:
        return _result(plan, BLOCKED, "", {}, list(plan.problems)), None
    source = Path(inspection.source)
    target = out_dir / plan.target if plan.target else None
    occupied = target is not None and target.exists() and not organize.is_ours(source, target, entry)
    patched = inspection.kind == PROCESSED and bool(plan.patch)
    findings, candidate, fingerprint = inspection.findings, None, None
    if patched:
        fingerprint = organize.patch_fingerprint(source, plan.patch)
        reuse = target is not None and not occupied and organize.reusable_copy(target, fingerprint, entry)
        candidate = target if reuse else organize.stage_patched_copy(source, out_dir, plan.patch)
        findings = dandi_upload_findings(candidate)
    problems = [problem_for(f, kind=inspection.kind, subject_id=plan.subject_id, session=plan.session_id,
                            age=facts.subject.get("age"))
                for f in findings if f.severity in ("ERROR", "CRITICAL", "WARNING")]
    problems += plan.problems
    if target is not None:
        problems += [Problem("DANDI.layout", message, fix="report this: nwbflow named the file with dandi's rules")
                     for message in layout_findings(plan.target, target, out_dir)]
        if occupied:
            problems.append(Problem("nwbflow.target_occupied", f"another file is already at {plan.target}, not "
                                    "put there by dandi-prep", fix=OCCUPIED_FIX))
    elif not any(p.blocking for p in problems):
        problems.append(Problem("nwbflow.no_name", "the file has no subject_id, so it has no DANDI name",
                                fix=NO_NAME_FIX))
    status = READY if not any(p.blocking for p in problems) else BLOCKED
    placed, record = _place(plan, status, out_dir, files_mode, candidate, fingerprint, entry, occupied)
    return _result(plan, status, placed, plan.patch.described() if patched else {}, problems), record


def _place(plan: AssetPlan, status: str, out_dir: Path, files_mode: str, candidate: Path | None,
           fingerprint: dict | None, entry: dict | None, occupied: bool) -> tuple[str, dict | None]:
    """Put a ready asset at its DANDI path, or take out what an earlier run placed for a blocked one."""
    source = Path(plan.inspection.source)
    target = out_dir / plan.target if plan.target else None
    staged = candidate is not None and candidate != target
    if status != READY or target is None:
        if staged:
            candidate.unlink(missing_ok=True)
        earlier = {target} if target is not None and not occupied else set()
        if entry is not None and entry.get("target"):
            earlier.add(out_dir / entry["target"])  # where it went when it had a name
        for path in sorted(earlier):
            if organize.is_ours(source, path, entry):
                organize.remove(path)
                log.info("removed %s: placed by an earlier run, blocked now", path)
        return "", None
    if candidate is None:
        how = organize.link_or_copy(source, target, files_mode)
        return how, organize.placed_entry(source, target, plan.target, how)
    if staged:
        organize.promote(candidate, target)
        return "patched copy", organize.placed_entry(source, target, plan.target, "patched copy", fingerprint)
    return "unchanged (patched copy)", entry


def _result(plan: AssetPlan, status: str, placed: str, applied: dict[str, str],
            problems: list[Problem]) -> AssetResult:
    facts = plan.inspection.facts
    return AssetResult(
        source=plan.inspection.source, relative=plan.inspection.relative, kind=plan.inspection.kind,
        status=status, target=plan.target, placed=placed, subject_id=plan.subject_id, session=plan.session,
        identifier=facts.identifier if facts else "", object_id=facts.object_id if facts else "",
        applied=applied, blockers=tuple(p for p in problems if p.blocking),
        warnings=tuple(p for p in problems if not p.blocking), notes=plan.notes)
