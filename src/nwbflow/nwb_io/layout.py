"""The names and NWB types of every result nwbflow writes: one place for each.

A processed file holds (DESIGN.md, "Results in NWB"):

- ``processing/nwbflow/provenance`` : ProvenanceTable (ndx-nwbflow), one row per stage run
- ``processing/ecephys/motion``     : MotionEstimate (ndx-nwbflow)
- ``processing/ecephys/peaks``      : core EventsTable (optional)
- ``units``                         : the file's Units table
- ``processing/ophys/Deconvolved/inferred_spike_rate`` : RoiResponseSeries (Hz)
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

OPHYS_MODULE = "ophys"
DECONVOLVED = "Deconvolved"
SPIKE_RATE = "inferred_spike_rate"


def object_path(module: str, name: str) -> str:
    """The in-file path of a result, e.g. ``processing/ecephys/peaks``."""
    return f"processing/{module}/{name}"


PROVENANCE_PATH = object_path(PROVENANCE_MODULE, PROVENANCE_TABLE)
PEAKS_PATH = object_path(ECEPHYS_MODULE, PEAKS)
MOTION_PATH = object_path(ECEPHYS_MODULE, MOTION)
