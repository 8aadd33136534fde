"""Running a SpikeInterface sorter (the registry's ``"raw"`` entries) on a SpikeInterface recording.

The sorter runs with its own preprocessing and ``SortingParams.sorter_params`` in its own folder;
what comes back is the spike trains, as :class:`SpikeTrains`. A sorter SpikeInterface does not
report installed is refused before anything runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nwbflow.ephys.sorting import registry
from nwbflow.errors import BadInputError
from nwbflow.params import SortingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpikeTrains:
    """Sorted spikes: samples (N,) int64 ascending, units (N,) int64 0..U-1, U units."""

    samples: np.ndarray
    units: np.ndarray
    num_units: int


def run_spikeinterface_sorter(name: str, recording, params: SortingParams, folder: Path) -> SpikeTrains:
    """Run SpikeInterface's sorter ``name`` on ``recording`` (a SpikeInterface recording) in ``folder``."""
    from spikeinterface.sorters import run_sorter

    available = registry.installed()
    if name not in available:
        raise BadInputError(f"SpikeInterface sorter {name!r} is not installed here "
                            f"(installed: {', '.join(available)})",
                            fix="choose sorter 'nwbflow' or install the sorter's dependencies "
                                "(`pip install hdbscan` for spykingcircus2 / tridesclous2, "
                                "numba, scikit-learn and hdbscan for simple)")
    log.info("running SpikeInterface sorter %s", name)
    sorting = run_sorter(name, recording, folder=str(folder), remove_existing_folder=True, verbose=False,
                         **params.sorter_params)
    samples, units = [], []
    for index, unit_id in enumerate(sorting.unit_ids):
        train = sorting.get_unit_spike_train(unit_id=unit_id, segment_index=0)
        samples.append(train.astype(np.int64))
        units.append(np.full(len(train), index, np.int64))
    if not samples:
        return SpikeTrains(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    samples, units = np.concatenate(samples), np.concatenate(units)
    order = np.argsort(samples, kind="stable")
    return SpikeTrains(samples[order], units[order], len(sorting.unit_ids))
