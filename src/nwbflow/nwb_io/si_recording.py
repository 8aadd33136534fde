"""An ElectricalSeries as a SpikeInterface recording, read through our reader (for SpikeInterface sorters).

Our reader already copes with the writers and versions we meet (conversion, offsets, channel
positions from several column conventions, external links), so SpikeInterface sorters see the
same traces (µV float32) and positions our own stages see. The recording pickles as (path,
object path), so SpikeInterface's worker processes reopen the file read-only themselves.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.core import BaseRecording, BaseRecordingSegment

from nwbflow.nwb_io.read import open_session


class NwbSeriesRecording(BaseRecording):
    """SpikeInterface recording of one ElectricalSeries (``object_path``) of ``nwb_path``, µV float32."""

    def __init__(self, nwb_path: str, object_path: str):
        session = open_session(nwb_path)
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
        """Close the file (idempotent); the recording cannot be read after."""
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
