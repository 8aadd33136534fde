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
    stride = max(1, int(np.ceil(time_s.size / MAX_POINTS)))
    t, d, a = time_s[::stride], depth_um[::stride], np.abs(amplitude[::stride])
    order = np.argsort(a)  # draw large peaks last, on top
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    scale = np.percentile(a, 99) if a.size else 1.0
    ax.scatter(t[order], d[order], c=np.clip(a[order] / max(scale, 1e-12), 0, 1), cmap="Greys", s=1,
               vmin=0, vmax=1, linewidths=0, rasterized=True)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("depth (µm)")
    ax.set_title(title + (f" (every {stride}th peak)" if stride > 1 else ""))
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
