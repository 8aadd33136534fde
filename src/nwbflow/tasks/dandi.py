"""Prefect tasks of the dandi-prep flow: thin glue around ``nwbflow.dandi_prep``.

One task per file for the checks (each shows in the UI and retries I/O
errors); the report task publishes the table and markdown artifacts. Nothing
is cached: the point of a run is to look at the files as they are now.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from nwbflow.dandi_prep.assets import prepare_asset
from nwbflow.dandi_prep.model import AssetPlan, AssetResult, Inspection
from nwbflow.dandi_prep.plan import inspect_source
from nwbflow.dandi_prep.report import table_rows, to_markdown
from nwbflow.tasks.retries import RETRY_OPTIONS
from nwbflow.tasks.report import artifact_key

_OPTIONS = {**RETRY_OPTIONS, "cache_policy": NO_CACHE}


@task(name="dandi-inspect", task_run_name="inspect {path}", **_OPTIONS)
def inspect_task(path: str, root: str) -> Inspection:
    """Facts and ``dandi upload``'s checks of one file under ROOT, as it is."""
    return inspect_source(Path(path), Path(root))


@task(name="dandi-prepare", task_run_name="prepare {plan.inspection.relative}", **_OPTIONS)
def prepare_task(plan: AssetPlan, out_dir: str, files_mode: str,
                 entry: dict | None) -> tuple[AssetResult, dict | None]:
    """Apply metadata (processed copies), judge and place one asset (``entry``: what is recorded at its path)."""
    return prepare_asset(plan, Path(out_dir), files_mode, entry)


@task(name="dandi-publish-report", cache_policy=NO_CACHE)
def publish_report_task(report: dict) -> None:
    """The report as a table artifact (one row per file) and a markdown artifact (every fix)."""
    out_dir = report["dandiset_dir"]
    summary = report["summary"]
    create_table_artifact(table=table_rows(report), key=artifact_key("dandi-prep", out_dir),
                          description=f"DANDI prep of {report['root']}: {summary['ready']} ready, "
                                      f"{summary['blocked']} blocked")
    create_markdown_artifact(markdown=to_markdown(report), key=artifact_key("dandi-prep-report", out_dir),
                             description=f"What blocks upload to DANDI, with the fixes ({out_dir})")
