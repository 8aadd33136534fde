"""Plain-text tables of what a run did, for the CLI and the demo."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path


def format_table(header: list[str], rows: list[list[str]], width: int | None = None) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header.

    With ``width`` (characters), the last column's text is wrapped (at spaces) so that lines fit it where
    the other columns leave at least 20 characters; its continuation lines leave the other columns blank.

    >>> print(format_table(["a", "b"], [["x", "one, two, three, four, five, six"]], width=25))
    a  b
    -  ----------------------
    x  one, two, three, four,
       five, six
    """
    rows = [[str(c) for c in row] for row in rows]
    if width is not None:
        room = width - sum(max(len(str(c)) for c in column) + 2 for column in zip(header[:-1], *(r[:-1] for r in rows)))
        if room >= 20:
            wrapped = []
            for row in rows:
                parts = textwrap.wrap(row[-1], room, break_on_hyphens=False, break_long_words=False) or [""]
                wrapped += [[*row[:-1], parts[0]]] + [[""] * (len(row) - 1) + [part] for part in parts[1:]]
            rows = wrapped
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_table(summary: dict, width: int | None = None) -> str:
    """Stage, series, seconds and counts of ``process_session``'s summary, each series' work directory
    (where its artifacts are: ``done.json`` in each stage's folder lists them), then what went wrong.

    The counts are wrapped to ``width`` characters (default: the terminal's, 100 when not a terminal).
    """
    width = width or shutil.get_terminal_size((100, 24)).columns
    several = len({stage["series"] for stage in summary["stages"]}) > 1
    rows = []
    for stage in summary["stages"]:
        counts = ", ".join(f"{k}={v}" for k, v in stage["summary"].items() if k != "model_sha256")
        rows.append([stage["stage"], stage["label"] or stage["series"].rsplit("/", 1)[-1], f"{stage['seconds']:.2f}",
                     counts])
    rows.append(["write-back", "", f"{summary['write_seconds']:.2f}", f"wrote {Path(summary['output']).name}"])
    header = ["stage", "series", "seconds", "counts"]
    if not several:
        header, rows = [header[0], *header[2:]], [[row[0], *row[2:]] for row in rows]
    lines = [f"work directory ({series['object']}): {series['workdir']}" for series in summary["series"]]
    lines.append(format_table(header, rows, width))
    lines.append(f"processed file: {summary['output']}")
    lines += [f"left out of the processed file (in the raw file): {', '.join(summary['dropped'])}"] \
        if summary.get("dropped") else []
    lines += [f"warning: the input's own problem, kept as it was: {finding}" for finding in summary["input_findings"]]
    lines += [f"FAILED: {f['series']} in {f['stage']}: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines)
