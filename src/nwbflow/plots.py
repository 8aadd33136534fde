"""Figures people would rather look at than tables; written as PNG files (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection

from nwbflow.errors import BadInputError

#: At most this many peaks are drawn (an evenly strided subset), so figures stay light.
MAX_POINTS = 200_000
#: Unit summary: at most this many spikes in the amplitude panel, channels per template, ISI range and bin.
MAX_AMPLITUDE_POINTS = 20_000
TEMPLATE_CHANNELS = 8
ISI_MAX_MS, ISI_BIN_MS = 50.0, 0.5


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


def unit_summary_png(templates: np.ndarray, channel_positions_um: np.ndarray, spike_times_s: np.ndarray,
                     spike_units: np.ndarray, spike_amplitudes: np.ndarray, sampling_rate_hz: float, path: Path,
                     title: str, *, max_units: int = 24, refractory_ms: float = 1.5) -> Path:
    """Templates on the probe, amplitudes over time and ISI histograms of the largest units; written to ``path``.

    Parameters
    ----------
    templates : (num_units, num_samples, num_channels) float, µV
    channel_positions_um : (num_channels, 2) float, µm
    spike_times_s : (num_spikes,) float, s
    spike_units : (num_spikes,) int in [0, num_units)
    spike_amplitudes : (num_spikes,) float, µV
    sampling_rate_hz : float
        Of the templates' samples (Hz).
    path : path of the PNG.
    title : str
    max_units : int
        At most this many units are drawn, largest template peak-to-peak first (:func:`largest_units`).
    refractory_ms : float
        Drawn as a line on the ISI histograms; their labels give the fraction of ISIs below it.

    Panels: (a) each unit's template on the ``TEMPLATE_CHANNELS`` contacts nearest its peak channel,
    drawn at the contacts' positions, one colour per unit; (b) spike amplitude over time (at most
    ``MAX_AMPLITUDE_POINTS`` spikes, an evenly strided subset); (c) one ISI histogram per unit
    (0-50 ms, 0.5 ms bins). The figure's size does not depend on the inputs.

    Raises
    ------
    BadInputError
        Arrays of mismatched shapes, unit indices out of range, a non-positive rate or ``max_units``.
    """
    templates, positions = _check_unit_summary(templates, channel_positions_um, spike_times_s, spike_units,
                                               spike_amplitudes, sampling_rate_hz, max_units)
    times, units = np.asarray(spike_times_s, np.float64), np.asarray(spike_units, np.int64)
    shown = largest_units(templates, max_units)
    colours = _unit_colours(len(shown))
    fig = plt.figure(figsize=(16, 10), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 2.4), height_ratios=(1, 1.25), left=0.05, right=0.98,
                            bottom=0.05, top=0.91, wspace=0.15, hspace=0.25)
    _templates_on_probe(fig.add_subplot(grid[:, 0]), templates, positions, shown, colours, sampling_rate_hz)
    _amplitudes_over_time(fig.add_subplot(grid[0, 1]), times, units, np.asarray(spike_amplitudes, np.float64),
                          shown, colours)
    _isi_histograms(fig, grid[1, 1], times, units, shown, colours, refractory_ms)
    fig.suptitle(f"{title} ({len(shown)} largest of {len(templates)} units)" if len(shown) < len(templates)
                 else title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def largest_units(templates: np.ndarray, max_units: int) -> np.ndarray:
    """Indices of at most ``max_units`` units, largest template peak-to-peak (µV, on any channel) first."""
    peak_to_peak = np.ptp(templates, axis=1).max(axis=1) if templates.size else np.zeros(len(templates))
    return np.argsort(-peak_to_peak, kind="stable")[:max_units]


def _check_unit_summary(templates, positions, times, units, amplitudes, rate_hz, max_units):
    templates = np.asarray(templates, dtype=np.float32)
    positions = np.asarray(positions, dtype=np.float64)
    if templates.ndim != 3:
        raise BadInputError(f"templates must be (num_units, num_samples, num_channels), got shape {templates.shape}")
    if positions.shape != (templates.shape[2], 2):
        raise BadInputError(f"channel_positions_um must be ({templates.shape[2]}, 2) for templates on "
                            f"{templates.shape[2]} channels, got shape {positions.shape}")
    shapes = {np.shape(times), np.shape(units), np.shape(amplitudes)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise BadInputError(f"spike_times_s, spike_units and spike_amplitudes must be 1-D and of one length, got "
                            f"shapes {np.shape(times)}, {np.shape(units)}, {np.shape(amplitudes)}")
    units = np.asarray(units)
    if units.size and (not np.issubdtype(units.dtype, np.integer) or units.min() < 0
                       or units.max() >= len(templates)):
        raise BadInputError(f"spike_units must be integers in [0, {len(templates)}) (one per template), "
                            f"got {units.dtype} values in [{units.min()}, {units.max()}]")
    if not rate_hz > 0 or max_units < 1:
        raise BadInputError(f"sampling_rate_hz and max_units must be positive, got {rate_hz} and {max_units}")
    return templates, positions


def _unit_colours(count: int) -> np.ndarray:
    """Distinct colours: tab10/tab20 when they suffice, else hues spread by the golden ratio."""
    if count <= 20:
        return plt.get_cmap("tab10" if count <= 10 else "tab20")(np.arange(count))
    return plt.get_cmap("hsv")((np.arange(count) * 0.618034) % 1.0)


def _templates_on_probe(ax, templates: np.ndarray, positions: np.ndarray, shown: np.ndarray, colours: np.ndarray,
                        rate_hz: float) -> None:
    """(a) Templates drawn at their contacts: time across (80 % of the column pitch), µV up, one scale for all:
    the median unit's peak-to-peak spans 1.5 row pitches (more on long probes: 1/50 of the span drawn)."""
    pitch_x, pitch_y = (_pitch(positions[:, axis]) for axis in (0, 1))
    ax.scatter(positions[:, 0], positions[:, 1], marker="s", s=12, color="0.85", zorder=0)
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_title("(a) templates on the probe")
    if not len(shown):
        ax.text(0.5, 0.5, "no units", ha="center", transform=ax.transAxes)
        return
    peak_to_peak = np.ptp(templates[shown], axis=1)  # (shown, channels)
    near = min(TEMPLATE_CHANNELS, len(positions))
    channels = [np.argsort(np.linalg.norm(positions - positions[np.argmax(ptp)], axis=1), kind="stable")[:near]
                for ptp in peak_to_peak]
    y_drawn = positions[np.concatenate(channels), 1]
    median_um = max(1.5 * pitch_y, float(np.ptp(y_drawn)) / 50)
    uv_per_um = max(float(np.median(peak_to_peak.max(axis=1))), 1e-6) / median_um
    num_samples = templates.shape[1]
    x_offsets = (np.arange(num_samples) / max(num_samples - 1, 1) - 0.5) * 0.8 * pitch_x
    segments, segment_colours = [], []
    for colour, unit, unit_channels in zip(colours, shown, channels):
        for channel in unit_channels:
            segments.append(np.column_stack([positions[channel, 0] + x_offsets,
                                             positions[channel, 1] + templates[unit, :, channel] / uv_per_um]))
            segment_colours.append(colour)
    ax.add_collection(LineCollection(segments, colors=segment_colours, linewidths=0.9))
    drawn = np.concatenate(segments)
    ax.set_xlim(drawn[:, 0].min() - pitch_x / 2, drawn[:, 0].max() + pitch_x / 2)
    ax.set_ylim(drawn[:, 1].min() - pitch_y, drawn[:, 1].max() + pitch_y)
    ax.text(0.01, 0.01, f"{median_um * uv_per_um:.0f} µV per {median_um:.0f} µm; "
            f"{num_samples / rate_hz * 1e3:.1f} ms per {0.8 * pitch_x:.0f} µm", transform=ax.transAxes, fontsize=8)


def _pitch(coordinates: np.ndarray) -> float:
    """Smallest spacing between distinct contact coordinates (µm); 20 when there is one."""
    steps = np.diff(np.unique(np.round(coordinates, 3)))
    return float(steps.min()) if steps.size else 20.0


def _amplitudes_over_time(ax, times: np.ndarray, units: np.ndarray, amplitudes: np.ndarray, shown: np.ndarray,
                          colours: np.ndarray) -> None:
    """(b) Spike amplitude (µV) over time, one colour per unit, at most MAX_AMPLITUDE_POINTS points."""
    colour_of = np.full(max(int(units.max(initial=-1)), int(shown.max(initial=-1))) + 1, -1)
    colour_of[shown] = np.arange(len(shown))
    picked = np.flatnonzero(colour_of[units] >= 0) if units.size else np.zeros(0, np.int64)
    stride = max(1, int(np.ceil(picked.size / MAX_AMPLITUDE_POINTS)))
    picked = picked[::stride]
    ax.scatter(times[picked], amplitudes[picked], c=colours[colour_of[units[picked]]] if picked.size else None,
               s=2, linewidths=0, rasterized=True)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("amplitude (µV)")
    ax.set_title("(b) spike amplitudes" + (f" (every {stride}th spike)" if stride > 1 else ""))


def _isi_histograms(fig, cell, times: np.ndarray, units: np.ndarray, shown: np.ndarray, colours: np.ndarray,
                    refractory_ms: float) -> None:
    """(c) One ISI histogram (0-50 ms) per unit shown, with the refractory period and its violation fraction."""
    edges_ms = np.arange(0.0, ISI_MAX_MS + ISI_BIN_MS / 2, ISI_BIN_MS)
    counts, violations, totals = _isi_counts(times, units, shown, edges_ms, refractory_ms)
    columns = max(1, int(np.ceil(np.sqrt(max(len(shown), 1) * 2))))
    rows = max(1, int(np.ceil(len(shown) / columns)))
    inner = cell.subgridspec(rows, columns, wspace=0.08, hspace=0.35)
    if not len(shown):
        ax = fig.add_subplot(inner[0, 0])
        ax.text(0.5, 0.5, "no units", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    centres = edges_ms[:-1] + ISI_BIN_MS / 2
    for index, (unit, colour) in enumerate(zip(shown, colours)):
        ax = fig.add_subplot(inner[index // columns, index % columns])
        ax.fill_between(centres, counts[index], step="mid", color=colour, linewidth=0)
        ax.axvline(refractory_ms, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, ISI_MAX_MS)
        ax.set_yticks([])
        if index // columns != rows - 1:
            ax.set_xticklabels([])
        ratio = violations[index] / totals[index] if totals[index] else 0.0
        ax.set_title(f"unit {unit}: {100 * ratio:.1f} % < {refractory_ms:g} ms", fontsize=7, pad=2)
        ax.tick_params(labelsize=6, length=2)
    box = cell.get_position(fig)
    fig.text((box.x0 + box.x1) / 2, box.y1 + 0.025, f"(c) inter-spike intervals, 0-{ISI_MAX_MS:g} ms in "
             f"{ISI_BIN_MS:g} ms bins; dashed: {refractory_ms:g} ms", ha="center", fontsize=12)
    fig.text(box.x1, 0.012, "ISI (ms)", ha="right", fontsize=8)


def _isi_counts(times: np.ndarray, units: np.ndarray, shown: np.ndarray, edges_ms: np.ndarray,
                refractory_ms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per shown unit: ISI histogram counts, ISIs below ``refractory_ms``, and all ISIs (one sort of all spikes)."""
    order = np.lexsort((times, units))
    sorted_units, isi_ms = units[order], np.diff(times[order]) * 1e3
    same = sorted_units[1:] == sorted_units[:-1]
    isi_units, isi_ms = sorted_units[1:][same], isi_ms[same]
    row_of = np.full(max(int(units.max(initial=-1)), int(shown.max(initial=-1))) + 1, -1)
    row_of[shown] = np.arange(len(shown))
    rows = row_of[isi_units]
    keep = rows >= 0
    rows, isi_ms = rows[keep], isi_ms[keep]
    totals = np.bincount(rows, minlength=len(shown))
    violations = np.bincount(rows[isi_ms < refractory_ms], minlength=len(shown))
    in_range = isi_ms < edges_ms[-1]
    bins = np.minimum((isi_ms[in_range] / ISI_BIN_MS).astype(np.int64), len(edges_ms) - 2)
    counts = np.bincount(rows[in_range] * (len(edges_ms) - 1) + bins,
                         minlength=len(shown) * (len(edges_ms) - 1)).reshape(len(shown), len(edges_ms) - 1)
    return counts, violations, totals


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
