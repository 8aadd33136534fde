"""An ElectricalSeries as a SpikeInterface recording, read through our reader (for SpikeInterface sorters).

Our reader already copes with the writers and versions we meet (conversion, offsets, channel
positions from several column conventions, external links), so SpikeInterface sorters see the
same traces (µV float32) and positions our own stages see. The recording pickles as (path,
object path), so SpikeInterface's worker processes reopen the file read-only themselves.

SpikeInterface also copies a recording inside one process (from those same arguments) and leaves the
copies to the garbage collector. The copies therefore share the first recording's open file, and
closing that recording closes it for all of them: no handle on the input outlives the sorter (a stray
one would make the next open of the file with other HDF5 locking flags fail in this process).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from spikeinterface.core import BaseRecording, BaseRecordingSegment

from nwbflow.nwb_io.read import NwbSession, open_session

#: (resolved file, series) -> the session the first recording of it opened, shared by its copies.
_SHARED: dict[tuple[str, str], NwbSession] = {}
_SHARED_LOCK = threading.Lock()


class NwbSeriesRecording(BaseRecording):
    """SpikeInterface recording of one ElectricalSeries (``object_path``) of ``nwb_path``, µV float32."""

    def __init__(self, nwb_path: str, object_path: str):
        key = (str(Path(nwb_path).resolve()), object_path)
        with _SHARED_LOCK:
            session = _SHARED.get(key)
            self._owns_session = session is None or session.closed
            if self._owns_session:
                session = _SHARED[key] = open_session(nwb_path)
        self._shared_key = key
        series = session.select_ephys(object_path)
        channel_ids = np.arange(series.num_channels)
        super().__init__(sampling_frequency=series.sampling_rate_hz, channel_ids=channel_ids, dtype="float32")
        self.set_channel_locations(np.asarray(series.channel_positions_um, dtype=np.float64))
        self.set_channel_gains(np.ones(series.num_channels))
        self.set_channel_offsets(np.zeros(series.num_channels))
        self.add_recording_segment(_SeriesSegment(session, series))
        self._kwargs = {"nwb_path": str(nwb_path), "object_path": object_path}
        self._session = session

    def close(self) -> None:
        """Close the file (idempotent): the first recording of a series closes it for its copies too; none
        can be read after."""
        if not self._owns_session:
            return
        with _SHARED_LOCK:
            if _SHARED.get(self._shared_key) is self._session:
                del _SHARED[self._shared_key]
        self._session.close()


class _SeriesSegment(BaseRecordingSegment):
    def __init__(self, session, series):
        super().__init__(sampling_frequency=series.sampling_rate_hz, t_start=None)
        self._session, self._series = session, series

    def get_num_samples(self) -> int:
        return int(self._series.num_samples)

    def get_traces(self, start_frame=None, end_frame=None, channel_indices=None) -> np.ndarray:
        start = 0 if start_frame is None else int(start_frame)
        end = self.get_num_samples() if end_frame is None else int(end_frame)
        traces = self._series.get_traces(start, end)
        return traces if channel_indices is None else traces[:, channel_indices]
