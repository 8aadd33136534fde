"""Figures people would rather look at than tables; written as PNG files (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: At most this many peaks are drawn (an evenly strided subset), so figures stay light.
MAX_POINTS = 200_000


def peak_raster_png(time_s: np.ndarray, depth_um: np.ndarray, amplitude: np.ndarray, out_png: Path,
                    title: str) -> Path:
    """Peak depth (µm) over time (s), darker for larger |amplitude|; written to ``out_png``."""
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    stride = _raster(ax, time_s, depth_um, amplitude)
    ax.set_title(title + (f" (every {stride}th peak)" if stride > 1 else ""))
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def motion_png(time_s: np.ndarray, depth_um: np.ndarray, amplitude: np.ndarray, time_bins_s: np.ndarray,
               depth_bins_um: np.ndarray, displacement_um: np.ndarray, corrected_depth_um: np.ndarray,
               out_png: Path, title: str) -> Path:
    """Two rasters side by side: peaks with the motion drawn over them, and peaks at their corrected depths.

    The motion is drawn as one line per depth bin, at ``depth bin + displacement(t)`` (µm): where
    the tissue at that depth is seen over time.
    """
    fig, (raw, corrected) = plt.subplots(1, 2, figsize=(14, 4.5), dpi=100, sharey=True)
    stride = _raster(raw, time_s, depth_um, amplitude)
    for j, depth in enumerate(depth_bins_um):
        raw.plot(time_bins_s, depth + displacement_um[:, j], color="tab:red", linewidth=1.2)
    raw.set_title("peaks and estimated motion" + (f" (every {stride}th peak)" if stride > 1 else ""))
    _raster(corrected, time_s, corrected_depth_um, amplitude)
    corrected.set_title("motion-corrected peak depths")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _raster(ax, time_s: np.ndarray, depth_um: np.ndarray, amplitude: np.ndarray) -> int:
    """Scatter at most MAX_POINTS peaks (large |amplitude| darker, drawn last); returns the stride."""
    stride = max(1, int(np.ceil(time_s.size / MAX_POINTS)))
    t, d, a = time_s[::stride], depth_um[::stride], np.abs(amplitude[::stride])
    order = np.argsort(a)
    scale = np.percentile(a, 99) if a.size else 1.0
    ax.scatter(t[order], d[order], c=np.clip(a[order] / max(scale, 1e-12), 0, 1), cmap="Greys", s=1,
               vmin=0, vmax=1, linewidths=0, rasterized=True)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("depth (µm)")
    return stride
