"""Build the ``ndx-nwbflow`` namespace: the single source of the committed YAML.

Run from the repository root after changing a type::

    python -m nwbflow.extensions.build_spec

It rewrites ``src/nwbflow/extensions/spec/ndx-nwbflow.namespace.yaml`` and
``ndx-nwbflow.extensions.yaml``; commit both. A test regenerates them into a
temporary folder and checks they are identical to the committed files, so the
YAML never drifts from this script. Because ``-m`` first imports
``nwbflow.extensions`` (which loads the committed YAML), a committed spec that
no longer loads can still be rebuilt with
``python src/nwbflow/extensions/build_spec.py`` (this file needs only pynwb).

Types
-----
ProvenanceTable
    hdmf-common ``DynamicTable``, one row per stage run (what ran, with which
    parameters, code version, inputs, outputs, time span, host and device).
MotionEstimate
    core ``NWBDataInterface``, a motion estimate compatible with
    SpikeInterface's ``Motion`` (displacement per time bin and depth bin).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pynwb.spec import (
    NWBAttributeSpec,
    NWBDatasetSpec,
    NWBGroupSpec,
    NWBLinkSpec,
    NWBNamespaceBuilder,
)

logger = logging.getLogger(__name__)

NAMESPACE = "ndx-nwbflow"
VERSION = "0.2.1"
NAMESPACE_FILE = f"{NAMESPACE}.namespace.yaml"
EXTENSIONS_FILE = f"{NAMESPACE}.extensions.yaml"
SPEC_DIR = Path(__file__).resolve().parent / "spec"

# (column name, is a list per row, doc) in table order; every column is text. The columns of
# _OPTIONAL_COLUMNS are optional in the spec (those added after 0.1.0, so that files written by 0.1.0 still read).
# Structured facts are unpacked into list-valued (ragged) columns rather than
# JSON objects: nwbinspector flags dictionaries held in table strings
# (``check_table_values_for_dict``, a BEST_PRACTICE_VIOLATION).
# The times are named ``*_time_utc``, not ``*_time``: by NWB convention (and
# nwbinspector's ``check_table_time_columns_are_not_negative``, which crashes on
# text there, an ERROR that ``dandi validate`` reports as blocking) a column
# ending in ``_time`` holds numbers in seconds on the session clock.
_PROVENANCE_COLUMN_DOCS: tuple[tuple[str, bool, str], ...] = (
    ("stage", False, "Name of the processing stage that ran, e.g. 'preprocess', 'peaks', "
                     "'motion', 'sorting' or 'calcium'."),
    ("software", False, "Name of the software package that ran the stage, e.g. 'nwbflow'."),
    ("software_version", False, "Version string of that software package, e.g. '0.1.0'."),
    ("git_revision", False, "Git commit hash of the software source tree that ran the stage; "
                            "empty string when unknown (e.g. installed from a wheel)."),
    ("parameter_names", True, "Names of the resolved stage parameters (defaults filled in, units "
                              "in the names); nested parameters are joined with '.'."),
    ("parameter_values", True, "Value of each parameter in parameter_names, as JSON text "
                               "(a number, string, boolean, null or list)."),
    ("input_files", True, "Name (not path: the file is published) of the file holding each input of the "
                          "stage."),
    ("input_identifiers", True, "NWB identifier of the file holding each input (NWBFile.identifier), which "
                                "names the input file across copies and renames."),
    ("input_objects", True, "Object path of each input inside its file, e.g. "
                            "'acquisition/ElectricalSeries'."),
    ("input_sha256", True, "Content hash of each input's data: 'sha256:<hex>' of its decoded values, or "
                     "'sha256-stored:<hex>' of its stored (compressed) chunks."),
    ("outputs", True, "NWB object paths this stage's results were written to in this file (work-directory "
                      "artifacts are recorded in the work directory, not here). Absent when no row has any "
                      "(e.g. every stage's result was skipped): an empty list column trips some readers."),
    ("start_time_utc", False, "Wall-clock time the stage run started, ISO 8601 text in UTC, "
                              "e.g. '2024-05-01T12:00:00.000000+00:00' (not seconds on the "
                              "session clock)."),
    ("end_time_utc", False, "Wall-clock time the stage run ended, ISO 8601 text in UTC, "
                            "e.g. '2024-05-01T12:03:10.250000+00:00' (not seconds on the "
                            "session clock)."),
    ("host", False, "Host name of the machine that ran the stage."),
    ("device", False, "Compute device the stage ran on, e.g. 'cpu' or 'cuda:0'."),
    ("flow_run_id", False, "Prefect flow-run id (UUID text) the stage ran under; "
                           "empty string when not run under Prefect."),
    ("task_run_id", False, "Prefect task-run id (UUID text) of the stage; "
                           "empty string when not run under Prefect."),
    ("status", False, "'completed', or 'failed' for a stage whose series failed (its results are not in this "
                      "file; the other series' are)."),
    ("error", False, "Why the stage failed (the error's type and message); empty string when completed."),
)
#: Columns optional in the spec: those added after version 0.1.0, and ``outputs`` (left out when every row's
#: list is empty: a ragged column with no values at all crashes nwbinspector's table checks, issue #712).
_OPTIONAL_COLUMNS = ("input_identifiers", "status", "error", "outputs")


def provenance_table_spec() -> NWBGroupSpec:
    """Spec of ``ProvenanceTable``: one text column per fact about a stage run.

    Returns
    -------
    NWBGroupSpec
        A ``DynamicTable`` subtype whose columns are text ``VectorData`` in the
        order of ``_PROVENANCE_COLUMN_DOCS``, required but for ``_OPTIONAL_COLUMNS``;
        list-valued columns have a ``<name>_index`` ``VectorIndex``.
    """
    datasets = []
    for name, ragged, doc in _PROVENANCE_COLUMN_DOCS:
        quantity = "?" if name in _OPTIONAL_COLUMNS else 1
        datasets.append(NWBDatasetSpec(name=name, neurodata_type_inc="VectorData", dtype="text", doc=doc,
                                       quantity=quantity))
        if ragged:
            datasets.append(NWBDatasetSpec(name=f"{name}_index", neurodata_type_inc="VectorIndex",
                                           doc=f"Index into the {name} column: one list per row.",
                                           quantity=quantity))
    return NWBGroupSpec(
        neurodata_type_def="ProvenanceTable",
        neurodata_type_inc="DynamicTable",
        default_name="provenance",
        doc=("Provenance of the processing that produced this file: one row per stage run, "
             "recording what ran, with which parameters, code version, inputs (with content "
             "hashes), outputs, time span, host and compute device. Times are ISO 8601 UTC text."),
        datasets=datasets,
    )


def _bin_centers_spec(name: str, dim: str, doc: str) -> NWBDatasetSpec:
    """Spec of a 1-D float64 bin-centre dataset named ``name`` along ``dim``."""
    return NWBDatasetSpec(name=name, dtype="float64", dims=[dim], shape=[None], doc=doc)


def motion_estimate_spec() -> NWBGroupSpec:
    """Spec of ``MotionEstimate``, compatible with SpikeInterface's ``Motion``.

    Returns
    -------
    NWBGroupSpec
        An ``NWBDataInterface`` subtype holding one motion segment:
        ``displacement`` (num_time_bins, num_depth_bins) float32 in µm,
        ``time_bin_centers`` (num_time_bins,) float64 in s and
        ``depth_bin_centers`` (num_depth_bins,) float64 in µm.
    """
    displacement = NWBDatasetSpec(
        name="displacement",
        dtype="float32",
        dims=["num_time_bins", "num_depth_bins"],
        shape=[None, None],
        doc=("Estimated probe-tissue displacement in micrometres at each time bin "
             "(rows) and depth bin (columns). Sign convention: observed depth = "
             "rest depth + displacement, so a motion-corrected depth is "
             "observed depth - displacement (as in SpikeInterface's Motion)."),
        attributes=[NWBAttributeSpec(name="unit", dtype="text", value="um",
                                     doc="Unit of displacement: micrometres, fixed 'um'.")],
    )
    time_bins = _bin_centers_spec(
        "time_bin_centers", "num_time_bins",
        "Centre of each time bin, in seconds on the session clock "
        "(relative to the file's timestamps_reference_time).")
    depth_bins = _bin_centers_spec(
        "depth_bin_centers", "num_depth_bins",
        "Centre of each depth bin along the motion direction, in micrometres "
        "in the probe's contact-position coordinates.")
    attributes = [
        NWBAttributeSpec(name="method", dtype="text",
                         doc="Name of the motion estimation method, e.g. 'medicine' or 'dredge'."),
        NWBAttributeSpec(name="parameters", dtype="text",
                         doc="JSON object of the resolved parameters of the estimation method."),
        NWBAttributeSpec(name="direction", dtype="text",
                         doc="Probe axis along which motion was estimated: 'x', 'y' or 'z' "
                             "(usually 'y', the depth axis)."),
        NWBAttributeSpec(name="description", dtype="text",
                         doc="Free-text description of this motion estimate."),
        NWBAttributeSpec(name="source_file_identifier", dtype="text", required=False,
                         doc="NWB identifier (NWBFile.identifier) of the file holding the ElectricalSeries the "
                             "motion was estimated from: the raw file, which a processed file does not copy."),
        NWBAttributeSpec(name="source_object_path", dtype="text", required=False,
                         doc="Object path of that ElectricalSeries in that file, e.g. "
                             "'acquisition/ElectricalSeriesAP'."),
    ]
    source = NWBLinkSpec(
        name="source_electrical_series",
        target_type="ElectricalSeries",
        quantity="?",
        doc="The ElectricalSeries whose spikes the motion was estimated from, when this file holds it (a "
            "self-contained copy); source_file_identifier and source_object_path name it in any case.",
    )
    return NWBGroupSpec(
        neurodata_type_def="MotionEstimate",
        neurodata_type_inc="NWBDataInterface",
        default_name="motion",
        doc=("Estimated motion of the tissue relative to the probe, as a displacement per "
             "time bin and depth bin (a non-rigid estimate; one depth bin when rigid). "
             "Compatible with one segment of SpikeInterface's Motion object. "
             "Sign convention: observed depth = rest depth + displacement."),
        datasets=[displacement, time_bins, depth_bins],
        attributes=attributes,
        links=[source],
    )


def namespace_builder() -> NWBNamespaceBuilder:
    """The ``ndx-nwbflow`` namespace with both types added (core is included)."""
    builder = NWBNamespaceBuilder(
        doc="nwbflow's NWB extension: processing provenance and motion estimates.",
        name=NAMESPACE,
        version=VERSION,
        author="nwbflow developers",
    )
    builder.include_namespace("core")
    for spec in (provenance_table_spec(), motion_estimate_spec()):
        builder.add_spec(EXTENSIONS_FILE, spec)
    return builder


def _strip_trailing_spaces(path: Path) -> None:
    """Drop the spaces hdmf's YAML writer leaves where it wraps a long ``doc``.

    YAML line folding discards whitespace before a line break in plain and
    quoted scalars, so the loaded spec is unchanged; the committed files just
    stay clean under whitespace-trimming editors and hooks.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("".join(line.rstrip() + "\n" for line in lines), encoding="utf-8")


def main(out_dir: str | Path = SPEC_DIR) -> Path:
    """Write the namespace and extensions YAML files into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write ``ndx-nwbflow.namespace.yaml`` and
        ``ndx-nwbflow.extensions.yaml`` into; created if missing. Defaults to
        the package's ``spec`` folder (the committed files).

    Returns
    -------
    Path
        Path of the written namespace file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    namespace_builder().export(NAMESPACE_FILE, outdir=str(out_dir))
    for name in (NAMESPACE_FILE, EXTENSIONS_FILE):
        _strip_trailing_spaces(out_dir / name)
    logger.info("wrote %s and %s in %s", NAMESPACE_FILE, EXTENSIONS_FILE, out_dir)
    return out_dir / NAMESPACE_FILE


def _cli() -> None:
    parser = argparse.ArgumentParser(description="Write the ndx-nwbflow spec YAML files.")
    parser.add_argument("out_dir", nargs="?", default=str(SPEC_DIR),
                        help="output folder (default: the package's spec folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(args.out_dir)


if __name__ == "__main__":
    _cli()
