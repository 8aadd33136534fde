"""The sorter registry's SpikeInterface side: run an installed SpikeInterface sorter on the raw series.

``SortingParams.sorter`` names the sorter (``params.SORTER_NAMES``); "nwbflow" is ours and runs
in ``tasks.sorting``; the others run here, on the raw ElectricalSeries read through our reader,
with their own preprocessing and ``SortingParams.sorter_params``. A sorter that SpikeInterface does
not report installed is refused before anything runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nwbflow.errors import BadInputError
from nwbflow.params import SORTER_NAMES, SortingParams

log = logging.getLogger(__name__)


#: Modules a sorter needs that SpikeInterface's own installed check does not look for.
UNCHECKED_REQUIREMENTS: dict[str, tuple[str, ...]] = {"simple": ("numba", "sklearn", "hdbscan")}


def installed_spikeinterface_sorters() -> list[str]:
    """Names of the registry's SpikeInterface sorters that can run here (no container)."""
    from importlib.util import find_spec

    from spikeinterface.sorters import installed_sorters
    available = set(installed_sorters())
    return [name for name in SORTER_NAMES[1:] if name in available
            and all(find_spec(module) is not None for module in UNCHECKED_REQUIREMENTS.get(name, ()))]


def run_spikeinterface_sorter(nwb_path: str, object_path: str, params: SortingParams,
                              folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Run ``params.sorter`` -> (spike samples (N,) int64 ascending, units (N,) int64 0..U-1, U)."""
    from spikeinterface.sorters import run_sorter

    from nwbflow.nwb_io.si_recording import NwbSeriesRecording

    installed = installed_spikeinterface_sorters()
    if params.sorter not in installed:
        raise BadInputError(f"SpikeInterface sorter {params.sorter!r} is not installed here "
                            f"(installed: {', '.join(installed) or 'none'})",
                            fix="choose sorter 'nwbflow' or install the sorter's dependencies "
                                "(`pip install hdbscan` for spykingcircus2 / tridesclous2, "
                                "numba, scikit-learn and hdbscan for simple)")
    recording = NwbSeriesRecording(nwb_path, object_path)
    log.info("running SpikeInterface sorter %s on %s:%s", params.sorter, nwb_path, object_path)
    sorting = run_sorter(params.sorter, recording, folder=str(folder), remove_existing_folder=True, verbose=False,
                         **params.sorter_params)
    samples, units = [], []
    for index, unit_id in enumerate(sorting.unit_ids):
        train = sorting.get_unit_spike_train(unit_id=unit_id, segment_index=0)
        samples.append(train.astype(np.int64))
        units.append(np.full(len(train), index, np.int64))
    if not samples:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    samples, units = np.concatenate(samples), np.concatenate(units)
    order = np.argsort(samples, kind="stable")
    return samples[order], units[order], len(sorting.unit_ids)
