"""Spike sorting by template matching (Kilosort's core ideas, our own code, in torch).

``sort_traces`` is the entry point; the modules are its steps: ``features`` (snippets, SVD
basis, clustering subset), ``clustering``, ``templates``, ``matching``, ``postprocess``
(merges) and ``metrics`` (waveforms and quality metrics on the unwhitened scale).
"""

from nwbflow.ephys.sorting.sorter import SortingResult, sort_traces

__all__ = ["SortingResult", "sort_traces"]
