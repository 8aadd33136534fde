"""Preprocessing: offset removal, median common reference, zero-phase band-pass, ZCA whitening (torch).

The recording is streamed chunk by chunk (at most the execution policy's
``chunks.preprocess_s``; on the CPU at most ``CPU_WINDOW_BYTES`` too), each
chunk read with a margin on both sides that the band-pass needs to forget the
chunk's edges; the core of every chunk is written to a float16 or float32
C-order raw binary of shape (num_samples, num_channels), described by a
:class:`~nwbflow.ephys.recording.PreprocessedRecording`. Memory is bounded by a few chunks plus their margins, never by
the recording. Everything runs in float32 on the ``device`` given (CPU or
CUDA); the host reads the next window and writes the previous core on
background threads meanwhile, and waits for the device once per chunk (to copy
its core back). On a device out-of-memory error the chunk is halved and the
stream goes on from the same sample (:class:`~nwbflow.device.OomBackoff`).
Offsets and the whitening matrix are estimated from ``noise_sample_chunks``
windows of ``noise_sample_duration_s`` on every device.

Per chunk, in order:

1. subtract per-channel offsets in µV (estimated once from sampled chunks); mark the saturated samples
   (:mod:`nwbflow.ephys.saturation`, ``params.saturation``) for step 5; with ``sample_shifts`` (an ADC's
   staggered sampling, e.g. Neuropixels 1.0), delay each channel by its shift
   (:func:`~nwbflow.ephys.phase_shift.delay_channels`) so that every channel is read at the frame's time,
2. subtract the median across channels per sample (:func:`median_across_channels`; over the good
   channels only when bad channels were found: :mod:`nwbflow.ephys.bad_channels`),
3. pad to the full margin where the recording ends (odd reflection),
4. zero-phase Butterworth band-pass (:mod:`nwbflow.ephys.filtering`): multiply
   the window's spectrum by ``|H(f)|^2`` of one pass (:func:`bandpass_gain`),
   i.e. filter forward and backward as ``sosfiltfilt`` does, in the steady state,
5. drop the margins (:func:`filter_margin_samples` samples on each side); ZCA
   whitening (:mod:`nwbflow.ephys.whitening`: :func:`whitening_matrix`, or per
   channel neighbourhood :func:`local_whitening_matrix`), estimated from the
   covariance (µV²) of sampled chunks after steps 1-4, over the good channels; bad channels come out
   as zeros (whitened or not), so detection, motion and sorting see nothing there; so do the saturated
   samples of step 1, widened by ``pad_ms`` (the periods zeroed are kept in the record).

The streaming chunk is sized so that core plus margins fill one 5-smooth FFT
length (:func:`fft_length`) exactly. The band-pass and whitening functions
are re-exported here. :class:`PreprocessedSource` computes the same windows on
demand, for readers of a few scattered windows.

Examples
--------
>>> import torch
>>> x = torch.tensor([[3.0, 1.0, 2.0, 10.0]])
>>> median_across_channels(x).tolist()
[2.5]
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nwbflow.device import OomBackoff
from nwbflow.ephys.bad_channels import BadChannels, channel_labels
from nwbflow.ephys.chunk_stream import refuse_non_finite, stream_to_binary
from nwbflow.ephys.chunks import ProgressFn, TraceSource, Window, WindowPrefetcher, read_window, sample_chunk_ranges
from nwbflow.ephys.filtering import (DEFAULT_MARGIN_TOLERANCE, bandpass_gain, design_bandpass, fft_length,
                                     filter_margin_samples, filter_padded_window, host_tensor, zero_phase_filter)
from nwbflow.ephys.median import median_across_channels
from nwbflow.ephys.phase_shift import delay_channels
from nwbflow.ephys.recording import PreprocessedRecording, SessionClock
from nwbflow.ephys.saturation import merge_periods, periods_of, saturated_samples, widen
from nwbflow.ephys.whitening import local_whitening_matrix, whitening_matrix
from nwbflow.errors import BadInputError
from nwbflow.params import DEFAULT_CHUNKS, BadChannelParams, PreprocessParams, SaturationParams

__all__ = ["CPU_WINDOW_BYTES", "DEFAULT_MARGIN_TOLERANCE", "PreprocessedSource", "bandpass_gain", "design_bandpass",
           "estimate_covariance", "estimate_offsets", "fft_length", "filter_margin_samples", "local_whitening_matrix",
           "median_across_channels", "preprocess_chunk", "preprocess_to_binary", "whitening_matrix",
           "zero_phase_filter"]

log = logging.getLogger(__name__)

#: On the CPU a chunk's float32 window is kept to about this size: the kernel runs ~15 % faster (384
#: channels, 1 and 2 threads) on 16 MB windows than on 1 s ones (47 MB), the FFT's cache misses mostly.
CPU_WINDOW_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------ chunk kernel


class _ChunkKernel:
    """Steps 1-5 of the module docstring on one window, with the constants on the device and reused buffers."""

    def __init__(self, sos: np.ndarray, margin_samples: int, device: torch.device | str, *,
                 offsets_uv: np.ndarray | None = None, common_reference: bool = False,
                 whitening: np.ndarray | None = None, sample_shifts: np.ndarray | None = None,
                 bad_channels: np.ndarray | None = None, num_channels: int | None = None,
                 saturation: SaturationRule | None = None):
        self.sos, self.margin, self.device = sos, int(margin_samples), torch.device(device)
        self.saturation = saturation
        self.common_reference = common_reference
        self.offsets = None if offsets_uv is None else self._constant(offsets_uv)
        self.shifts = None if sample_shifts is None else self._constant(sample_shifts)
        self.bad = self.good = None
        if bad_channels is not None and len(bad_channels):
            good = np.setdiff1d(np.arange(num_channels), bad_channels)
            self.bad, self.good = (torch.as_tensor(np.asarray(c), dtype=torch.int64, device=self.device)
                                   for c in (bad_channels, good))
        self.whitening_t = None if whitening is None else self._constant(np.asarray(whitening).T).contiguous()
        self._workspace: _Workspace | None = None

    def _constant(self, array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=self.device)

    def _buffers(self, fft_samples: int, num_channels: int) -> _Workspace:
        """The work buffers for windows of one FFT length, kept for the next chunk."""
        if self._workspace is None or not self._workspace.fits(fft_samples, num_channels):
            self._workspace = None  # let the old buffers go first
            self._workspace = _Workspace.allocate(fft_samples, num_channels, self.device, self.common_reference)
        return self._workspace

    def fresh_copy(self) -> _ChunkKernel:
        """The same constants (shared), its own work buffers: one per concurrent stream."""
        twin = copy.copy(self)
        twin._workspace = None
        return twin

    def __call__(self, window: Window, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess one window; returns (core (n, C) float32 on the device, 0-d bool: input all finite).

        ``out``, a (n, C) float32 tensor on the device, receives the core when
        given; otherwise the core is a view of this kernel's work buffers,
        valid until its next call.
        """
        if max(window.context_before, window.context_after) > self.margin:  # more context than needed
            cut_before = max(window.context_before - self.margin, 0)
            cut_after = max(window.context_after - self.margin, 0)
            window = Window(window.traces[cut_before:len(window.traces) - cut_after],
                            window.context_before - cut_before, window.context_after - cut_after,
                            window.first_sample + cut_before)
        rows, num_channels = window.traces.shape
        pad_before, pad_after = self.margin - window.context_before, self.margin - window.context_after
        work = self._buffers(fft_length(pad_before + rows + pad_after), num_channels)
        data = work.window[pad_before:pad_before + rows]
        data.copy_(host_tensor(window.traces))  # host -> device, and to float32, in one copy
        finite = torch.isfinite(data.sum())  # no sync: read by the caller after its own
        if self.offsets is not None:
            data.sub_(self.offsets)
        saturated = None if self.saturation is None else self.saturation.mask(data)
        if self.shifts is not None:
            data.copy_(delay_channels(data, self.shifts))
        if self.common_reference and self.good is not None:
            good = data.index_select(1, self.good)
            data.sub_(median_across_channels(good, scratch=good)[:, None])
        elif self.common_reference:
            data.sub_(median_across_channels(data, scratch=work.scratch[:rows])[:, None])
        filtered = filter_padded_window(work.window, pad_before, rows, pad_after, self.sos,
                                        spectrum=work.spectrum, out=work.filtered)
        core = filtered[self.margin:self.margin + rows - window.context_before - window.context_after]
        if self.whitening_t is not None:
            core = torch.matmul(core, self.whitening_t, out=work.whitened[:len(core)] if out is None else out)
        elif out is not None:
            core = out.copy_(core)
        if self.bad is not None:
            core.index_fill_(1, self.bad, 0.0)
        if saturated is not None:
            self.saturation.mute(core, saturated[window.context_before:rows - window.context_after],
                                 window.first_sample + window.context_before)
        return core, finite


@dataclass(frozen=True, eq=False)
class SaturationRule:
    """:class:`~nwbflow.params.SaturationParams` in samples, and the periods zeroed so far (shared by the copies
    of a kernel, which run on concurrent streams; ``list.append`` is atomic)."""

    level_uv: float
    jump_uv: float
    proportion: float
    pad_samples: int
    zeroed: list = field(default_factory=list)

    @classmethod
    def from_params(cls, params: SaturationParams, sampling_rate_hz: float) -> SaturationRule | None:
        if not params.detect:
            return None
        return cls(params.level_uv, params.jump_uv_per_ms * 1000.0 / sampling_rate_hz, params.proportion,
                   int(round(params.pad_ms * sampling_rate_hz / 1000.0)))

    def mask(self, traces_uv: torch.Tensor) -> torch.Tensor:
        """Saturated samples of an offset-free window, widened by the pad: (n,) bool."""
        return widen(saturated_samples(traces_uv, self.level_uv, self.jump_uv, self.proportion), self.pad_samples)

    def mute(self, core: torch.Tensor, mask: torch.Tensor, first_sample: int) -> None:
        """Zero the core's rows under ``mask`` and note them as periods (samples of the recording)."""
        if bool(mask.any()):
            core.masked_fill_(mask[:, None], 0.0)
            self.zeroed.append(periods_of(mask.cpu().numpy(), first_sample))

    def periods(self) -> np.ndarray:
        """The periods zeroed so far, (k, 2) int64 ``[start, end)`` samples, sorted and joined."""
        return merge_periods(list(self.zeroed))


@dataclass(frozen=True, eq=False)
class _Workspace:
    """One stream's buffers: padded window, median scratch, spectrum, filtered and whitened window (on the device)."""

    window: torch.Tensor
    scratch: torch.Tensor | None
    spectrum: torch.Tensor
    filtered: torch.Tensor
    whitened: torch.Tensor

    @classmethod
    def allocate(cls, fft_samples: int, num_channels: int, device: torch.device,
                 common_reference: bool) -> _Workspace:
        def empty(rows: int, dtype=torch.float32) -> torch.Tensor:
            return torch.empty((rows, num_channels), dtype=dtype, device=device)

        return cls(window=empty(fft_samples), scratch=empty(fft_samples) if common_reference else None,
                   spectrum=empty(fft_samples // 2 + 1, torch.complex64), filtered=empty(fft_samples),
                   whitened=empty(fft_samples))

    def fits(self, fft_samples: int, num_channels: int) -> bool:
        return self.window.shape == (fft_samples, num_channels)


def preprocess_chunk(traces_uv: np.ndarray | torch.Tensor, sos: np.ndarray, margin_samples: int, *,
                     context: tuple[int, int] | None = None, offsets_uv: np.ndarray | None = None,
                     common_reference: bool = True, whitening: np.ndarray | None = None,
                     sample_shifts: np.ndarray | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
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
        ``W``, applied to every filtered sample of the core as ``W @ x``.
    sample_shifts : (num_channels,) float or None, samples
        Each channel's ADC sampling delay, undone after the offsets (:func:`delay_channels`).
    device : torch.device or str
        Where to compute.

    Returns
    -------
    core : (n, num_channels) float32 tensor on ``device``
        µV when ``whitening`` is None, else whitened units (noise std ~ 1).
        Not checked for NaN/Inf (:func:`preprocess_to_binary` is).
    """
    before, after = (margin_samples, margin_samples) if context is None else context
    kernel = _ChunkKernel(sos, margin_samples, device, offsets_uv=offsets_uv,
                          common_reference=common_reference, whitening=whitening, sample_shifts=sample_shifts)
    return kernel(Window(traces_uv, before, after))[0]


# ------------------------------------------------------------------------------------------- estimation


def estimate_offsets(source: TraceSource, ranges: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-channel offsets: the median over chunks of each chunk's per-channel median.

    Parameters
    ----------
    source : TraceSource
    ranges : (k, 2) int, samples
        Chunks to read (e.g. :func:`~nwbflow.ephys.chunks.sample_chunk_ranges`).
    device : torch.device or str

    Returns
    -------
    offsets_uv : (num_channels,) float64, µV
        The median of medians keeps memory to one chunk (a chunk is split
        in halves only where the device runs out of memory).
    """
    device = torch.device(device)
    backoff = _whole_ranges(ranges, device)
    medians: list[torch.Tensor] = []

    def step(start: int, end: int) -> None:
        window = reader.read(start, end)
        data = host_tensor(window.traces).to(device, torch.float32)
        refuse_non_finite(torch.isfinite(data.sum()), window, start)
        medians.append(median_across_channels(data.T))

    with WindowPrefetcher(source, 0, plan=ranges) as reader:
        for start, end in ranges:
            backoff.run(step, int(start), int(end))
    return median_across_channels(torch.stack(medians, dim=1)).cpu().numpy().astype(np.float64)


def estimate_covariance(source: TraceSource, ranges: np.ndarray, sos: np.ndarray, margin_samples: int, *,
                        offsets_uv: np.ndarray, common_reference: bool, device: torch.device | str = "cpu",
                        backoff: OomBackoff | None = None, sample_shifts: np.ndarray | None = None,
                        bad_channels: np.ndarray | None = None, saturation: SaturationRule | None = None) -> np.ndarray:
    """Channel covariance (second moment) of filtered traces over sampled chunks.

    Parameters
    ----------
    source, ranges, device : as :func:`estimate_offsets`.
    backoff : OomBackoff, optional
        How each range is cut into windows (smaller where the device runs out
        of memory); default: whole ranges.
    sos, margin_samples, offsets_uv, common_reference, sample_shifts : as :func:`preprocess_chunk`.
    bad_channels : (k,) int, optional
        Left out of the common reference (their rows and columns of the result are zero).
    saturation : SaturationRule, optional
        Saturated periods are left out (zeroed and not counted).

    Returns
    -------
    cov : (num_channels, num_channels) float64, µV²
        ``sum x x^T / n`` over filtered samples (band-passed data has zero
        mean); each chunk's product in float32, summed in float64.
    """
    kernel = _ChunkKernel(sos, margin_samples, device, offsets_uv=offsets_uv, common_reference=common_reference,
                          sample_shifts=sample_shifts, bad_channels=bad_channels, num_channels=source.num_channels,
                          saturation=saturation)
    backoff = backoff or _whole_ranges(ranges, device)
    cov = torch.zeros((source.num_channels, source.num_channels), dtype=torch.float64, device=kernel.device)
    count = 0

    def step(start: int, end: int) -> None:
        nonlocal count
        window = reader.read(start, end)
        core, finite = kernel(window)
        refuse_non_finite(finite, window, start)
        cov.add_((core.T @ core).to(torch.float64))
        count += core.shape[0]

    with WindowPrefetcher(source, margin_samples, plan=ranges) as reader:
        for start, end in ranges:
            backoff.run(step, int(start), int(end))
    if saturation is not None:
        count -= int(np.sum(np.diff(saturation.periods(), axis=1)))
        if count <= 0:
            raise BadInputError("every chunk sampled for the whitening was zeroed as saturated or artifact: the "
                                "traces are beyond preprocess.saturation's levels throughout",
                                fix="check the series' scaling (conversion, data type), or raise "
                                    "preprocess.saturation.level_uv / jump_uv_per_ms, or set "
                                    "preprocess.saturation.detect=false")
    return cov.cpu().numpy() / max(count, 1)


def _whole_ranges(ranges: np.ndarray, device: torch.device | str) -> OomBackoff:
    longest = int(np.max(ranges[:, 1] - ranges[:, 0])) if len(ranges) else 1
    return OomBackoff(max(longest, 1), device=device)


# -------------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True, eq=False)
class _Estimates:
    """What preprocessing estimates before it streams: the band-pass and its margin, offsets, W, W^-1 (and the
    ADC sample shifts it undoes, or None)."""

    sos: np.ndarray
    margin: int
    offsets_uv: np.ndarray
    whitening: np.ndarray | None
    whitening_inverse: np.ndarray | None
    sample_shifts: np.ndarray | None
    bad: BadChannels | None

    def kernel(self, params: PreprocessParams, device: torch.device, sampling_rate_hz: float) -> _ChunkKernel:
        """The streaming kernel; its ``saturation`` (None when off) collects the periods it zeroes."""
        return _ChunkKernel(self.sos, self.margin, device, offsets_uv=self.offsets_uv,
                            common_reference=params.common_reference, whitening=self.whitening,
                            sample_shifts=self.sample_shifts, bad_channels=self.bad_indices,
                            num_channels=len(self.offsets_uv),
                            saturation=SaturationRule.from_params(params.saturation, sampling_rate_hz))

    @property
    def bad_indices(self) -> np.ndarray:
        """Bad channels (int64; empty when none were found or detection was off)."""
        return np.zeros(0, np.int64) if self.bad is None else self.bad.indices


def _band(params: PreprocessParams, sampling_rate_hz: float) -> tuple[np.ndarray, int]:
    """The band-pass of one pass (sos) and the margin (samples) it needs."""
    sos = design_bandpass(params.freq_min_hz, params.freq_max_hz, sampling_rate_hz, params.filter_order)
    return sos, filter_margin_samples(sos)


def _estimate(source: TraceSource, params: PreprocessParams, positions: np.ndarray | None, seed: int,
              device: torch.device, backoff: OomBackoff | None = None,
              shifts: np.ndarray | None = None) -> _Estimates:
    """Offsets and (when ``params.whiten``) W from seeded sampled chunks (after undoing ``shifts``)."""
    sos, margin = _band(params, float(source.sampling_rate_hz))
    noise_window = max(int(round(params.noise_sample_duration_s * source.sampling_rate_hz)), 1)
    sampled = sample_chunk_ranges(source.num_samples, noise_window, params.noise_sample_chunks, seed)
    offsets = estimate_offsets(source, sampled, device=device)
    bad = detect_bad_channels(source, params.bad_channels, positions, seed)
    bad_indices = np.zeros(0, np.int64) if bad is None else bad.indices
    whitening = whitening_inverse = None
    if params.whiten:
        cov = estimate_covariance(source, sampled, sos, margin, offsets_uv=offsets, device=device,
                                  common_reference=params.common_reference, backoff=backoff, sample_shifts=shifts,
                                  bad_channels=bad_indices,
                                  saturation=SaturationRule.from_params(params.saturation, source.sampling_rate_hz))
        whitening, whitening_inverse = _whitening(cov, params, positions, bad_indices)
    return _Estimates(sos, margin, offsets, whitening, whitening_inverse, shifts, bad)


def _whitening(cov: np.ndarray, params: PreprocessParams, positions: np.ndarray | None,
               bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W and W^-1 over the good channels (zero rows and columns for the bad ones)."""
    good = np.setdiff1d(np.arange(len(cov)), bad)
    block = cov[np.ix_(good, good)]
    if params.whitening_mode == "local":
        own = local_whitening_matrix(block, positions[good], params.whitening_radius_um,
                                     params.whitening_regularization)
    else:
        own = whitening_matrix(block, params.whitening_regularization)
    whitening, inverse = np.zeros_like(cov), np.zeros_like(cov)
    whitening[np.ix_(good, good)] = own
    inverse[np.ix_(good, good)] = np.linalg.inv(own)
    return whitening, inverse


#: Fewer channels than this are not searched for bad ones (the method compares a channel with the probe).
MIN_CHANNELS_FOR_BAD_CHANNELS = 16


def detect_bad_channels(source: TraceSource, params: BadChannelParams, positions: np.ndarray | None,
                        seed: int) -> BadChannels | None:
    """Label channels on ``params.chunks`` seeded windows (:mod:`nwbflow.ephys.bad_channels`); None when
    detection is off or the probe has fewer than ``MIN_CHANNELS_FOR_BAD_CHANNELS`` channels."""
    if not params.detect or source.num_channels < MIN_CHANNELS_FOR_BAD_CHANNELS:
        return None
    rate = float(source.sampling_rate_hz)
    window = max(int(round(params.chunk_s * rate)), 1)
    if params.highpass_hz >= rate / 2 or min(window, source.num_samples) < 2 * params.welch_ms * rate / 1000:
        log.info("bad channels not searched: %d samples at %g Hz are too few for the method", source.num_samples,
                 rate)
        return None
    ranges = sample_chunk_ranges(source.num_samples, window, params.chunks, seed)
    windows = (source.get_traces(int(a), int(b)) for a, b in ranges)  # one in memory at a time
    found = channel_labels(windows, rate, positions, params)
    if found.indices.size:
        log.warning("bad channels (left out of the common reference, whitening, detection and sorting): %s",
                    "; ".join(f"{name} {channels}" for name, channels in found.by_label().items() if channels))
    if found.indices.size >= source.num_channels:
        raise BadInputError("every channel was labelled bad (dead, noisy or outside the brain): nothing is left "
                            "to reference, whiten or sort", fix="check the series' scaling and channels, or set "
                                                                "preprocess.bad_channels.detect=false")
    if found.indices.size > source.num_channels / 3:
        log.warning("over a third of the channels were labelled bad: the labels may be wrong where so many are")
    return found


def preprocess_to_binary(source: TraceSource, params: PreprocessParams, out_path: str | Path, *,
                         chunk_duration_s: float = DEFAULT_CHUNKS.preprocess_s, seed: int = 0,
                         progress: ProgressFn | None = None, device: torch.device | str = "cpu",
                         channel_positions_um: np.ndarray | None = None, sample_shifts: np.ndarray | None = None,
                         clock: SessionClock | None = None,
                         shank_ids: np.ndarray | None = None) -> PreprocessedRecording:
    """Stream a recording through :func:`preprocess_chunk` into a float16 or float32 raw binary.

    Parameters
    ----------
    source : TraceSource
        Raw traces in µV.
    params : PreprocessParams
    out_path : path
        Written as (num_samples, num_channels) C-order values of
        ``params.output_dtype`` (computed in float32), atomically.
    chunk_duration_s : float
        Samples streamed at once (s), the execution policy's ``chunks.preprocess_s``.
    seed : int
        Seed of the choice of chunks sampled for offsets and whitening.
    progress : callable, optional
        Called after each chunk is computed and queued for writing, with
        (samples done, total samples); an exception it raises stops the stage
        and leaves no output file.
    device : torch.device or str
        Where to compute (resolved by the caller; ``"cpu"``, ``"cuda"``, ...).
        On the CPU, chunks are also kept to about ``CPU_WINDOW_BYTES`` and
        computed on ``torch.get_num_threads()`` concurrent streams (one torch
        thread each), written in order. On a
        device out-of-memory error the chunk is halved and the stage goes on
        from the same sample (down to twice the margin).
    channel_positions_um : (num_channels, 2) float, µm, optional
        Kept in the record and needed by ``whitening_mode="local"``; default:
        the source's ``channel_positions_um`` attribute, when it has one.
    sample_shifts : (num_channels,) float, samples, optional
        Each channel's ADC sampling delay, undone when ``params.adc_phase_shift``; default: the source's
        ``inter_sample_shift`` attribute, when it has one (None or all zero: nothing to undo).
    clock : SessionClock, optional
        The samples' session clock, kept in the record; default: the source's
        rate from time 0.
    shank_ids : (num_channels,) str, optional
        Each channel's shank, kept in the record (None: the source's ``shank_ids`` attribute, when it has one;
        None there too: one shank).

    Returns
    -------
    PreprocessedRecording
        The record later stages read the binary with.

    Raises
    ------
    BadInputError
        Empty recording, band above Nyquist, common reference on one
        channel, local whitening without positions, or NaN/Inf in the raw
        traces (naming the samples).
    """
    try:
        return _preprocess_to_binary(source, params, Path(out_path), chunk_duration_s, seed, progress,
                                     torch.device(device), channel_positions_um, sample_shifts, clock, shank_ids)
    except BadInputError as exc:  # name the file and series when the source knows them (an NWB series does)
        if exc.path is not None or getattr(source, "file_path", None) is None:
            raise
        raise BadInputError(exc.message, path=source.file_path, obj=getattr(source, "object_path", None),
                            fix=exc.fix) from exc


def _preprocess_to_binary(source: TraceSource, params: PreprocessParams, out_path: Path, chunk_duration_s: float,
                          seed: int, progress: ProgressFn | None, device: torch.device,
                          channel_positions_um: np.ndarray | None, sample_shifts: np.ndarray | None,
                          clock: SessionClock | None, shank_ids: np.ndarray | None) -> PreprocessedRecording:
    _check_source(source, params)
    positions = _positions_for(source, params, channel_positions_um)
    shifts = _shifts_for(source, params, sample_shifts)
    fs = float(source.sampling_rate_hz)
    _, margin = _band(params, fs)
    chunk_samples = _streaming_chunk_samples(max(int(round(chunk_duration_s * fs)), 1), margin,
                                             source.num_channels, device)
    backoff = OomBackoff(chunk_samples, min_chunk_samples=min(2 * margin, chunk_samples), device=device)
    started = time.perf_counter()
    estimates = _estimate(source, params, positions, seed, device, backoff, shifts)
    streams = torch.get_num_threads() if device.type == "cpu" else 1
    kernel = estimates.kernel(params, device, fs)
    stream_to_binary(source, out_path, kernel, backoff, progress, streams=streams, dtype=params.output_dtype)
    zeroed = np.zeros((0, 2), np.int64) if kernel.saturation is None else kernel.saturation.periods()
    _log_saturation(zeroed, source.num_samples, fs)
    elapsed = time.perf_counter() - started
    log.info("preprocessed %d samples x %d channels (%.1f s of recording) on %s in %.2f s "
             "(%.2f s of recording per s), margin %d samples, chunk %d samples", source.num_samples,
             source.num_channels, source.num_samples / fs, device, elapsed,
             source.num_samples / fs / max(elapsed, 1e-9), margin, backoff.chunk_samples)
    return PreprocessedRecording(
        binary_path=out_path, dtype=params.output_dtype, num_samples=int(source.num_samples),
        num_channels=int(source.num_channels), sampling_rate_hz=fs, channel_positions_um=positions,
        whitening=estimates.whitening, whitening_inverse=estimates.whitening_inverse,
        clock=clock or SessionClock(rate_hz=fs), offsets_uv=estimates.offsets_uv, margin_samples=margin,
        device=str(device), phase_shifted=shifts is not None,
        bad_channels=tuple(int(c) for c in estimates.bad_indices),
        bad_channel_labels={} if estimates.bad is None else estimates.bad.by_label(),
        saturated_periods=tuple((int(a), int(b)) for a, b in zeroed),
        shank_ids=_shanks_for(source, shank_ids))


class PreprocessedSource:
    """A :class:`TraceSource` serving preprocessed windows of another, computed on demand (float32).

    The offsets (and, with ``params.whiten``, W) are estimated from sampled chunks as
    :func:`preprocess_to_binary` does; each read filters its window with the band-pass's margin on
    both sides. What reads a few scattered windows (unit waveforms of a SpikeInterface sorter's
    spikes) needs no binary of the whole recording.
    """

    def __init__(self, source: TraceSource, params: PreprocessParams, *, seed: int = 0,
                 device: torch.device | str = "cpu", channel_positions_um: np.ndarray | None = None,
                 sample_shifts: np.ndarray | None = None):
        _check_source(source, params)
        self._source, self._device = source, torch.device(device)
        self._params = params
        positions = _positions_for(source, params, channel_positions_um)
        self.estimates = _estimate(source, params, positions, seed, self._device,
                                   shifts=_shifts_for(source, params, sample_shifts))
        self._kernel = self.estimates.kernel(params, self._device, float(source.sampling_rate_hz))
        self.num_samples, self.num_channels = source.num_samples, source.num_channels
        self.sampling_rate_hz = source.sampling_rate_hz

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        """Preprocessed traces : (end_sample - start_sample, num_channels) float32 (µV, or whitened units)."""
        if end_sample <= start_sample:
            return np.zeros((0, self.num_channels), dtype=np.float32)
        window = read_window(self._source, int(start_sample), int(end_sample), self.estimates.margin)
        core, finite = self._kernel(window)
        refuse_non_finite(finite, window, int(start_sample))
        return core.cpu().numpy().copy()


def _log_saturation(periods: np.ndarray, num_samples: int, rate_hz: float) -> None:
    if not len(periods):
        return
    zeroed_s = float(np.sum(periods[:, 1] - periods[:, 0])) / rate_hz
    log.warning("zeroed %d saturated or artifact periods, %.3f s in all (%.2f %% of the recording)", len(periods),
                zeroed_s, 100.0 * zeroed_s * rate_hz / max(num_samples, 1))
    if zeroed_s * rate_hz > 0.05 * num_samples:
        log.warning("over 5 %% of the recording was zeroed as saturated: if it is not, raise "
                    "preprocess.saturation.level_uv or jump_uv_per_ms (or set preprocess.saturation.detect=False)")


def _streaming_chunk_samples(nominal: int, margin: int, num_channels: int, device: torch.device) -> int:
    """Chunk core of at most ``nominal`` samples (CPU: ~``CPU_WINDOW_BYTES``) whose window fills one FFT length."""
    if device.type == "cpu":
        nominal = min(nominal, max(CPU_WINDOW_BYTES // (4 * num_channels) - 2 * margin, 4 * margin))
    return max(fft_length(nominal + 2 * margin) - 2 * margin, 1)


def _check_source(source: TraceSource, params: PreprocessParams) -> None:
    if source.num_samples < 1 or source.num_channels < 1:
        raise BadInputError(f"recording is empty ({source.num_samples} samples x {source.num_channels} channels)")
    if source.sampling_rate_hz <= 0:
        raise BadInputError(f"sampling rate must be positive, got {source.sampling_rate_hz} Hz")
    if params.common_reference and source.num_channels < 2:
        raise BadInputError("a common reference over one channel would zero it",
                            fix="set preprocess.common_reference=False")


def _positions_for(source: TraceSource, params: PreprocessParams, given: np.ndarray | None) -> np.ndarray | None:
    """Channel positions (µm): the argument, else the source's attribute, else None (refused by local
    whitening, which needs them); checked."""
    positions = given if given is not None else getattr(source, "channel_positions_um", None)
    if positions is None:
        if not (params.whiten and params.whitening_mode == "local"):
            return None
        raise BadInputError("local whitening needs channel positions, and none were given",
                            fix="pass channel_positions_um=(num_channels, 2) µm or set "
                                "preprocess.whitening_mode='global'")
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (source.num_channels, 2) or not np.all(np.isfinite(positions)):
        raise BadInputError(f"channel_positions_um must be finite ({source.num_channels}, 2) µm, "
                            f"got shape {positions.shape}")
    return positions


def _shanks_for(source: TraceSource, given: np.ndarray | None) -> tuple[str, ...]:
    """Each channel's shank label (the argument, else the source's ``shank_ids``), () for a single shank."""
    shanks = given if given is not None else getattr(source, "shank_ids", None)
    if shanks is None:
        return ()
    shanks = tuple(str(s) for s in np.asarray(shanks).reshape(-1))
    if len(shanks) != source.num_channels:
        raise BadInputError(f"shank_ids must name {source.num_channels} channels' shanks, got {len(shanks)}")
    return shanks if len(set(shanks)) > 1 else ()


def _shifts_for(source: TraceSource, params: PreprocessParams, given: np.ndarray | None) -> np.ndarray | None:
    """The ADC sample shifts to undo (samples): the argument, else the source's ``inter_sample_shift``; None when
    ``params.adc_phase_shift`` is off, or there are none, or all are zero."""
    if not params.adc_phase_shift:
        return None
    shifts = given if given is not None else getattr(source, "inter_sample_shift", None)
    if shifts is None:
        return None
    shifts = np.asarray(shifts, dtype=np.float64).reshape(-1)
    if shifts.shape != (source.num_channels,) or not np.isfinite(shifts).all():
        raise BadInputError(f"ADC sample shifts must be {source.num_channels} finite numbers (one per channel), "
                            f"got {shifts.shape[0]}{'' if np.isfinite(shifts).all() else ' with non-finite values'}",
                            fix="rewrite the electrodes table's inter_sample_shift column, or set "
                                "preprocess.adc_phase_shift=False")
    return None if not shifts.any() else shifts
