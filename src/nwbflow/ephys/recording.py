"""The preprocessed recording: what preprocess writes once and every later ephys stage reads.

A :class:`PreprocessedRecording` is the one record of a preprocessed (and, after the motion stage,
motion-corrected) recording: the scratch binary and how its values are stored, the sampling rate,
the channel positions, the whitening ``W`` and its inverse, the offsets subtracted, the bad
channels, and the session clock that turns sample indices into seconds (:class:`SessionClock`).
Later stages read the traces through :meth:`PreprocessedRecording.open` (a
:class:`~nwbflow.ephys.chunks.TraceSource`) and take every other fact from the record: none of them
opens the NWB file again or re-derives a matrix.

On disk (:meth:`PreprocessedRecording.save`) a record is ``recording.json`` beside the binary, with
``whitening.npy``, ``whitening_inverse.npy`` and, for a timestamped series, ``timestamps.npy``;
paths are stored relative to that folder (a work directory can move), each file written atomically.

Examples
--------
>>> import numpy as np
>>> clock = SessionClock(rate_hz=1000.0, starting_time_s=2.0)
>>> clock.times_s(np.array([0, 500])).tolist()
[2.0, 2.5]
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nwbflow.atomic import atomic_path
from nwbflow.ephys.chunks import ArraySource, BinaryFileSource, open_binary

__all__ = ["RECORD_FILE", "PreprocessedRecording", "SessionClock", "copy_timestamps"]

#: The record's file name in its folder.
RECORD_FILE = "recording.json"
WHITENING_FILE, WHITENING_INVERSE_FILE, TIMESTAMPS_FILE = "whitening.npy", "whitening_inverse.npy", "timestamps.npy"
#: Timestamps are copied and read in blocks of this many values (memory stays bounded).
TIMESTAMP_BLOCK = 1 << 20


@dataclass(frozen=True)
class SessionClock:
    """The session-clock time (s) of each sample of a recording.

    ``starting_time_s + i / rate_hz`` for a series sampled at a rate, ``timestamps[i]`` for a
    timestamped one (``timestamps_path``: a float64 ``.npy`` of one time per sample, read in slices).

    Attributes
    ----------
    rate_hz : float
        Sampling rate (Hz; 1 / median interval for a timestamped series).
    starting_time_s : float
        Time of sample 0 (s).
    timestamps_path : Path or None
    """

    rate_hz: float
    starting_time_s: float = 0.0
    timestamps_path: Path | None = None

    def times_s(self, sample_indices: np.ndarray) -> np.ndarray:
        """Times (s, float64) of integer ``sample_indices`` of any shape."""
        indices = np.asarray(sample_indices)
        if indices.size and indices.dtype.kind not in "iu":
            raise TypeError(f"sample indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64)
        if self.timestamps_path is None:
            return self.starting_time_s + indices / self.rate_hz
        return np.asarray(self.sample_times_s()[indices.reshape(-1)], dtype=np.float64).reshape(indices.shape)

    def sample_times_s(self) -> float | np.ndarray:
        """The first sample's time (s), or every sample's time as a read-only memory map (sliced per chunk)."""
        if self.timestamps_path is None:
            return self.starting_time_s
        return np.load(self.timestamps_path, mmap_mode="r")

    def to_json(self, folder: Path) -> dict:
        """The clock as JSON, its timestamps file relative to ``folder`` (the record's folder)."""
        path = None if self.timestamps_path is None else os.path.relpath(self.timestamps_path, folder)
        return {"rate_hz": self.rate_hz, "starting_time_s": self.starting_time_s, "timestamps": path}

    @classmethod
    def from_json(cls, data: dict, folder: Path) -> SessionClock:
        path = data.get("timestamps")
        return cls(float(data["rate_hz"]), float(data["starting_time_s"]), None if path is None else folder / path)


def copy_timestamps(timestamps, path: Path) -> Path:
    """Write a 1-D sliceable array of times (s; e.g. an h5py dataset) to ``path`` as float64 ``.npy``,
    one block at a time, atomically."""
    count = int(timestamps.shape[0])
    with atomic_path(path, suffix=".npy") as tmp:
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(count,))
        for start in range(0, count, TIMESTAMP_BLOCK):
            stored[start:start + TIMESTAMP_BLOCK] = np.asarray(timestamps[start:start + TIMESTAMP_BLOCK], np.float64)
        stored.flush()
        del stored
    return path


@dataclass(frozen=True, eq=False)
class PreprocessedRecording:
    """One preprocessed recording and every fact later stages need to read it.

    Attributes
    ----------
    binary_path : Path
        (num_samples, num_channels) C-order raw binary, values stored as ``dtype``.
    dtype : {"float16", "float32"}
        Storage of the binary; read as float32.
    num_samples, num_channels : int
    sampling_rate_hz : float
    channel_positions_um : (num_channels, 2) float64, µm, or None (unknown)
    whitening : (num_channels, num_channels) float64, 1/µV, or None
        ``W`` applied to each filtered sample as ``x_white = W @ x`` (None: not whitened).
    whitening_inverse : (num_channels, num_channels) float64, µV, or None
        ``W^-1``, computed once by preprocess: ``x = W^-1 @ x_white`` maps back to the filtered scale.
    clock : SessionClock
    offsets_uv : (num_channels,) float64, µV
        Per-channel offsets subtracted first.
    margin_samples : int
        Context read on each side of every chunk (the band-pass's).
    bad_channels : tuple of int
        Channels left out of referencing, whitening, detection and sorting (zeros in the binary).
    bad_channel_labels : dict
        ``{"dead": [...], "noisy": [...], "outside": [...]}``: why each was left out (empty when detection
        was off or the probe too small).
    device : str
        Where preprocess ran.
    phase_shifted : bool
        Whether each channel's ADC sampling delay was undone (``PreprocessParams.adc_phase_shift`` and the
        file's ``inter_sample_shift``).
    saturated_periods : tuple of (int, int)
        ``[start, end)`` samples zeroed as saturated or artifact (:mod:`nwbflow.ephys.saturation`), sorted.
    shank_ids : tuple of str
        Each channel's shank on a multi-shank probe (the electrodes' shank or group); empty for one shank.
        Motion is estimated per shank, and no template spans two.
    """

    binary_path: Path
    dtype: str
    num_samples: int
    num_channels: int
    sampling_rate_hz: float
    channel_positions_um: np.ndarray | None
    whitening: np.ndarray | None
    whitening_inverse: np.ndarray | None
    clock: SessionClock
    offsets_uv: np.ndarray
    margin_samples: int
    bad_channels: tuple[int, ...] = field(default=())
    device: str = "cpu"
    phase_shifted: bool = False
    bad_channel_labels: dict = field(default_factory=dict)
    saturated_periods: tuple[tuple[int, int], ...] = field(default=())
    shank_ids: tuple[str, ...] = field(default=())

    def open(self) -> ArraySource | BinaryFileSource:
        """The binary as a :class:`~nwbflow.ephys.chunks.TraceSource` (float32 windows)."""
        return open_binary(self.binary_path, self.num_channels, self.sampling_rate_hz, dtype=self.dtype)

    def with_binary(self, binary_path: Path) -> PreprocessedRecording:
        """The same recording stored in another binary of the same layout (e.g. motion-corrected)."""
        return dataclasses.replace(self, binary_path=Path(binary_path))

    def save(self, folder: str | Path) -> Path:
        """Write ``recording.json`` (and the matrices) into ``folder``, where the binary lies; returns the json."""
        folder = Path(folder)
        for name, matrix in ((WHITENING_FILE, self.whitening), (WHITENING_INVERSE_FILE, self.whitening_inverse)):
            if matrix is not None:
                with atomic_path(folder / name, suffix=".npy") as tmp:
                    np.save(tmp, np.asarray(matrix, np.float64))
        payload = {
            "binary": os.path.relpath(self.binary_path, folder), "dtype": self.dtype,
            "num_samples": self.num_samples, "num_channels": self.num_channels,
            "sampling_rate_hz": self.sampling_rate_hz,
            "channel_positions_um": None if self.channel_positions_um is None else
            np.asarray(self.channel_positions_um, np.float64).tolist(),
            "whitening": None if self.whitening is None else WHITENING_FILE,
            "whitening_inverse": None if self.whitening_inverse is None else WHITENING_INVERSE_FILE,
            "clock": self.clock.to_json(folder), "offsets_uv": np.asarray(self.offsets_uv, np.float64).tolist(),
            "margin_samples": self.margin_samples, "bad_channels": list(self.bad_channels), "device": self.device,
            "phase_shifted": self.phase_shifted, "bad_channel_labels": self.bad_channel_labels,
            "saturated_periods": [list(p) for p in self.saturated_periods], "shank_ids": list(self.shank_ids)}
        with atomic_path(folder / RECORD_FILE) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
        return folder / RECORD_FILE

    @classmethod
    def load(cls, folder: str | Path) -> PreprocessedRecording:
        """The record saved in ``folder`` (:meth:`save`)."""
        folder = Path(folder)
        data = json.loads((folder / RECORD_FILE).read_text())
        positions = data["channel_positions_um"]
        return cls(binary_path=folder / data["binary"], dtype=data["dtype"], num_samples=int(data["num_samples"]),
                   num_channels=int(data["num_channels"]), sampling_rate_hz=float(data["sampling_rate_hz"]),
                   channel_positions_um=None if positions is None else np.asarray(positions, np.float64),
                   whitening=_load_matrix(folder, data["whitening"]),
                   whitening_inverse=_load_matrix(folder, data["whitening_inverse"]),
                   clock=SessionClock.from_json(data["clock"], folder),
                   offsets_uv=np.asarray(data["offsets_uv"], np.float64), margin_samples=int(data["margin_samples"]),
                   bad_channels=tuple(int(c) for c in data["bad_channels"]), device=data["device"],
                   phase_shifted=bool(data.get("phase_shifted", False)),
                   bad_channel_labels=data.get("bad_channel_labels", {}),
                   saturated_periods=tuple((int(a), int(b)) for a, b in data.get("saturated_periods", [])),
                   shank_ids=tuple(str(s) for s in data.get("shank_ids", [])))


def _load_matrix(folder: Path, name: str | None) -> np.ndarray | None:
    return None if name is None else np.load(folder / name)
