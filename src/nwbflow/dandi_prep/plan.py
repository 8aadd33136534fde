"""Find the files, check each as it is, and plan its DANDI asset (name, metadata, cross-file problems).

Steps (each a plain function; the ``dandi-prep`` flow runs them as tasks):

1. :func:`check_dirs` / :func:`find_nwb_files`: every ``*.nwb`` under ROOT, raw
   and processed, hidden paths and the output folder skipped.
2. :func:`inspect_source`: what the file holds and what ``dandi upload`` says
   about it as it is.
3. :func:`plan_assets`: across files — shared identifiers / object ids, the
   ``meta.yaml`` values each file gets, and dandi's names for all of them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from nwbflow.dandi_prep import fixes
from nwbflow.dandi_prep.metadata import DandiMetadata, resolve
from nwbflow.dandi_prep.model import PROCESSED, AssetPlan, Inspection, Problem
from nwbflow.dandi_prep.naming import NamingError, NamingInput, dandi_names
from nwbflow.errors import BadInputError
from nwbflow.nwb_io.dandi_facts import has_utc_offset, read_asset_facts
from nwbflow.nwb_io.dandi_patch import MetadataPatch
from nwbflow.nwb_io.validate import dandi_upload_findings

log = logging.getLogger(__name__)


def check_dirs(root: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """ROOT and the Dandiset folder as absolute paths; BadInputError when they cannot be used.

    ROOT must be a folder holding ``*.nwb`` files; the Dandiset folder must not be ROOT or contain
    it (it may be new, or a folder inside ROOT: the scan skips it).
    """
    root_path, out_path = Path(root).resolve(), Path(out_dir).resolve()
    if not root_path.is_dir():
        raise BadInputError("data root is not a directory", path=root_path, fix="pass an existing folder as ROOT")
    if out_path == root_path or root_path.is_relative_to(out_path):
        raise BadInputError("the Dandiset folder is ROOT or contains it; organizing there would mix "
                            "originals and assets", path=out_path, fix="pass another folder to --out")
    if out_path.exists() and not out_path.is_dir():
        raise BadInputError("the Dandiset folder is a file", path=out_path, fix="pass a folder to --out")
    if not find_nwb_files(root_path, out_path):
        raise BadInputError("no *.nwb files under the data root", path=root_path,
                            fix="pass the folder that holds the raw and processed NWB files")
    return root_path, out_path


def find_nwb_files(root: Path, out_dir: Path) -> list[Path]:
    """``*.nwb`` files under ``root``, sorted; hidden paths and anything under ``out_dir`` are skipped."""
    found = []
    for path in sorted(root.rglob("*.nwb")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.is_relative_to(out_dir):
            continue
        if path.is_file():
            found.append(path)
    return found


def inspect_source(path: str | Path, root: str | Path) -> Inspection:
    """Read one file's facts and run ``dandi upload``'s checks on it as it is (never modified)."""
    path, root = Path(path), Path(root)
    relative = path.relative_to(root).as_posix()
    try:
        facts = read_asset_facts(path)
    except BadInputError as exc:
        return Inspection(source=str(path), relative=relative, facts=None, unreadable=exc.one_line())
    return Inspection(source=str(path), relative=relative, facts=facts, findings=dandi_upload_findings(path))


def plan_assets(inspections: list[Inspection], meta: DandiMetadata) -> tuple[list[AssetPlan], list[str]]:
    """Plan every asset; returns the plans (in input order) and Dandiset-level notes.

    Notes name the ``meta.yaml`` entries that matched no file (likely typos).
    """
    duplicates = _duplicates(inspections)
    plans, used = [], set()
    for inspection in inspections:
        problems = list(duplicates.get(inspection.source, ()))
        if inspection.facts is None:
            problems.append(Problem("nwbflow.unreadable", inspection.unreadable,
                                    fix=_unreadable_fix(inspection.unreadable)))
            plans.append(AssetPlan(inspection=inspection, problems=tuple(problems)))
            continue
        plan, matched = _plan_one(inspection, meta, problems)
        used |= matched
        plans.append(plan)
    plans = _with_names(plans, exclude={p for p, probs in duplicates.items()
                                        if any(x.check == "nwbflow.duplicate_object_id" for x in probs)})
    notes = [f"meta.yaml {name} matched no file under ROOT" for name in sorted(meta.entry_names() - used)]
    return plans, notes


def _plan_one(inspection: Inspection, meta: DandiMetadata, problems: list[Problem]) -> tuple[AssetPlan, set]:
    facts = inspection.facts
    resolution = resolve(meta, inspection.relative, facts, fixes.flagged_fields(inspection.findings))
    notes = list(resolution.notes)
    if inspection.kind == PROCESSED:
        patch, subject_id, session_id = resolution.patch, resolution.subject_id, resolution.session_id
    else:
        patch, subject_id, session_id = MetadataPatch(), facts.subject_id, facts.session_id
        if resolution.patch:
            supplied = ", ".join(f"{k}={v}" for k, v in resolution.patch.described().items())
            notes.append(f"meta.yaml supplies {supplied} for this file, but raw files are never changed: "
                         "only processed copies get it")
    return AssetPlan(inspection=inspection, subject_id=subject_id or "", session=session_id or "",
                     session_id=session_id or "", patch=patch, problems=tuple(problems),
                     notes=tuple(notes)), set(resolution.used)


def _with_names(plans: list[AssetPlan], exclude: set[str]) -> list[AssetPlan]:
    """The plans with dandi's names filled in (files without a subject_id stay unnamed)."""
    nameable = [p for p in plans if p.subject_id and p.inspection.source not in exclude]
    inputs = [NamingInput(path=p.inspection.source, subject_id=p.subject_id, session_id=p.session_id or None,
                          session_start_time=_readable_time(p.inspection.facts.session_start_time),
                          neurodata_types=p.inspection.facts.neurodata_types,
                          processed=p.inspection.kind == PROCESSED) for p in nameable]
    try:
        names = dandi_names(inputs)
    except NamingError as exc:
        log.warning("dandi cannot name the files uniquely: %s", exc)
        problem = Problem("nwbflow.names_not_unique", f"dandi organize cannot name the files uniquely: {exc}",
                          fix=fixes.RULES["nwbflow.names_not_unique"].fix)
        keys = {p.inspection.source for p in nameable}
        return [replace(p, problems=p.problems + (problem,)) if p.inspection.source in keys else p for p in plans]
    out = []
    for plan in plans:
        target, session = names.get(plan.inspection.source, ("", plan.session))
        out.append(replace(plan, target=target, session=session))
    return out


def _readable_time(value: str | None) -> str | None:
    """The start time if it parses as ISO 8601 (dandi names sessions from it), else None."""
    return value if value is not None and has_utc_offset(value) is not None else None


def _duplicates(inspections: list[Inspection]) -> dict[str, list[Problem]]:
    """source -> problems for files sharing an identifier or an object id with another file."""
    groups: dict[tuple[str, str], list[Inspection]] = defaultdict(list)
    for inspection in inspections:
        if inspection.facts is None:
            continue
        for check, value in (("nwbflow.duplicate_identifier", inspection.facts.identifier),
                             ("nwbflow.duplicate_object_id", inspection.facts.object_id)):
            if value:
                groups[(check, value)].append(inspection)
    out: dict[str, list[Problem]] = defaultdict(list)
    for (check, value), members in groups.items():
        if len(members) < 2:
            continue
        for member in members:
            others = ", ".join(m.relative for m in members if m is not member)
            out[member.source] += fixes.duplicate_problems([(check, value, others)])
    return out


def _unreadable_fix(message: str) -> str:
    return message.split("Fix: ", 1)[1] if "Fix: " in message else "check that the file is a complete NWB 2 file"

