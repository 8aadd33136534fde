"""Multi-shank probes (e.g. Neuropixels 2.0, four shanks 250 µm apart): keep every neighbourhood on one shank.

The sorter and the units' electrodes work on *separated* positions: each shank's x shifted so the shanks lie
side by side ``SHANK_CLEARANCE_UM`` apart, farther than any radius a parameter allows (whatever the file's
own spacing, even shanks written in overlapping coordinates), y unchanged. A neighbourhood by distance then
never spans two shanks: no template, cluster or unit's electrodes does. Motion is fitted per shank instead
(``nwbflow.tasks.motion``).

Examples
--------
>>> import numpy as np
>>> positions = np.array([[0.0, 0.0], [32.0, 0.0], [0.0, 0.0], [32.0, 0.0]])  # two shanks, same coordinates
>>> separate_shanks(positions, ("a", "a", "b", "b"))[:, 0].tolist()
[0.0, 32.0, 10032.0, 10064.0]
>>> separate_shanks(positions, ()) is positions
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["SHANK_CLEARANCE_UM", "separate_shanks"]

#: Gap (µm) between shanks laid side by side: above every radius parameter (template radius <= 1000 µm).
SHANK_CLEARANCE_UM = 10_000.0


def separate_shanks(positions_um: np.ndarray, shank_ids) -> np.ndarray:
    """(C, 2) positions (µm) with the shanks of ``shank_ids`` (C labels, in order of first appearance) side by
    side ``SHANK_CLEARANCE_UM`` apart in x; ``positions_um`` itself when ``shank_ids`` is empty or names one."""
    if len(shank_ids) == 0 or len(set(shank_ids)) < 2:
        return positions_um
    labels = np.asarray(shank_ids)
    out = np.array(positions_um, dtype=np.float64, copy=True)
    _, first = np.unique(labels, return_index=True)
    left = 0.0
    for label in labels[np.sort(first)]:
        mine = labels == label
        x = out[mine, 0]
        out[mine, 0] = x - x.min() + left
        left += float(np.ptp(x)) + SHANK_CLEARANCE_UM
    return out
