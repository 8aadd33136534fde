"""Preprocessing: offset removal, median common reference, zero-phase band-pass, ZCA whitening.

The recording is streamed chunk by chunk (``params.chunk_duration_s``), each
chunk read with a margin on both sides that the band-pass needs to forget the
chunk's edges; the core of every chunk is written to a float32 C-order raw
binary of shape (num_samples, num_channels). Memory is bounded by one chunk
plus its margins, never by the recording.

Per chunk, in order:

1. subtract per-channel offsets (estimated once from sampled chunks),
2. subtract the median across channels per sample (``common_reference``),
3. pad to the full margin where the recording ends (odd reflection),
4. zero-phase Butterworth band-pass (second-order sections, forward then
   backward, each pass started in its steady state for the first sample),
5. drop the margins; ZCA whitening ``W = E diag(1/sqrt(d + eps)) E^T``
   (``whiten``), estimated from the covariance of sampled chunks after
   steps 1-4.

Edges. Where the recording starts or ends, the missing margin is filled by
odd reflection about the edge sample (``2 x[0] - x[k]``, as ``filtfilt``'s
default ``padtype="odd"``; ``np.pad`` repeats the reflection when the
recording is shorter than the margin, so short recordings work). The result
is the same whether the recording is one chunk or many: chunk boundaries are
invisible up to the margin's tolerance (see :func:`filter_margin_samples`).

Examples
--------
>>> import numpy as np
>>> sos = design_bandpass(300.0, 6000.0, 30000.0, order=3)
>>> sos.shape
(3, 6)
>>> 100 < filter_margin_samples(sos) < 3000
True
>>> whitening_matrix(np.diag([4.0, 1.0]), regularization=0.0).round(3).tolist()
[[0.5, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from nwbflow.ephys.chunks import ProgressFn, TraceSource, chunk_ranges, read_window, sample_chunk_ranges
from nwbflow.errors import BadInputError
from nwbflow.params import PreprocessParams

log = logging.getLogger(__name__)

DEFAULT_MARGIN_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class PreprocessResult:
    """What :func:`preprocess_to_binary` wrote and estimated.

    Attributes
    ----------
    out_path : Path
        The (num_samples, num_channels) float32 C-order raw binary.
    num_samples, num_channels : int
    sampling_rate_hz : float
    dtype : str
        Always ``"float32"``.
    whitening : (num_channels, num_channels) float64 or None
        ``W`` applied to each filtered sample (row) as ``x_white = W @ x``;
        symmetric. None when whitening was off.
    whitening_inverse : (num_channels, num_channels) float64 or None
        ``W^-1``: maps whitened samples back to the filtered scale (µV),
        ``x = W^-1 @ x_white``. None when whitening was off.
    offsets_uv : (num_channels,) float64, µV
        Per-channel offsets subtracted first.
    margin_samples : int
        Samples of context read on each side of every chunk.
    """

    out_path: Path
    num_samples: int
    num_channels: int
    sampling_rate_hz: float
    whitening: np.ndarray | None
    whitening_inverse: np.ndarray | None
    offsets_uv: np.ndarray
    margin_samples: int
    dtype: str = "float32"


def design_bandpass(freq_min_hz: float, freq_max_hz: float, sampling_rate_hz: float,
                    order: int) -> np.ndarray:
    """Butterworth band-pass as second-order sections (one pass; applied twice).

    Parameters
    ----------
    freq_min_hz, freq_max_hz : float
        -3 dB cut-offs of one pass (Hz); ``freq_max_hz`` must be below Nyquist.
    sampling_rate_hz : float
        Sampling rate (Hz).
    order : int
        Butterworth order of one pass.

    Returns
    -------
    sos : (order, 6) float64
        As ``scipy.signal.butter(..., output="sos")``.

    Raises
    ------
    BadInputError
        When the band is not ``0 < freq_min_hz < freq_max_hz < sampling_rate_hz / 2``.
    """
    nyquist_hz = sampling_rate_hz / 2.0
    if not 0 < freq_max_hz < nyquist_hz:
        raise BadInputError(f"freq_max_hz ({freq_max_hz} Hz) must be below Nyquist ({nyquist_hz} Hz "
                            f"at {sampling_rate_hz} Hz sampling)",
                            fix=f"set preprocess.freq_max_hz below {nyquist_hz}")
    if not 0 < freq_min_hz < freq_max_hz:
        raise BadInputError(f"freq_min_hz ({freq_min_hz} Hz) must be in (0, freq_max_hz={freq_max_hz})")
    return signal.butter(order, [freq_min_hz, freq_max_hz], btype="bandpass",
                         fs=sampling_rate_hz, output="sos")


def filter_margin_samples(sos: np.ndarray, tol: float = DEFAULT_MARGIN_TOLERANCE) -> int:
    """Context needed on each side of a chunk for forward-backward filtering.

    The output at a sample is ``sum_k r[k] x[t - k]``, with ``r`` the two-sided
    impulse response of the forward-backward cascade (the autocorrelation of
    the one-pass response ``h``), plus start-up transients of each pass that
    decay like ``h``. Truncating the input ``M`` samples away therefore changes
    the output by at most ``sum_{|k|>M} |r[k]| * max|dx|`` plus a term in
    ``sum_{k>M} |h[k]|``. We return the smallest ``M`` at which both tails are
    at most ``tol`` of the responses' l1 norms. ``h`` is computed by filtering
    a unit impulse long enough (from the largest pole radius ``rho``) that the
    neglected remainder is below ``tol / 100``; ``r`` by FFT correlation.

    Parameters
    ----------
    sos : (n_sections, 6) float64
        Second-order sections of one pass.
    tol : float
        Relative l1 mass allowed beyond the margin (unitless).

    Returns
    -------
    margin_samples : int
    """
    _, poles, _ = signal.sos2zpk(sos)
    rho = float(np.max(np.abs(poles))) if poles.size else 0.0
    if rho >= 1.0:
        raise BadInputError(f"band-pass is unstable (pole radius {rho:.6f})",
                            fix="raise freq_min_hz or lower filter_order")
    decay = max(-np.log(max(rho, 1e-12)), 1e-12)
    length = int(np.ceil(np.log(tol / 100.0) / -decay * 2)) + 4 * len(sos) + 16
    if length > 50_000_000:
        raise BadInputError(f"band-pass rings for over {length} samples", fix="raise freq_min_hz")
    impulse = np.zeros(length)
    impulse[0] = 1.0
    h = signal.sosfilt(sos, impulse)
    r = signal.fftconvolve(h, h[::-1])[length - 1:]  # lags 0 .. length-1
    return max(_tail_length(np.abs(h), tol), _tail_length(np.abs(r), tol))


def _tail_length(magnitude: np.ndarray, tol: float) -> int:
    """Smallest m with sum(magnitude[m:]) <= tol * sum(magnitude) (one-sided)."""
    tail = np.cumsum(magnitude[::-1])[::-1]  # tail[m] = sum(magnitude[m:])
    return int(np.argmax(tail <= tol * tail[0])) if tail[0] > 0 else 0


def zero_phase_filter(traces: np.ndarray, sos: np.ndarray) -> np.ndarray:
    """Forward then backward ``sosfilt`` along time, each pass started in steady state.

    Equals ``scipy.signal.sosfiltfilt(sos, traces, axis=0, padtype=None)``;
    padding is the caller's business (see :func:`preprocess_chunk`).

    Parameters
    ----------
    traces : (num_samples, num_channels) float
    sos : (n_sections, 6) float64

    Returns
    -------
    filtered : (num_samples, num_channels) float64
    """
    zi_unit = signal.sosfilt_zi(sos)[:, :, np.newaxis]  # (n_sections, 2, 1)
    forward, _ = signal.sosfilt(sos, traces, axis=0, zi=zi_unit * traces[0])
    backward, _ = signal.sosfilt(sos, forward[::-1], axis=0, zi=zi_unit * forward[-1])
    return backward[::-1]


def whitening_matrix(cov: np.ndarray, regularization: float) -> np.ndarray:
    """ZCA whitening ``W = E diag(1 / sqrt(d + eps)) E^T`` of a covariance matrix.

    Parameters
    ----------
    cov : (num_channels, num_channels) float
        Symmetric covariance of filtered traces (µV²).
    regularization : float
        ``eps = regularization * mean(d)`` (unitless fraction), keeping
        near-null directions (e.g. left by the common reference) bounded.

    Returns
    -------
    whitening : (num_channels, num_channels) float64, 1/µV
        Symmetric; ``W @ cov @ W`` is close to identity.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    eps = regularization * float(np.mean(eigenvalues))
    denominator = eigenvalues + eps
    if not np.all(np.isfinite(denominator)) or np.any(denominator <= 0):
        raise BadInputError("cannot whiten: the noise covariance is singular (flat or identical channels)",
                            fix="set preprocess.whitening_regularization > 0 or whiten=False")
    return (eigenvectors / np.sqrt(denominator)) @ eigenvectors.T


def preprocess_chunk(traces_uv: np.ndarray, sos: np.ndarray, margin_samples: int, *,
                     context: tuple[int, int] | None = None, offsets_uv: np.ndarray | None = None,
                     common_reference: bool = True, whitening: np.ndarray | None = None) -> np.ndarray:
    """Offsets, common median reference, band-pass and whitening of one window.

    Parameters
    ----------
    traces_uv : (context[0] + n + context[1], num_channels) float, µV
        Raw window: the core of ``n`` samples with real context on each side.
    sos : (n_sections, 6) float64
        Band-pass of one pass (:func:`design_bandpass`).
    margin_samples : int
        Context the filter needs (:func:`filter_margin_samples`); missing
        context (``margin_samples - context[i]``) is filled by odd reflection.
    context : (int, int) or None
        Real samples before and after the core; None means
        ``(margin_samples, margin_samples)``. ``(0, 0)`` filters a whole
        array with reflected edges.
    offsets_uv : (num_channels,) float or None, µV
        Subtracted per channel first.
    common_reference : bool
        Subtract the median across channels per sample.
    whitening : (num_channels, num_channels) float or None
        Applied to every filtered sample of the core.

    Returns
    -------
    core : (n, num_channels) float32
        µV when ``whitening`` is None, else whitened units (noise std ~ 1).
    """
    before, after = (margin_samples, margin_samples) if context is None else context
    filtered = _filter_window(traces_uv, sos, margin_samples, before, after, offsets_uv, common_reference)
    if whitening is not None:
        filtered = filtered @ np.asarray(whitening).T
    return filtered.astype(np.float32)


def _filter_window(traces_uv, sos, margin_samples, before, after, offsets_uv, common_reference):
    """Steps 1-4 of the module docstring on one window; returns the core, float64."""
    x = np.asarray(traces_uv, dtype=np.float64)
    if offsets_uv is not None:
        x = x - offsets_uv
    if common_reference:
        x = x - median_across_channels(x)[:, np.newaxis]
    pad_before, pad_after = max(margin_samples - before, 0), max(margin_samples - after, 0)
    if pad_before or pad_after:
        x = np.pad(x, ((pad_before, pad_after), (0, 0)), mode="reflect", reflect_type="odd")
    filtered = zero_phase_filter(x, sos)
    start = pad_before + before
    return np.ascontiguousarray(filtered[start:filtered.shape[0] - (pad_after + after)])


def median_across_channels(traces: np.ndarray) -> np.ndarray:
    """Median over channels of each sample (what the common reference subtracts).

    Parameters
    ----------
    traces : (num_samples, num_channels) float

    Returns
    -------
    median : (num_samples,) same dtype as ``traces``
        Same value as ``np.median(traces, axis=1)``, computed by sorting each
        row, which is several times faster for tens to hundreds of channels.
    """
    ordered = np.sort(traces, axis=1)
    half = traces.shape[1] // 2
    if traces.shape[1] % 2:
        return ordered[:, half]
    return 0.5 * (ordered[:, half - 1] + ordered[:, half])


def _check_finite(traces: np.ndarray, first_sample: int) -> None:
    """Raise BadInputError naming the sample range when a raw window holds NaN/Inf."""
    finite = np.isfinite(traces)
    if finite.all():
        return
    row, channel = np.argwhere(~finite)[0]
    raise BadInputError(f"raw traces hold NaN/Inf in samples [{first_sample}, {first_sample + len(traces)}) "
                        f"(first at sample {first_sample + int(row)}, channel index {int(channel)})",
                        fix="repair or exclude that segment of the recording before processing")


def _read_checked(source: TraceSource, start: int, end: int, margin_samples: int):
    """Read a window with margin and refuse non-finite values."""
    window = read_window(source, start, end, margin_samples)
    _check_finite(window.traces, start - window.context_before)
    return window


def estimate_offsets(source: TraceSource, ranges: np.ndarray) -> np.ndarray:
    """Per-channel offsets: the median over chunks of each chunk's per-channel median.

    Parameters
    ----------
    source : TraceSource
    ranges : (k, 2) int, samples
        Chunks to read (e.g. :func:`~nwbflow.ephys.chunks.sample_chunk_ranges`).

    Returns
    -------
    offsets_uv : (num_channels,) float64, µV
        The median of medians keeps memory to one chunk.
    """
    medians = np.empty((len(ranges), source.num_channels))
    for i, (start, end) in enumerate(ranges):
        medians[i] = np.median(_read_checked(source, int(start), int(end), 0).traces, axis=0)
    return np.median(medians, axis=0)


def estimate_covariance(source: TraceSource, ranges: np.ndarray, sos: np.ndarray, margin_samples: int, *,
                        offsets_uv: np.ndarray, common_reference: bool) -> np.ndarray:
    """Channel covariance (second moment) of filtered traces over sampled chunks.

    Parameters
    ----------
    source, ranges : as :func:`estimate_offsets`.
    sos, margin_samples, offsets_uv, common_reference : as :func:`preprocess_chunk`.

    Returns
    -------
    cov : (num_channels, num_channels) float64, µV²
        ``sum x x^T / n`` over filtered samples (band-passed data has zero mean).
    """
    cov = np.zeros((source.num_channels, source.num_channels))
    count = 0
    for start, end in ranges:
        window = _read_checked(source, int(start), int(end), margin_samples)
        core = _filter_window(window.traces, sos, margin_samples, window.context_before,
                              window.context_after, offsets_uv, common_reference)
        cov += core.T @ core
        count += core.shape[0]
    return cov / max(count, 1)


def preprocess_to_binary(source: TraceSource, params: PreprocessParams, out_path: str | Path, *,
                         seed: int = 0, progress: ProgressFn | None = None) -> PreprocessResult:
    """Stream a recording through :func:`preprocess_chunk` into a float32 raw binary.

    Parameters
    ----------
    source : TraceSource
        Raw traces in µV.
    params : PreprocessParams
    out_path : path
        Written as (num_samples, num_channels) float32 C-order, atomically
        (a ``.partial`` file renamed into place once complete and synced).
    seed : int
        Seed of the choice of chunks sampled for offsets and whitening.
    progress : callable, optional
        Called after each written chunk with (samples done, total samples);
        an exception it raises stops the stage and leaves no output file.

    Returns
    -------
    PreprocessResult

    Raises
    ------
    BadInputError
        Empty recording, band above Nyquist, common reference on one
        channel, or NaN/Inf in the raw traces (naming the samples).
    """
    _check_source(source, params)
    fs = float(source.sampling_rate_hz)
    sos = design_bandpass(params.freq_min_hz, params.freq_max_hz, fs, params.filter_order)
    margin = filter_margin_samples(sos)
    chunk_samples = max(int(round(params.chunk_duration_s * fs)), 1)
    sampled = sample_chunk_ranges(source.num_samples, chunk_samples, params.noise_sample_chunks, seed)
    offsets = estimate_offsets(source, sampled)
    whitening = whitening_inverse = None
    if params.whiten:
        cov = estimate_covariance(source, sampled, sos, margin, offsets_uv=offsets,
                                  common_reference=params.common_reference)
        whitening = whitening_matrix(cov, params.whitening_regularization)
        whitening_inverse = np.linalg.inv(whitening)
    out_path = Path(out_path)
    started = time.perf_counter()
    _stream_chunks(source, out_path, chunk_samples, margin, sos=sos, offsets_uv=offsets,
                   common_reference=params.common_reference, whitening=whitening, progress=progress)
    elapsed = time.perf_counter() - started
    log.info("preprocessed %d samples x %d channels (%.1f s of recording) in %.2f s, margin %d samples",
             source.num_samples, source.num_channels, source.num_samples / fs, elapsed, margin)
    return PreprocessResult(out_path=out_path, num_samples=int(source.num_samples),
                            num_channels=int(source.num_channels), sampling_rate_hz=fs, whitening=whitening,
                            whitening_inverse=whitening_inverse, offsets_uv=offsets, margin_samples=margin)


def _check_source(source: TraceSource, params: PreprocessParams) -> None:
    if source.num_samples < 1 or source.num_channels < 1:
        raise BadInputError(f"recording is empty ({source.num_samples} samples x {source.num_channels} channels)")
    if source.sampling_rate_hz <= 0:
        raise BadInputError(f"sampling rate must be positive, got {source.sampling_rate_hz} Hz")
    if params.common_reference and source.num_channels < 2:
        raise BadInputError("a common reference over one channel would zero it",
                            fix="set preprocess.common_reference=False")


def _stream_chunks(source: TraceSource, out_path: Path, chunk_samples: int, margin: int, *,
                   progress: ProgressFn | None, **chunk_kwargs) -> None:
    """Write every chunk's preprocessed core in order to ``out_path`` via a synced temporary file."""
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            for start, end in chunk_ranges(source.num_samples, chunk_samples):
                window = _read_checked(source, int(start), int(end), margin)
                core = preprocess_chunk(window.traces, margin_samples=margin,
                                        context=(window.context_before, window.context_after), **chunk_kwargs)
                np.ascontiguousarray(core, dtype="<f4").tofile(handle)
                if progress is not None:
                    progress(int(end), source.num_samples)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_path)
