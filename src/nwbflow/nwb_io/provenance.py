"""Provenance records <-> rows of ``processing/nwbflow/provenance`` (ndx-nwbflow ProvenanceTable).

Parameters travel as nested JSON and are stored unpacked: one list of dotted
names and one list of JSON-scalar values per row (nwbinspector flags JSON
objects held in table strings). ``read_provenance`` packs them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nwbflow import __version__
from nwbflow.extensions import PROVENANCE_COLUMNS
from nwbflow.nwb_io import layout


@dataclass(frozen=True)
class ProvenanceRecord:
    """One stage run. Times are ISO 8601 UTC; ``parameters`` is the resolved parameters as JSON;
    ``inputs`` are ``{"file", "identifier", "object", "sha256"}`` dicts (file: a name, never a host path);
    ``outputs`` are object paths in the processed file; ``status`` is "completed" or "failed" (then
    ``error`` says why)."""

    stage: str
    parameters: str
    inputs: tuple[dict, ...]
    outputs: tuple[str, ...]
    start_time_utc: str
    end_time_utc: str
    host: str
    device: str
    flow_run_id: str = ""
    task_run_id: str = ""
    git_revision: str = ""
    status: str = "completed"
    error: str = ""
    software: str = layout.SOFTWARE_NAME
    software_version: str = __version__

    def as_row(self) -> dict[str, str | list[str]]:
        """The record as the table's columns (every column of the spec, nothing else)."""
        names, values = flatten_parameters(json.loads(self.parameters))
        row = {
            "stage": self.stage, "software": self.software, "software_version": self.software_version,
            "git_revision": self.git_revision, "parameter_names": names, "parameter_values": values,
            "input_files": [i["file"] for i in self.inputs],
            "input_identifiers": [i.get("identifier", "") for i in self.inputs],
            "input_objects": [i["object"] for i in self.inputs],
            "input_sha256": [i["sha256"] for i in self.inputs], "outputs": list(self.outputs),
            "start_time_utc": self.start_time_utc, "end_time_utc": self.end_time_utc, "host": self.host,
            "device": self.device, "flow_run_id": self.flow_run_id, "task_run_id": self.task_run_id,
            "status": self.status, "error": self.error,
        }
        return row


def flatten_parameters(parameters: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """Nested parameters -> (dotted names, JSON-scalar values), in key order."""
    names, values = [], []
    for key, value in parameters.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            sub_names, sub_values = flatten_parameters(value, prefix=f"{name}.")
            names += sub_names
            values += sub_values
        else:
            names.append(name)
            values.append(json.dumps(value))
    return names, values


def unflatten_parameters(names: list[str], values: list[str]) -> dict:
    """Inverse of :func:`flatten_parameters`."""
    nested: dict = {}
    for name, value in zip(names, values):
        *parents, leaf = name.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(value)
    return nested


def read_provenance(nwbfile) -> list[dict]:
    """The provenance rows of an open NWBFile as dicts, parameters packed back into a dict.

    Files written before ndx-nwbflow 0.2.0 lack ``input_identifiers``, ``status`` and ``error``: their
    rows read as completed, with empty identifiers. A table without ``outputs`` (no row had any) reads
    as empty lists.
    """
    module = nwbfile.processing.get(layout.PROVENANCE_MODULE)
    if module is None or layout.PROVENANCE_TABLE not in module.data_interfaces:
        return []
    table = module[layout.PROVENANCE_TABLE]
    rows = []
    for index in range(len(table)):
        row = {column: table[column][index] for column in PROVENANCE_COLUMNS if column in table.colnames}
        row.setdefault("status", "completed")
        row.setdefault("error", "")
        row["parameters"] = unflatten_parameters(list(row.pop("parameter_names")),
                                                 list(row.pop("parameter_values")))
        files = list(row.pop("input_files"))
        identifiers = list(row.pop("input_identifiers", [""] * len(files)))
        row["inputs"] = [{"file": f, "identifier": i, "object": o, "sha256": h} for f, i, o, h in
                         zip(files, identifiers, row.pop("input_objects"), row.pop("input_sha256"))]
        row["outputs"] = list(row.get("outputs", []))  # absent when no row has any
        rows.append(row)
    return rows
