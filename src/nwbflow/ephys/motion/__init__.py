"""Motion (probe drift): MEDiCINe estimation from peaks, and correction of the traces.

:class:`Motion` is the estimate (SpikeInterface's convention: observed depth =
rest depth + displacement); :func:`estimate_motion` fits it to peaks; :class:`ShankMotion` holds one per
shank of a multi-shank probe.
"""

from nwbflow.ephys.motion.displacement import Motion, ShankMotion
from nwbflow.ephys.motion.medicine import MotionFit, estimate_motion

__all__ = ["Motion", "MotionFit", "ShankMotion", "estimate_motion"]
