"""The names and NWB types of every result nwbflow writes: one place for each.

A processed file holds (DESIGN.md, "Results in NWB"):

- ``processing/nwbflow/provenance`` : ProvenanceTable (ndx-nwbflow), one row per stage run
- ``processing/ecephys/motion``     : MotionEstimate (ndx-nwbflow), one per probe
- ``processing/ecephys/peaks``      : core EventsTable (optional), one per probe
- ``units``                         : the file's Units table, every probe's units (``electrical_series`` column)
- ``processing/ophys/Deconvolved/inferred_spike_rate`` : RoiResponseSeries (Hz), one per ROI series

With several series of a kind (probes, imaging planes), each per-series result's name gets the series'
label as a suffix (:func:`named`): ``motion_ElectricalSeriesAPImec0``, ``inferred_spike_rate_plane1``.
"""

from __future__ import annotations

SOFTWARE_NAME = "nwbflow"

PROVENANCE_MODULE = "nwbflow"
PROVENANCE_MODULE_DESCRIPTION = "Records of the nwbflow stages that produced this file."
PROVENANCE_TABLE = "provenance"

ECEPHYS_MODULE = "ecephys"
ECEPHYS_MODULE_DESCRIPTION = "Extracellular electrophysiology results computed by nwbflow."
MOTION = "motion"
PEAKS = "peaks"
#: Sorted units go to the file's ``units`` table; when the input already has one (e.g. a curated
#: sorting), to ``processing/ecephys/<UNITS_IN_PROCESSING>`` instead, leaving the original alone.
UNITS = "units"
UNITS_IN_PROCESSING = "units_nwbflow"
UNITS_DESCRIPTION = "Units sorted by nwbflow"

OPHYS_MODULE = "ophys"
DECONVOLVED = "Deconvolved"
SPIKE_RATE = "inferred_spike_rate"


def named(base: str, label: str) -> str:
    """A per-series result's name: ``base``, or ``base_<label>`` when the session has several series."""
    return f"{base}_{label}" if label else base


def object_path(module: str, name: str) -> str:
    """The in-file path of a result, e.g. ``processing/ecephys/peaks``."""
    return f"processing/{module}/{name}"


PROVENANCE_PATH = object_path(PROVENANCE_MODULE, PROVENANCE_TABLE)
PEAKS_PATH = object_path(ECEPHYS_MODULE, PEAKS)
MOTION_PATH = object_path(ECEPHYS_MODULE, MOTION)
OPHYS_MODULE_DESCRIPTION = "Optical physiology results computed by nwbflow."
#: The Deconvolved container (a core Fluorescence container) that holds the inferred spike rates.
OPHYS_RESULTS = object_path(OPHYS_MODULE, DECONVOLVED)
SPIKE_RATE_PATH = f"{OPHYS_RESULTS}/{SPIKE_RATE}"
#: The Units table's column naming each unit's source series (NeuroConv's multi-probe layout).
UNITS_SERIES_COLUMN = "electrical_series"


def units_path(in_processing: bool) -> str:
    """Where the sorted units go: the file's ``units``, or ``processing/ecephys/units_nwbflow``."""
    return object_path(ECEPHYS_MODULE, UNITS_IN_PROCESSING) if in_processing else UNITS
