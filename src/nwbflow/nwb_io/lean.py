"""A lean processed file: everything of the session but its bulk acquisition data.

The processed file is what gets stored twice and uploaded to DANDI; the raw samples are already in the
raw file. So every continuous ElectricalSeries (raw band or LFP, in acquisition or in a processing
module) and every imaging stack (TwoPhotonSeries, OnePhotonSeries) is left out of it, and what pointed
at them is kept meaningful:

- a TimeSeries that shares a dropped series' timestamps (a link) gets their values;
- a DecompositionSeries loses its optional link to the dropped source;
- a PlaneSegmentation's reference images keep only those still in the file;
- an LFP or FilteredEphys container emptied by it goes too (the schema wants one series at least).

Anything else that points at a bulk series (an extension's link, say) keeps that series in the file,
with a warning: a link is never left dangling. Results that derive from a dropped series name it by
the raw file's NWB identifier and object path (``MotionEstimate.source_file_identifier`` and
``source_object_path``).
"""

from __future__ import annotations

import logging

import numpy as np
import pynwb
from pynwb.ecephys import LFP, ElectricalSeries, FilteredEphys, SpikeEventSeries
from pynwb.ophys import OnePhotonSeries, TwoPhotonSeries

log = logging.getLogger(__name__)

#: Types whose data is bulk acquisition data (SpikeEventSeries, snippets, are not).
BULK_TYPES = (ElectricalSeries, TwoPhotonSeries, OnePhotonSeries)


def container_path(container) -> str:
    """The in-file object path of a container of a read file under acquisition or processing, e.g.
    ``acquisition/ElectricalSeries`` or ``processing/ecephys/LFP/ElectricalSeries`` (else its names)."""
    chain, node = [], container
    while node.parent is not None and not isinstance(node, pynwb.NWBFile):
        chain.append(node)
        node = node.parent
    top = chain[-1]
    names = [c.name for c in reversed(chain)]
    if isinstance(top, pynwb.ProcessingModule):
        return "/".join(["processing", *names])
    if isinstance(node, pynwb.NWBFile) and node.acquisition.get(top.name) is top:
        return "/".join(["acquisition", *names])
    return "/".join(names)


def bulk_series(nwbfile: pynwb.NWBFile) -> list:
    """The file's bulk series (:data:`BULK_TYPES`, SpikeEventSeries excepted)."""
    return [c for c in nwbfile.objects.values()
            if isinstance(c, BULK_TYPES) and not isinstance(c, SpikeEventSeries)]


def drop_bulk(nwbfile: pynwb.NWBFile) -> list[str]:
    """Take the bulk series out of a read NWBFile before export (module docstring); returns the object
    paths dropped. What points at a dropped series is rewritten; a series something else points at stays."""
    dropped = []
    for series in bulk_series(nwbfile):
        referrers = [(c, name) for c in nwbfile.objects.values() if c is not series
                     for name, value in c.fields.items() if _points_at(value, series)]
        if not all(_unlink(container, name, series) for container, name in referrers):
            log.warning("%s stays in the processed file: %s point(s) at it", container_path(series),
                        ", ".join(f"{container_path(c)}.{name}" for c, name in referrers))
            continue
        path = container_path(series)
        parent = series.parent
        _detach(series)
        dropped.append(path)
        if isinstance(parent, (LFP, FilteredEphys)) and not parent.electrical_series:
            _detach(parent)
    return dropped


def _points_at(value, target) -> bool:
    if value is target:
        return True
    return isinstance(value, (list, tuple)) and any(item is target for item in value)


def _unlink(container, name: str, target) -> bool:
    """Rewrite ``container.<name>``, which points at ``target``, so that it no longer does; False when
    there is no rule for it."""
    if name == "timestamps" and isinstance(container, pynwb.TimeSeries):
        container.fields["timestamps"] = np.asarray(target.timestamps[:])  # the shared values, kept
        return True
    if name == "source_timeseries":
        del container.fields["source_timeseries"]  # optional in the schema
        return True
    if name == "reference_images":
        kept = tuple(image for image in container.fields["reference_images"] if image is not target)
        if kept:
            container.fields["reference_images"] = kept
        else:
            del container.fields["reference_images"]
        return True
    return False


def _detach(container) -> None:
    """Remove ``container`` from its parent (the parent's dict of children, which resets the parent)."""
    parent = container.parent
    for value in parent.fields.values():
        if isinstance(value, dict) and value.get(container.name) is container:
            value.pop(container.name)
            return
    raise ValueError(f"{container_path(container)} is not in a dict of its parent {parent.name}")
