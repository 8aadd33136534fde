"""Zero-phase Butterworth band-pass in the frequency domain (torch, float32).

A band-pass of one pass is designed in Hz (:func:`design_bandpass`) and
applied forward and backward, as ``scipy.signal.sosfiltfilt`` does, by
multiplying a window's spectrum by ``|H(f)|^2`` of one pass
(:func:`bandpass_gain`) at the bins of a 5-smooth FFT length
(:func:`fft_length`). Traces are (num_samples, num_channels), in µV or any
other unit (the gain is unitless).

Filtering in the frequency domain is a circular convolution with the
two-sided impulse response ``r`` of the forward-backward cascade over the FFT
length; a window read with ``margin_samples`` (:func:`filter_margin_samples`)
on each side of its core, beyond which ``r`` holds less than ``1e-6`` of its
l1 mass, gives a core equal to forward-backward filtering of the infinite
signal up to that tolerance, whatever the chunking.

Edges. Where the recording starts or ends, the missing margin is filled by
odd reflection about the edge sample (``2 x[0] - x[k]``, as ``filtfilt``'s
default ``padtype="odd"``; as ``np.pad``, the reflection is repeated when the
recording is shorter than the margin, so short recordings work).

Examples
--------
>>> sos = design_bandpass(300.0, 6000.0, 30000.0, order=3)
>>> sos.shape
(3, 6)
>>> 100 < filter_margin_samples(sos) < 3000
True
>>> fft_length(30884)
31104
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from scipy import signal

from nwbflow.errors import BadInputError

__all__ = ["DEFAULT_MARGIN_TOLERANCE", "bandpass_gain", "correlate_valid", "design_bandpass", "fft_length",
           "filter_margin_samples", "filter_padded_window", "host_tensor", "zero_phase_filter"]

DEFAULT_MARGIN_TOLERANCE = 1e-6


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
    the one-pass response ``h``). Truncating the input ``M`` samples away
    therefore changes the output by at most ``sum_{|k|>M} |r[k]| * max|x|``
    (and an IIR pass started ``M`` samples early by a term in
    ``sum_{k>M} |h[k]|``). We return the smallest ``M`` at which both tails
    are at most ``tol`` of the responses' l1 norms. ``h`` is computed by
    filtering a unit impulse long enough (from the largest pole radius
    ``rho``) that the neglected remainder is below ``tol / 100``; ``r`` by FFT
    correlation.

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


def fft_length(min_samples: int) -> int:
    """Smallest FFT length ``2^a 3^b 5^c >= min_samples`` with ``a >= b + c``.

    5-smooth lengths suit MKL, pocketfft and cuFFT; among them, radix-2-heavy
    ones are the fast ones (on 384 channels, ``3^7 * 5`` took ~1.5x the time
    per sample of ``2^8 * 45``), hence ``a >= b + c``. Consecutive allowed
    lengths are at most 4/3 apart.
    """
    target, best = max(int(min_samples), 1), None
    power5, c = 1, 0
    while power5 < 2 * target:
        power35, b = power5, 0
        while power35 < 2 * target:
            length, a = power35, 0
            while length < target or a < b + c:
                length, a = 2 * length, a + 1
            best = length if best is None else min(best, length)
            power35, b = 3 * power35, b + 1
        power5, c = 5 * power5, c + 1
    return best


def correlate_valid(traces: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """(K, C, L) cross-correlation of every channel of ``traces`` (S, C) with every row of
    ``kernels`` (K, T): ``out[k, c, t] = sum_j traces[t + j, c] kernels[k, j]``, L = S - T + 1
    (``conv1d``'s "valid" output), through one FFT of the traces: about twice as fast as
    ``conv1d`` on the CPU for kernels of a spike's width."""
    width = kernels.shape[1]
    length = traces.shape[0] - width + 1
    size = fft_length(traces.shape[0])
    spectrum = torch.fft.rfft(traces.T, n=size)  # (C, size // 2 + 1)
    kernel_spectra = torch.fft.rfft(kernels.flip(1), n=size)  # (K, size // 2 + 1)
    return torch.fft.irfft(spectrum[None] * kernel_spectra[:, None], n=size)[:, :, width - 1: width - 1 + length]


def bandpass_gain(sos: np.ndarray, fft_samples: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``|H(f)|^2`` of one pass at the ``rfft`` bins: the forward-backward filter's frequency response.

    Computed in float64 with ``scipy.signal.sosfreqz`` at ``f_k = k / fft_samples``
    (cycles per sample), then cached per (sos, length, device).

    Returns
    -------
    gain : (fft_samples // 2 + 1,) float32 on ``device``
    """
    sos = np.ascontiguousarray(sos, dtype=np.float64)
    return _cached_gain(sos.tobytes(), sos.shape[0], int(fft_samples), str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _cached_gain(sos_bytes: bytes, num_sections: int, fft_samples: int, device: str) -> torch.Tensor:
    sos = np.frombuffer(sos_bytes, dtype=np.float64).reshape(num_sections, 6)
    _, response = signal.sosfreqz(sos, worN=2.0 * np.pi * np.arange(fft_samples // 2 + 1) / fft_samples)
    return torch.as_tensor(np.abs(response) ** 2, dtype=torch.float32, device=device)


def filter_padded_window(x: torch.Tensor, pad_before: int, rows: int, pad_after: int, sos: np.ndarray, *,
                         spectrum: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-phase band-pass of a window held in a buffer of one FFT length, padded in place.

    Parameters
    ----------
    x : (fft_samples, num_channels) float32 tensor, overwritten
        Rows ``[pad_before, pad_before + rows)`` hold the data; the
        ``pad_before`` rows before and ``pad_after`` rows after it are filled
        by odd reflection, the rows beyond with zeros.
    pad_before, rows, pad_after : int, samples
    sos : (n_sections, 6) float64
        Band-pass of one pass (:func:`design_bandpass`).
    spectrum : (fft_samples // 2 + 1, num_channels) complex64 tensor, optional
        Work space for the spectrum, overwritten.
    out : (fft_samples, num_channels) float32 tensor, optional
        Where to write the result (may not be ``x``). Reusing both buffers
        across chunks saves a third of the filter's time on the CPU (fresh
        ~20 MB tensors are paged in on every chunk).

    Returns
    -------
    filtered : (fft_samples, num_channels) float32 on ``x``'s device
        Every row of the circularly filtered buffer; the caller keeps its core.
    """
    fft_samples = x.shape[0]
    _odd_reflect_pad(x, pad_before, pad_before + rows, pad_before, pad_after)
    x[pad_before + rows + pad_after:].zero_()
    spectrum = torch.fft.rfft(x, dim=0, out=spectrum)
    spectrum.mul_(bandpass_gain(sos, fft_samples, x.device)[:, None])
    return torch.fft.irfft(spectrum, n=fft_samples, dim=0, out=out)


def zero_phase_filter(traces: np.ndarray | torch.Tensor, sos: np.ndarray, *, margin_samples: int | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Zero-phase band-pass of a whole array, ends padded by odd reflection.

    Equals ``scipy.signal.sosfiltfilt(sos, traces, axis=0)`` away from the
    ends (up to float32 rounding and the margin's tolerance).

    Parameters
    ----------
    traces : (num_samples, num_channels) float
    sos : (n_sections, 6) float64
    margin_samples : int, optional
        Odd reflection added at each end; default :func:`filter_margin_samples`.
    device : torch.device or str

    Returns
    -------
    filtered : (num_samples, num_channels) float32 on ``device``
    """
    margin = filter_margin_samples(sos) if margin_samples is None else int(margin_samples)
    rows, num_channels = traces.shape
    x = torch.empty((fft_length(rows + 2 * margin), num_channels), dtype=torch.float32, device=device)
    x[margin:margin + rows].copy_(host_tensor(traces))
    return filter_padded_window(x, margin, rows, margin, sos)[margin:margin + rows]


def host_tensor(traces) -> torch.Tensor:
    """A CPU tensor sharing ``traces``' memory where torch can (read-only arrays are only read)."""
    if isinstance(traces, torch.Tensor):
        return traces
    array = np.asarray(traces)
    if not array.dtype.isnative or array.dtype.kind not in "fiu" or min(array.strides, default=0) < 0:
        array = np.ascontiguousarray(array, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _odd_reflect_pad(x: torch.Tensor, lo: int, hi: int, pad_before: int, pad_after: int) -> None:
    """Fill rows ``[lo - pad_before, lo)`` and ``[hi, hi + pad_after)`` of ``x`` as ``np.pad`` (odd reflect)."""
    n = hi - lo
    if pad_before < n and pad_after < n:
        if pad_before:
            torch.sub(2.0 * x[lo], x[lo + 1:lo + pad_before + 1].flip(0), out=x[lo - pad_before:lo])
        if pad_after:
            torch.sub(2.0 * x[hi - 1], x[hi - 1 - pad_after:hi - 1].flip(0), out=x[hi:hi + pad_after])
    elif pad_before or pad_after:  # a recording shorter than the margin: np.pad repeats the reflection
        coefficients = np.pad(np.eye(n), ((pad_before, pad_after), (0, 0)), mode="reflect", reflect_type="odd")
        x[lo - pad_before:hi + pad_after] = torch.as_tensor(coefficients, dtype=x.dtype, device=x.device) @ x[lo:hi]
