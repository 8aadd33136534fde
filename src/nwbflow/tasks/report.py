"""What a run shows in the Prefect UI: stage table, markdown summary with figures."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from nwbflow.plots import peak_raster_png

#: Figures up to this size are embedded in the markdown artifact; larger ones are linked by path.
EMBED_MAX_BYTES = 400_000


def artifact_key(prefix: str, out_path: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one output file."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9]+", "-", Path(out_path).stem.lower()).strip("-")[:60]


def _figure_markdown(png: Path) -> str:
    if png.stat().st_size <= EMBED_MAX_BYTES:
        data = base64.b64encode(png.read_bytes()).decode()
        return f"![{png.name}](data:image/png;base64,{data})\n\n`{png}`"
    return f"Figure: `{png}`"


def stage_rows(summary: dict) -> list[dict]:
    """The stage table artifact's rows: one fixed set of columns (the UI takes them from the first row), each
    stage's counts as one string; then the failed series and the input's own problems (warnings)."""
    rows = [{"stage": s["stage"], "series": s["series"], "seconds": round(s["seconds"], 2),
             "device": s["device"], "x_realtime": s["summary"].get("x_realtime", ""),
             "counts": ", ".join(f"{k}={v}" for k, v in s["summary"].items() if k not in ("x_realtime",))}
            for s in summary["stages"]]
    rows.append({"stage": "write-back", "series": "", "seconds": round(summary["write_seconds"], 2), "device": "cpu",
                 "x_realtime": "", "counts": f"left out: {', '.join(summary['dropped']) or 'nothing'}"})
    rows += [{"stage": f"FAILED ({f['stage']})", "series": f["series"], "seconds": "", "device": "", "x_realtime": "",
              "counts": f["error"]} for f in summary["failed"]]
    rows += [{"stage": "warning", "series": "input", "seconds": "", "device": "", "x_realtime": "",
              "counts": f"the input's own problem, kept as it was: {finding}"} for finding in summary["input_findings"]]
    return rows


@task(name="publish-report")
def publish_report(summary: dict) -> list[str]:
    """Table + markdown artifacts for one processed session; returns the figure paths written (beside the
    output, one per series: ``<output>_peaks[_<series>].png``, ``_motion``, ``_units``)."""
    out_path = Path(summary["output"])
    rows = stage_rows(summary)
    create_table_artifact(table=rows, key=artifact_key("stages", str(out_path)),
                          description=f"Stages run for {out_path.name}")
    figures = []
    for stage in summary["stages"]:
        suffix = f"_{stage['label']}" if stage["label"] else ""
        if stage["stage"] == "peaks":
            table = pq.read_table(stage["artifacts"]["peaks"], columns=["time_s", "y_um", "amplitude"])
            png = out_path.with_name(f"{out_path.stem}_peaks{suffix}.png")
            figures.append(peak_raster_png(table["time_s"].to_numpy(), table["y_um"].to_numpy(),
                                           table["amplitude"].to_numpy(), png,
                                           f"Peaks of {out_path.stem} {stage['label']}".strip()))
        elif stage["stage"] in ("motion", "sorting"):  # drawn by the stage (motion: one per shank of a multi-shank)
            for key, drawn in stage["artifacts"].items():
                if key == "figure" or key.startswith("figure_shank"):
                    png = out_path.with_name(f"{out_path.stem}_{'units' if stage['stage'] == 'sorting' else 'motion'}"
                                             f"{suffix}{key[len('figure'):]}.png")
                    shutil.copyfile(drawn, png)
                    figures.append(png)
    lines = [f"# {out_path.name}", "", f"Input: `{summary['input']}`  ", f"Output: `{out_path}`  "]
    lines += [f"Work directory of {s['object']}: `{s['workdir']}`  " for s in summary["series"]]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    lines += [""] + [_figure_markdown(p) for p in figures]
    create_markdown_artifact(markdown="\n".join(lines), key=artifact_key("session", str(out_path)),
                             description=f"nwbflow summary of {out_path.name}")
    return [str(p) for p in figures]
