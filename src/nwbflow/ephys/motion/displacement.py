"""A motion estimate: displacement over time bins x depth bins, SpikeInterface's ``Motion`` convention.

Sign: a source is *observed* at its rest depth plus the displacement, and the
displacement is read at the observed depth (as SpikeInterface's ``Motion``,
MEDiCINe and DREDge do): a peak seen at depth ``z`` at time ``t`` rests at
``z - displacement(t, z)``. Between bin centres
the displacement is interpolated linearly in time and depth and held
constant beyond the first/last centre.

Examples
--------
>>> import numpy as np
>>> motion = Motion(time_bins_s=np.array([0.5, 1.5]), depth_bins_um=np.array([0.0, 100.0]),
...                 displacement_um=np.array([[0.0, 0.0], [10.0, 20.0]], dtype=np.float32))
>>> motion.displacement_at(np.array([1.0, 1.5, 9.0]), np.array([50.0, 100.0, 0.0])).tolist()
[7.5, 20.0, 10.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Motion", "ShankMotion"]


@dataclass(frozen=True, eq=False)
class Motion:
    """Displacement of the tissue relative to the probe.

    Attributes
    ----------
    time_bins_s : (T,) float64, s
        Centres of the time bins, increasing, on the recording's clock.
    depth_bins_um : (D,) float64, µm
        Centres of the depth bins along the probe (``direction``), increasing; D = 1 for rigid motion.
    displacement_um : (T, D) float32, µm
        Observed depth minus rest depth.
    direction : str
        Probe axis the depth is measured along ("y").
    """

    time_bins_s: np.ndarray
    depth_bins_um: np.ndarray
    displacement_um: np.ndarray
    direction: str = "y"

    def __post_init__(self) -> None:
        times = np.asarray(self.time_bins_s, dtype=np.float64)
        depths = np.asarray(self.depth_bins_um, dtype=np.float64)
        displacement = np.asarray(self.displacement_um, dtype=np.float32)
        if displacement.shape != (len(times), len(depths)) or len(times) == 0 or len(depths) == 0:
            raise ValueError(f"displacement_um must be (num_time_bins, num_depth_bins) = ({len(times)}, "
                             f"{len(depths)}), got {displacement.shape}")
        if np.any(np.diff(times) <= 0) or np.any(np.diff(depths) <= 0):
            raise ValueError("time_bins_s and depth_bins_um must be strictly increasing")
        object.__setattr__(self, "time_bins_s", times)
        object.__setattr__(self, "depth_bins_um", depths)
        object.__setattr__(self, "displacement_um", displacement)

    def displacement_at(self, times_s: np.ndarray, depths_um: np.ndarray) -> np.ndarray:
        """Displacement (µm) at each (time s, depth µm) pair: bilinear between centres, constant outside.

        Returns
        -------
        (n,) float64, µm
        """
        times_s, depths_um = np.broadcast_arrays(np.asarray(times_s, np.float64), np.asarray(depths_um, np.float64))
        it, wt = _bracket(self.time_bins_s, times_s)
        id_, wd = _bracket(self.depth_bins_um, depths_um)
        grid = self.displacement_um.astype(np.float64)
        low = grid[it, id_] * (1 - wd) + grid[it, id_ + 1 if grid.shape[1] > 1 else id_] * wd
        high_t = np.minimum(it + 1, len(self.time_bins_s) - 1)
        high = grid[high_t, id_] * (1 - wd) + grid[high_t, id_ + 1 if grid.shape[1] > 1 else id_] * wd
        return low * (1 - wt) + high * wt

    def channel_displacement(self, times_s: np.ndarray, depths_um: np.ndarray) -> np.ndarray:
        """(len(times_s), len(depths_um)) float64, µm: the displacement of each channel (its rest depth) at
        each time."""
        times_s, depths_um = np.asarray(times_s, np.float64), np.asarray(depths_um, np.float64)
        grid_t = np.repeat(times_s, len(depths_um))
        return self.displacement_at(grid_t, np.tile(depths_um, len(times_s))).reshape(len(times_s), -1)

    def to_spikeinterface(self):
        """As ``spikeinterface.core.motion.Motion`` (one segment); SpikeInterface is imported here only."""
        from spikeinterface.core.motion import Motion as SiMotion

        return SiMotion(displacement=[self.displacement_um.astype(np.float64)],
                        temporal_bins_s=[self.time_bins_s], spatial_bins_um=self.depth_bins_um,
                        direction=self.direction)


def _bracket(centres: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the centre at or below each value (clipped) and the linear weight towards the next one."""
    if len(centres) == 1:
        return np.zeros(values.shape, dtype=np.int64), np.zeros(values.shape)
    index = np.clip(np.searchsorted(centres, values, side="right") - 1, 0, len(centres) - 2)
    weight = np.clip((values - centres[index]) / (centres[index + 1] - centres[index]), 0.0, 1.0)
    return index, weight


@dataclass(frozen=True, eq=False)
class ShankMotion:
    """One :class:`Motion` per shank of a multi-shank probe: each channel moves with its own shank's.

    Attributes
    ----------
    motions : tuple of Motion, one per shank (the same ``direction``)
    channel_shanks : (C,) int64, index into ``motions`` of each channel's shank
    labels : tuple of str, each shank's name (the electrodes' shank or group)
    """

    motions: tuple[Motion, ...]
    channel_shanks: np.ndarray
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        shanks = np.asarray(self.channel_shanks, np.int64)
        if len(self.motions) != len(self.labels) or shanks.min() < 0 or shanks.max() >= len(self.motions):
            raise ValueError(f"{len(self.motions)} motions, {len(self.labels)} labels and channel shanks in "
                             f"[{shanks.min()}, {shanks.max()}] do not agree")
        if len({m.direction for m in self.motions}) != 1:
            raise ValueError("every shank's motion must be along the same direction")
        object.__setattr__(self, "channel_shanks", shanks)

    @property
    def direction(self) -> str:
        return self.motions[0].direction

    @property
    def time_bins_s(self) -> np.ndarray:
        """Every shank's time bin centres, merged (s, increasing)."""
        return np.unique(np.concatenate([m.time_bins_s for m in self.motions]))

    def channel_displacement(self, times_s: np.ndarray, depths_um: np.ndarray) -> np.ndarray:
        """As :meth:`Motion.channel_displacement`, each channel (column) by its shank's motion."""
        out = np.empty((len(times_s), len(depths_um)))
        for shank, motion in enumerate(self.motions):
            mine = self.channel_shanks == shank
            out[:, mine] = motion.channel_displacement(times_s, np.asarray(depths_um)[mine])
        return out
