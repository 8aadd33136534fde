"""The sorters the sorting stage can run: one registry, name -> how to run it.

``SortingParams.sorter`` accepts exactly the names of :data:`SORTERS` (``nwbflow.params`` reads them,
so this module imports nothing of nwbflow at import time; implementations are imported on call).

Each entry says what the sorter reads:

- ``"preprocessed"`` (ours): the preprocess stage's recording, motion-corrected when the motion
  stage ran, called as ``run(source, channel_positions_um, params, *, chunk_duration_s, seed, device,
  progress) -> SortingResult``;
- ``"raw"`` (SpikeInterface's): the raw series as a SpikeInterface recording, with the sorter's own
  preprocessing, called as ``run(recording, params, folder) -> SpikeTrains``; our preprocess,
  peaks and motion stages then run only when asked for.

A SpikeInterface sorter runs only where it is installed (:func:`installed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal


@dataclass(frozen=True)
class Sorter:
    """One entry of :data:`SORTERS`: what it reads, how to run it, which modules it needs beyond
    SpikeInterface's own installed check."""

    reads: Literal["preprocessed", "raw"]
    run: Callable
    requires: tuple[str, ...] = ()
    description: str = ""


def _ours(source, channel_positions_um, params, **kwargs):
    from nwbflow.ephys.sorting.sorter import sort_traces

    return sort_traces(source, channel_positions_um, params, **kwargs)


def _spikeinterface(name: str, recording, params, folder):
    from nwbflow.ephys.sorting.spikeinterface import run_spikeinterface_sorter

    return run_spikeinterface_sorter(name, recording, params, folder)


SORTERS: dict[str, Sorter] = {
    "nwbflow": Sorter("preprocessed", _ours, description="ours: template matching in torch"),
    **{name: Sorter("raw", partial(_spikeinterface, name), requires, f"SpikeInterface's {name}")
       for name, requires in (("spykingcircus2", ("hdbscan",)), ("tridesclous2", ("hdbscan",)),
                              ("kilosort4", ()), ("mountainsort5", ()),
                              ("simple", ("numba", "sklearn", "hdbscan")))},
}


def installed() -> list[str]:
    """Names of the registry's sorters that can run here: ours, and SpikeInterface's that SpikeInterface
    reports installed (no container) and whose extra modules import."""
    from importlib.util import find_spec

    from spikeinterface.sorters import installed_sorters

    available = set(installed_sorters())
    return [name for name, sorter in SORTERS.items()
            if sorter.reads == "preprocessed" or (name in available
                                                  and all(find_spec(m) is not None for m in sorter.requires))]
