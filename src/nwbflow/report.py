"""Plain-text tables of what a run did, for the CLI and the demo."""

from __future__ import annotations

import os
from pathlib import Path


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_table(summary: dict) -> str:
    """Stage, seconds, counts and what each stage wrote, from ``process_session``'s summary.

    Artifact paths are shown relative to the work directory, which is printed once.
    """
    workdir = Path(summary["workdir"])
    rows = []
    for stage in summary["stages"]:
        counts = ", ".join(f"{k}={v}" for k, v in stage["summary"].items())
        wrote = ", ".join(os.path.relpath(p, workdir) for p in stage["artifacts"].values())
        rows.append([stage["stage"], f"{stage['seconds']:.2f}", counts, wrote])
    rows.append(["write-back", f"{summary['write_seconds']:.2f}", f"provenance rows={len(summary['stages'])}",
                 summary["output"]])
    return f"work directory: {workdir}\n" + format_table(["stage", "seconds", "counts", "wrote"], rows)
