"""ΔF/F, noise level and resampling of ROI traces (numpy/scipy; time-major arrays).

Every function takes traces as ``(num_frames, num_rois)`` arrays, like NWB's
RoiResponseSeries, and a frame rate in Hz.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.ndimage import gaussian_filter1d, percentile_filter

from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)

#: Width of the bins the running baseline is computed on (s): long enough to average out shot noise.
BASELINE_BIN_S = 0.5


def fill_gaps(traces: np.ndarray) -> np.ndarray:
    """Replace non-finite values by linear interpolation along time (edges: nearest finite value).

    Parameters
    ----------
    traces : (num_frames, num_rois) float array.

    Returns
    -------
    (num_frames, num_rois) float32 copy without NaN/inf; a ROI with no finite
    value at all becomes zeros (logged).

    Examples
    --------
    >>> fill_gaps(np.array([[np.nan], [1.0], [np.nan], [3.0]])).ravel().tolist()
    [1.0, 1.0, 2.0, 3.0]
    """
    out = np.array(traces, dtype=np.float32, copy=True)
    if out.ndim != 2:
        raise ValueError(f"traces must be (num_frames, num_rois), got shape {out.shape}")
    bad = ~np.isfinite(out)
    if not bad.any():
        return out
    frames = np.arange(out.shape[0])
    for roi in np.flatnonzero(bad.any(axis=0)):
        good = ~bad[:, roi]
        if not good.any():
            log.warning("ROI column %d has no finite value; its trace is taken as zeros", roi)
            out[:, roi] = 0.0
            continue
        out[bad[:, roi], roi] = np.interp(frames[bad[:, roi]], frames[good], out[good, roi])
    return out


def running_baseline(traces: np.ndarray, rate_hz: float, window_s: float = 60.0,
                     percentile: float = 10.0) -> np.ndarray:
    """Robust slow baseline F0: a running percentile of 0.5 s bin means, interpolated to every frame.

    Averaging over 0.5 s bins first makes the percentile insensitive to shot
    noise; the low percentile over ``window_s`` ignores calcium transients
    (which only raise F); a second running percentile (100 - ``percentile``)
    removes the lag the first one has on a sloped baseline, so F0 follows
    bleaching and slow drift without bias.

    Parameters
    ----------
    traces : (num_frames, num_rois) fluorescence (any unit).
    rate_hz : frame rate (Hz).
    window_s : length of the running window (s); shortened to the recording when longer.
    percentile : percentile taken in each window (0-100).

    Returns
    -------
    (num_frames, num_rois) float32 baseline, same unit as ``traces``.
    """
    traces = np.asarray(traces, dtype=np.float32)
    num_frames = traces.shape[0]
    per_bin = max(1, int(round(BASELINE_BIN_S * rate_hz)))
    num_bins = max(1, num_frames // per_bin)
    usable = num_bins * per_bin
    bins = traces[:usable].reshape(num_bins, per_bin, -1).mean(axis=1)
    size = int(np.clip(round(window_s / (per_bin / rate_hz)), 1, num_bins))
    low = percentile_filter(bins, percentile, size=(size, 1), mode="nearest")
    # The low percentile of a sloped baseline (bleaching) lags it; the complementary percentile of that
    # curve shifts it back (exact for a linear trend), like a morphological opening but robust to noise.
    low = percentile_filter(low, 100.0 - percentile, size=(size, 1), mode="nearest")
    low = gaussian_filter1d(low, sigma=max(size / 8.0, 1.0), axis=0, mode="nearest")
    centres = (np.arange(num_bins) + 0.5) * per_bin - 0.5
    frames = np.arange(num_frames)
    return np.stack([np.interp(frames, centres, low[:, r]) for r in range(low.shape[1])], axis=1) \
        .astype(np.float32)


def dff_from_fluorescence(fluorescence: np.ndarray, rate_hz: float, *, neuropil: np.ndarray | None = None,
                          neuropil_coefficient: float = 0.7, window_s: float = 60.0,
                          percentile: float = 10.0) -> np.ndarray:
    """ΔF/F = (F - F0) / F0 of raw fluorescence, after optional neuropil subtraction.

    Parameters
    ----------
    fluorescence : (num_frames, num_rois) raw ROI fluorescence (a.u.).
    rate_hz : frame rate (Hz).
    neuropil : (num_frames, num_rois) neuropil fluorescence around each ROI (a.u.), or None.
    neuropil_coefficient : F_corrected = F - coefficient * neuropil (unitless, typically 0.7).
    window_s, percentile : running baseline (see :func:`running_baseline`).

    Returns
    -------
    (num_frames, num_rois) float32 ΔF/F (unitless).

    Raises
    ------
    BadInputError
        A ROI whose baseline is not positive (e.g. over-subtracted neuropil): ΔF/F is undefined.

    Examples
    --------
    >>> f = np.full((1200, 1), 100.0); f[600:610] = 150.0
    >>> dff = dff_from_fluorescence(f, rate_hz=20.0)
    >>> round(float(dff[605, 0]), 3), round(float(dff[100, 0]), 3)
    (0.5, 0.0)
    """
    corrected = fill_gaps(fluorescence).astype(np.float64)
    if neuropil is not None:
        neuropil = fill_gaps(neuropil)
        if neuropil.shape != corrected.shape:
            raise BadInputError(f"neuropil traces have shape {neuropil.shape}, the ROI traces "
                                f"{corrected.shape}", fix="pass the neuropil series of the same ROIs")
        corrected -= neuropil_coefficient * neuropil
    baseline = running_baseline(corrected, rate_hz, window_s, percentile).astype(np.float64)
    bad = np.flatnonzero((baseline <= 0).any(axis=0))
    if bad.size:
        raise BadInputError(
            f"{bad.size} ROI(s) (columns {bad[:10].tolist()}{'...' if bad.size > 10 else ''}) have a "
            "non-positive fluorescence baseline, so ΔF/F is undefined",
            fix="lower neuropil_coefficient, or pass a ΔF/F series with input_kind='dff'")
    return ((corrected - baseline) / baseline).astype(np.float32)


def noise_level(dff: np.ndarray, rate_hz: float) -> np.ndarray:
    """CASCADE's noise level: median |ΔF/F(t+1) - ΔF/F(t)| / sqrt(frame rate), in % per sqrt(Hz).

    Comparable across frame rates: white noise of the same power per second
    gives the same value at any rate. Typical two-photon data: 1-8.

    Parameters
    ----------
    dff : (num_frames, num_rois) ΔF/F (unitless, not %).
    rate_hz : frame rate (Hz).

    Returns
    -------
    (num_rois,) float64, in % / sqrt(Hz) (ΔF/F multiplied by 100, as CASCADE reports it).

    Examples
    --------
    >>> round(float(noise_level(np.array([[0.0], [0.04], [0.0], [0.02]]), 16.0)[0]), 3)
    1.0
    """
    dff = np.asarray(dff, dtype=np.float64)
    return 100.0 * np.nanmedian(np.abs(np.diff(dff, axis=0)), axis=0) / math.sqrt(rate_hz)


def resample(traces: np.ndarray, from_hz: float, to_hz: float, num_out: int | None = None,
             shift_frames: float = 0.0) -> np.ndarray:
    """Resample traces from one frame rate to another on the same clock (frame k at t0 + k / rate).

    Downsampling first smooths with a Gaussian (sigma = 0.4 output frames) so
    each output frame averages the input over about its own duration (what a
    slower microscope would record); then values are linearly interpolated at
    the output frame times. Upsampling interpolates linearly. Frames past the
    input's end take the last value.

    Parameters
    ----------
    traces : (num_frames, num_rois) or (num_frames,) float array.
    from_hz, to_hz : input and output frame rates (Hz).
    num_out : output frames; default ``ceil(num_frames * to_hz / from_hz)``.
    shift_frames : output frame k is taken at t0 + (k + shift_frames) / to_hz (0.5: at frame middles).

    Returns
    -------
    (num_out, num_rois) (or (num_out,)) float32.

    Examples
    --------
    >>> x = np.sin(np.linspace(0, 6, 300))[:, None]
    >>> y = resample(resample(x, 30.0, 50.0), 50.0, 30.0, num_out=300)
    >>> bool(np.abs(y - x).max() < 0.01)
    True
    """
    x = np.asarray(traces, dtype=np.float32)
    if from_hz <= 0 or to_hz <= 0:
        raise ValueError(f"frame rates must be positive, got {from_hz} and {to_hz}")
    num_in = x.shape[0]
    if num_out is None:
        num_out = int(math.ceil(num_in * to_hz / from_hz))
    if to_hz < from_hz:
        x = gaussian_filter1d(x, sigma=0.4 * from_hz / to_hz, axis=0, mode="nearest")
    position = (np.arange(num_out) + shift_frames) * (from_hz / to_hz)
    left = np.clip(np.floor(position).astype(np.int64), 0, num_in - 1)
    right = np.minimum(left + 1, num_in - 1)
    weight = np.clip(position - left, 0.0, 1.0).astype(np.float32)
    if x.ndim == 2:
        weight = weight[:, None]
    return (x[left] * (1.0 - weight) + x[right] * weight).astype(np.float32)
