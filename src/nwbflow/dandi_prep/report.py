"""The dandi-prep report: JSON (for tools), markdown (for people), table rows (Prefect UI, CLI).

One entry per file under ROOT: ready or blocked, its DANDI path, each blocker
with its fix, the warnings, and the metadata written into a processed copy
(always "from meta.yaml, into the processed copy only"). Both files are written
atomically to ``<out>/.nwbflow-dandi-prep/report.{json,md}`` (a hidden folder:
dandi validate / upload skip it).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from nwbflow import __version__
from nwbflow.atomic import atomic_path
from nwbflow.dandi_prep.model import BLOCKED, READY, AssetResult
from nwbflow.dandi_prep.organize import STATE_DIR

REPORT_JSON, REPORT_MD = "report.json", "report.md"
DANDISET_YAML = "dandiset.yaml"
NO_DANDISET_NOTE = ("no dandiset.yaml in the Dandiset folder: `dandi upload` needs one — create the Dandiset on "
                    "the archive, `dandi download DANDI:<id>` and pass that folder as --out (or copy its "
                    "dandiset.yaml here)")


def build_report(results: list[AssetResult], *, root: Path, out_dir: Path, metadata_file: str | None,
                 notes: list[str]) -> dict:
    """The report as JSON-ready builtins."""
    notes = list(notes)
    if not (out_dir / DANDISET_YAML).is_file():
        notes.append(NO_DANDISET_NOTE)
    return {
        "nwbflow": __version__, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "root": str(root), "dandiset_dir": str(out_dir), "metadata_file": metadata_file,
        "summary": {READY: sum(r.status == READY for r in results),
                    BLOCKED: sum(r.status == BLOCKED for r in results)},
        "notes": notes, "assets": [r.as_dict() for r in results],
    }


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` under ``<out>/.nwbflow-dandi-prep/``; returns their paths."""
    folder = out_dir / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(report))
    return json_path, md_path


def table_rows(report: dict) -> list[dict[str, str]]:
    """One row per file: file, kind, status, DANDI path, blockers (each "problem -> fix"), warnings, metadata."""
    return [{"file": a["relative"], "kind": a["kind"], "status": a["status"], "dandi_path": a["target"] or "-",
             "blockers": " | ".join(f"{b['message']} -> FIX: {b['fix']}" for b in a["blockers"]) or "-",
             "warnings": " | ".join(w["message"] for w in a["warnings"]) or "-",
             "metadata_applied": _applied_text(a["applied_metadata"]) or "-"} for a in report["assets"]]


def _applied_text(applied: dict[str, str]) -> str:
    if not applied:
        return ""
    values = ", ".join(f"{k} = {v}" for k, v in applied.items())
    return f"{values} (from meta.yaml, written into this processed copy only; the original is unchanged)"


def to_markdown(report: dict) -> str:
    """The report for people: summary, one table row per file, then every blocker with its fix."""
    summary = report["summary"]
    lines = [f"# DANDI submission prep: {summary[READY]} ready, {summary[BLOCKED]} blocked", "",
             f"Data root: `{report['root']}`  ", f"Dandiset folder: `{report['dandiset_dir']}`  ",
             f"Metadata file: `{report['metadata_file'] or 'none'}`  ",
             f"nwbflow {report['nwbflow']}, {report['created_utc']}", ""]
    lines += [f"- {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += ["| file | kind | status | DANDI path | blockers | warnings |", "|---|---|---|---|---|---|"]
    for a in report["assets"]:
        status = "**blocked**" if a["status"] == BLOCKED else "ready"
        lines.append(f"| `{a['relative']}` | {a['kind']} | {status} | {_code(a['target'])} | "
                     f"{len(a['blockers'])} | {len(a['warnings'])} |")
    for a in report["assets"]:
        lines += ["", f"## `{a['relative']}` — {a['status']}", ""]
        if a["target"]:
            placed = f" ({a['placed']})" if a["placed"] else " (not placed)"
            lines += [f"DANDI path: `{a['target']}`{placed}", ""]
        if a["applied_metadata"]:
            lines += [f"Metadata: {_applied_text(a['applied_metadata'])}", ""]
        for b in a["blockers"]:
            where = f" (`{b['location']}`)" if b["location"] else ""
            lines.append(f"- BLOCKER `{b['check']}`{where}: {b['message']}  \n  **Fix:** {b['fix']}")
        for w in a["warnings"]:
            lines.append(f"- warning `{w['check']}`: {w['message']}")
        lines += [f"- note: {n}" for n in a["notes"]]
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    return f"`{text}`" if text else "-"
