"""Spike sorting by template matching (Kilosort's core ideas, our own code, in torch), one room per step.

``sorter.sort_traces`` runs the steps in order; each module is one of them:

- ``traces``: noise-scaled windows, snippet geometry, channel neighbourhoods (what every step reads with);
- ``detection``: the sorter's noise levels, per-channel threshold detection (waveforms for the basis),
  footprint detection (what feeds clustering), and the chunks sampled to measure score noise;
- ``features``: the SVD temporal basis and the bounded clustering subset of detected spikes;
- ``clustering``: per-channel clustering into initial templates;
- ``templates``: low-rank templates, duplicates, re-estimation from matched spikes;
- ``matching``: template matching with residual subtraction over the recording;
- ``curation``: merges of over-split units, removal of tiny, satellite and misaligned units;
- ``units``: unit waveforms, amplitudes and quality metrics on the unwhitened scale;
- ``registry``: the sorters the stage can run (ours and SpikeInterface's), ``spikeinterface``: running those.

The package imports nothing on its own, so that ``nwbflow.params`` can read the registry's names.
"""
