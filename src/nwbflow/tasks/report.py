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


@task(name="publish-report")
def publish_report(summary: dict) -> list[str]:
    """Table + markdown artifacts for one processed session; returns the figure paths written."""
    out_path = Path(summary["output"])
    rows = [{"stage": s["stage"], "seconds": round(s["seconds"], 2), "device": s["device"],
             **{k: v for k, v in s["summary"].items()}} for s in summary["stages"]]
    create_table_artifact(table=rows, key=artifact_key("stages", str(out_path)),
                          description=f"Stages run for {out_path.name}")
    figures = []
    peaks = next((s for s in summary["stages"] if s["stage"] == "peaks"), None)
    if peaks is not None:
        table = pq.read_table(peaks["artifacts"]["peaks"], columns=["time_s", "y_um", "amplitude"])
        png = out_path.with_name(out_path.stem + "_peaks.png")
        figures.append(peak_raster_png(table["time_s"].to_numpy(), table["y_um"].to_numpy(),
                                       table["amplitude"].to_numpy(), png, f"Peaks of {out_path.stem}"))
    for stage in ("motion", "sorting"):  # figures the stages drew, copied beside the output
        done = next((s for s in summary["stages"] if s["stage"] == stage), None)
        if done is not None and "figure" in done["artifacts"]:
            png = out_path.with_name(f"{out_path.stem}_{'units' if stage == 'sorting' else stage}.png")
            shutil.copyfile(done["artifacts"]["figure"], png)
            figures.append(png)
    lines = [f"# {out_path.name}", "", f"Input: `{summary['input']}`  ", f"Output: `{out_path}`  ",
             f"Work directory: `{summary['workdir']}`", "",
             "| stage | seconds | device | counts |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.2f} | {s['device']} | "
              + ", ".join(f"{k}={v}" for k, v in s["summary"].items()) + " |" for s in summary["stages"]]
    lines += [f"| write-back | {summary['write_seconds']:.2f} | cpu | |", ""]
    lines += [_figure_markdown(p) for p in figures]
    create_markdown_artifact(markdown="\n".join(lines), key=artifact_key("session", str(out_path)),
                             description=f"nwbflow summary of {out_path.name}")
    return [str(p) for p in figures]
