"""Preprocessing kernel: band-pass against scipy, chunk invariance, whitening, median, bad input, memory, OOM."""

from __future__ import annotations

import logging
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import signal

from nwbflow.device import OomBackoff
from nwbflow.ephys.chunks import (ArraySource, BackgroundWriter, TraceSource, WindowPrefetcher, open_binary,
                                  read_window)
from nwbflow.ephys.preprocess import (
    design_bandpass,
    fft_length,
    filter_margin_samples,
    local_whitening_matrix,
    median_across_channels,
    preprocess_chunk,
    preprocess_to_binary,
    whitening_matrix,
    zero_phase_filter,
)
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.errors import BadInputError
from nwbflow.params import PreprocessParams

FS_HZ = 30_000.0


class BlockNoiseSource:
    """Reproducible Gaussian noise generated on the fly per block (never the whole recording).

    Each block of ``block`` samples is drawn from a generator seeded by (seed,
    block index), then mixed across channels by ``mixing`` (so its spatial
    covariance is ``mixing @ mixing.T``) and given per-channel offsets and a
    slow 3 Hz common oscillation ("LFP") of ``lfp_uv`` µV.
    """

    def __init__(self, num_samples: int, mixing: np.ndarray, *, seed: int = 0, block: int = 4096,
                 lfp_uv: float = 0.0, sampling_rate_hz: float = FS_HZ):
        self.num_samples = num_samples
        self.num_channels = mixing.shape[0]
        self.sampling_rate_hz = sampling_rate_hz
        self._mixing, self._seed, self._block, self._lfp_uv = mixing, seed, block, lfp_uv
        self._offsets = np.random.default_rng(seed + 10_000).normal(0.0, 300.0, self.num_channels)

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        first, last = start_sample // self._block, (end_sample - 1) // self._block
        blocks = [np.random.default_rng((self._seed, b)).standard_normal((self._block, self._mixing.shape[1]))
                  for b in range(first, last + 1)]
        noise = np.concatenate(blocks)[start_sample - first * self._block:end_sample - first * self._block]
        t_s = np.arange(start_sample, end_sample) / self.sampling_rate_hz
        lfp = self._lfp_uv * np.sin(2 * np.pi * 3.0 * t_s)[:, None]
        return (noise @ self._mixing.T + lfp + self._offsets).astype(np.float32)


def _read(result: PreprocessedRecording) -> np.ndarray:
    stored = np.fromfile(result.binary_path, dtype=np.dtype(result.dtype).newbyteorder("<"))
    return stored.astype(np.float32).reshape(result.num_samples, result.num_channels)


def _whole_array(source: TraceSource, params: PreprocessParams, result: PreprocessedRecording,
                 device: str = "cpu") -> np.ndarray:
    """The whole recording as one chunk (no chunk boundaries), same offsets and whitening."""
    sos = design_bandpass(params.freq_min_hz, params.freq_max_hz, source.sampling_rate_hz, params.filter_order)
    return preprocess_chunk(source.get_traces(0, source.num_samples), sos, result.margin_samples, context=(0, 0),
                            offsets_uv=result.offsets_uv, common_reference=params.common_reference,
                            whitening=result.whitening, device=device).cpu().numpy()


def _spatially_correlated_mixing(num_channels: int, pitch_um: float, length_um: float) -> np.ndarray:
    """Mixing whose covariance is 100 µV² x (0.8 exp(-distance / length) + 0.2 I) on a line of channels."""
    positions_um = np.arange(num_channels) * pitch_um
    correlation = np.exp(-np.abs(positions_um[:, None] - positions_um[None]) / length_um)
    return 10.0 * np.linalg.cholesky(0.8 * correlation + 0.2 * np.eye(num_channels))


def test_source_protocol_is_satisfied():
    assert isinstance(BlockNoiseSource(10, np.eye(2)), TraceSource)
    assert isinstance(ArraySource(np.zeros((3, 2), np.float32), FS_HZ), TraceSource)


# ----------------------------------------------------------------------------------------------- filter


def test_bandpass_equals_sosfiltfilt_away_from_the_ends(tmp_path, device):
    source = BlockNoiseSource(90_000, 10.0 * np.eye(8), seed=1, lfp_uv=200.0)
    params = PreprocessParams(output_dtype="float32", common_reference=False, whiten=False)
    result = preprocess_to_binary(source, params, tmp_path / "filtered.bin", device=device, chunk_duration_s=0.25)
    assert result.device == str(torch.device(device))
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    expected = signal.sosfiltfilt(sos, source.get_traces(0, source.num_samples).astype(np.float64), axis=0)
    inner = slice(result.margin_samples, source.num_samples - result.margin_samples)
    error = np.max(np.abs(_read(result)[inner] - expected[inner]))
    assert error <= 1e-3 * expected.std(), error / expected.std()


@pytest.mark.parametrize("num_samples", [1, 100, 5_000])  # shorter than the margin (442), and longer
def test_zero_phase_filter_is_sosfiltfilt_of_the_oddly_padded_signal(device, num_samples):
    x = np.random.default_rng(2).normal(size=(num_samples, 3)) + [0.0, 50.0, -20.0]
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    margin = filter_margin_samples(sos)
    padded = np.pad(x, ((margin, margin), (0, 0)), mode="reflect", reflect_type="odd")
    expected = signal.sosfiltfilt(sos, padded, axis=0, padtype=None)[margin:margin + num_samples]
    filtered = zero_phase_filter(x, sos, device=device)
    assert filtered.dtype == torch.float32 and filtered.device.type == torch.device(device).type
    float32_rounding = 1e-5 * np.abs(x).max()  # of the FFT, relative to the input's scale (here its offsets)
    np.testing.assert_allclose(filtered.cpu().numpy(), expected, atol=1e-4 * x.std() + float32_rounding)
    if num_samples > 2 * margin:  # and scipy's own odd padding agrees away from the ends
        inner = slice(margin, num_samples - margin)
        default = signal.sosfiltfilt(sos, x, axis=0)
        assert np.max(np.abs(filtered.cpu().numpy()[inner] - default[inner])) <= 1e-3 * default.std()


def test_margin_bounds_the_truncation_error():
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    margin = filter_margin_samples(sos, tol=1e-6)
    impulse = np.zeros(8 * margin + 1)
    impulse[4 * margin] = 1.0
    response = np.abs(signal.sosfiltfilt(sos, impulse, padtype=None))
    outside = response[:4 * margin - margin].sum() + response[4 * margin + margin + 1:].sum()
    assert outside <= 1e-6 * response.sum()
    assert filter_margin_samples(sos, tol=1e-3) < margin < filter_margin_samples(sos, tol=1e-9)


def test_fft_lengths_are_radix_2_heavy_5_smooth_and_minimal():
    def allowed(n):
        exponents = []
        for p in (2, 3, 5):
            exponents.append(0)
            while n % p == 0:
                n, exponents[-1] = n // p, exponents[-1] + 1
        return n == 1 and exponents[0] >= exponents[1] + exponents[2]
    for n in [1, 2, 7, 11, 97, 1000, 10_922, 30_884, 65_537]:
        length = fft_length(n)
        assert n <= length <= 4 * n / 3 + 1 and allowed(length)
        assert not any(allowed(m) for m in range(n, length))


@pytest.mark.parametrize("num_samples, width", [(1000, 61), (61, 61), (777, 5)])
def test_fft_correlation_equals_numpy_valid_correlation(device, num_samples, width):
    from nwbflow.ephys.filtering import correlate_valid

    rng = np.random.default_rng(num_samples)
    traces, kernels = rng.normal(size=(num_samples, 3)), rng.normal(size=(2, width))
    expected = np.stack([[np.correlate(traces[:, c], k, mode="valid") for c in range(3)] for k in kernels])
    found = correlate_valid(torch.as_tensor(traces, dtype=torch.float32, device=device),
                            torch.as_tensor(kernels, dtype=torch.float32, device=device)).cpu().numpy()
    assert found.shape == (2, 3, num_samples - width + 1)
    # float32 FFT of length <= 1200: rounding ~1e-6 of the sum of |terms| (<= ~60 here).
    np.testing.assert_allclose(found, expected, atol=1e-3)


@pytest.mark.parametrize("common_reference,whiten", [(False, False), (True, True)])
def test_chunk_boundaries_are_invisible(tmp_path, device, common_reference, whiten):
    mixing = 10.0 * np.eye(6) + 4.0
    source = BlockNoiseSource(45_000, mixing, seed=3, lfp_uv=300.0)
    params = PreprocessParams(output_dtype="float32", common_reference=common_reference, whiten=whiten,
                              noise_sample_chunks=5)
    result = preprocess_to_binary(source, params, tmp_path / "chunked.bin", device=device, chunk_duration_s=0.1)
    whole = _whole_array(source, params, result, device)
    error = np.max(np.abs(_read(result) - whole))
    assert error <= 1e-3 * whole.std(), error / whole.std()


def test_concurrent_cpu_streams_equal_one_stream(tmp_path):
    """On the CPU, chunks computed on several threads are written in order: same file as one stream."""
    source = BlockNoiseSource(90_000, 10.0 * np.eye(8) + 3.0, seed=4)
    params = PreprocessParams(output_dtype="float32", noise_sample_chunks=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _read(preprocess_to_binary(source, params, tmp_path / "one.bin", chunk_duration_s=0.1))
        torch.set_num_threads(3)
        three = _read(preprocess_to_binary(source, params, tmp_path / "three.bin", chunk_duration_s=0.1))
        assert torch.get_num_threads() == 3  # restored after the concurrent streams
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-5 * one.std())


# -------------------------------------------------------------------------------------- common reference


@pytest.mark.parametrize("num_channels", [1, 2, 5, 64, 384])
def test_median_across_channels_equals_numpy(device, num_channels):
    rng = np.random.default_rng(num_channels)
    continuous = rng.normal(0.0, 30.0, size=(2_000, num_channels)).astype(np.float32)
    int16_like = (np.round(rng.normal(0.0, 3.0, size=(2_000, num_channels))) * 0.195).astype(np.float32)
    ties = rng.choice(np.array([-1.0, -0.0, 0.0, 2.0], dtype=np.float32), size=(2_000, num_channels))
    for traces in (continuous, int16_like, ties):
        median = median_across_channels(torch.as_tensor(traces, device=device))
        np.testing.assert_array_equal(median.cpu().numpy(), np.median(traces, axis=1))


# -------------------------------------------------------------------------------------------- whitening


def test_whitening_gives_identity_covariance(tmp_path, device):
    mixing = _spatially_correlated_mixing(16, pitch_um=20.0, length_um=40.0)
    source = BlockNoiseSource(300_000, mixing, seed=4, lfp_uv=100.0)
    params = PreprocessParams(common_reference=False, whiten=True)
    result = preprocess_to_binary(source, params, tmp_path / "white.bin", device=device, chunk_duration_s=0.5)
    white = _read(result).astype(np.float64)
    cov = white.T @ white / len(white)
    off_diagonal = cov[~np.eye(16, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 0.05
    assert np.max(np.abs(np.diag(cov) - 1.0)) < 0.05
    np.testing.assert_allclose(result.whitening_inverse @ result.whitening, np.eye(16), atol=1e-9)


def test_local_whitening_gives_identity_covariance_within_the_radius(tmp_path, device):
    num_channels, pitch_um, radius_um = 24, 20.0, 60.0
    source = BlockNoiseSource(300_000, _spatially_correlated_mixing(num_channels, pitch_um, 40.0), seed=9)
    source.channel_positions_um = np.c_[np.zeros(num_channels), np.arange(num_channels) * pitch_um]
    params = PreprocessParams(common_reference=False, whitening_mode="local", whitening_radius_um=radius_um)
    result = preprocess_to_binary(source, params, tmp_path / "local.bin", device=device, chunk_duration_s=0.5)
    distance_um = np.abs(source.channel_positions_um[:, 1, None] - source.channel_positions_um[None, :, 1])
    assert np.all(result.whitening[distance_um > radius_um] == 0.0)  # sparse: neighbourhoods only
    white = _read(result).astype(np.float64)
    cov = white.T @ white / len(white)
    within = (distance_um <= radius_um) & ~np.eye(num_channels, dtype=bool)
    assert np.max(np.abs(cov[within])) < 0.05
    assert np.max(np.abs(np.diag(cov) - 1.0)) < 0.05
    np.testing.assert_allclose(result.whitening_inverse @ result.whitening, np.eye(num_channels), atol=1e-9)


def test_local_whitening_needs_channel_positions(tmp_path):
    source = BlockNoiseSource(1_000, np.eye(4))
    with pytest.raises(BadInputError, match="local whitening needs channel positions"):
        preprocess_to_binary(source, PreprocessParams(whitening_mode="local"), tmp_path / "x.bin")
    with pytest.raises(BadInputError, match=r"must be finite \(4, 2\)"):
        preprocess_to_binary(source, PreprocessParams(whitening_mode="local"), tmp_path / "x.bin",
                             channel_positions_um=np.zeros((3, 2)))
    assert not (tmp_path / "x.bin").exists()


def test_local_whitening_with_a_radius_spanning_the_probe_is_global_whitening():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    positions_um = np.c_[np.zeros(6), np.arange(6) * 20.0]
    np.testing.assert_allclose(local_whitening_matrix(cov, positions_um, 1000.0, 1e-3),
                               whitening_matrix(cov, 1e-3), atol=1e-12)


def test_whitening_matrix_is_zca():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    w = whitening_matrix(cov, regularization=0.0)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w @ cov @ w, np.eye(6), atol=1e-9)
    with pytest.raises(BadInputError):
        whitening_matrix(np.zeros((3, 3)), regularization=0.1)


# ------------------------------------------------------------------------------------- ends, bad input


@pytest.mark.parametrize("num_samples", [1, 100, 2_000])  # < margin (442), < margin, < one chunk
def test_recordings_shorter_than_the_margin_or_a_chunk(tmp_path, device, num_samples):
    source = BlockNoiseSource(num_samples, 10.0 * np.eye(4) + 2.0, seed=6)
    params = PreprocessParams(output_dtype="float32", whiten=num_samples > 1)
    result = preprocess_to_binary(source, params, tmp_path / "short.bin", device=device, chunk_duration_s=0.5)
    assert num_samples < 15_000 and (num_samples > 1_000 or num_samples < result.margin_samples)
    out = _read(result)
    assert out.shape == (num_samples, 4) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _whole_array(source, params, result, device),
                               atol=1e-4 * max(out.std(), 1e-3))


def test_nan_is_refused_with_the_sample_range(tmp_path, device):
    traces = np.random.default_rng(7).normal(size=(20_000, 4)).astype(np.float32)
    traces[12_345, 2] = np.nan
    params = PreprocessParams(noise_sample_chunks=2)
    with pytest.raises(BadInputError, match=r"NaN/Inf in samples \[\d+, \d+\) \(first at sample 12345"):
        preprocess_to_binary(ArraySource(traces, FS_HZ), params, tmp_path / "nan.bin", device=device,
                             chunk_duration_s=0.1)
    assert not (tmp_path / "nan.bin").exists() and not list(tmp_path.glob(".nan.bin.*"))
    traces[12_345, 2] = np.inf  # and Inf, in the streaming pass alone (no chunk sampled for estimates)
    params = PreprocessParams(noise_sample_chunks=1, whiten=False)
    with pytest.raises(BadInputError, match=r"\(first at sample 12345, channel index 2\)"):
        preprocess_to_binary(ArraySource(traces, FS_HZ), params, tmp_path / "inf.bin", device=device,
                             chunk_duration_s=0.1)
    assert not (tmp_path / "inf.bin").exists() and not list(tmp_path.glob(".inf.bin.*"))


def test_band_above_nyquist_is_refused(tmp_path):
    source = BlockNoiseSource(1000, np.eye(2), sampling_rate_hz=10_000.0)
    with pytest.raises(BadInputError, match="Nyquist"):
        preprocess_to_binary(source, PreprocessParams(freq_max_hz=6000.0), tmp_path / "x.bin")


# ------------------------------------------------------------------------------------------ memory, OOM


def _peak_traced_bytes(source: TraceSource, params: PreprocessParams, out_path) -> int:
    tracemalloc.start()
    try:
        preprocess_to_binary(source, params, out_path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_chunk_not_the_recording(tmp_path):
    params = PreprocessParams(freq_max_hz=3000.0, noise_sample_chunks=4)
    mixing = 10.0 * np.eye(8) + 1.0
    # Both several chunks long, so both hold as many chunks in flight (the CPU streams compute concurrently).
    short = BlockNoiseSource(30_000, mixing, seed=8, sampling_rate_hz=10_000.0)
    long = BlockNoiseSource(300_000, mixing, seed=8, sampling_rate_hz=10_000.0)
    _peak_traced_bytes(short, params, tmp_path / "warm.bin")  # first-call allocations (imports, caches)
    peak_short = _peak_traced_bytes(short, params, tmp_path / "short.bin")
    peak_long = _peak_traced_bytes(long, params, tmp_path / "long.bin")
    assert peak_long <= 1.2 * peak_short, (peak_short, peak_long)
    assert open_binary(tmp_path / "long.bin", 8, 10_000.0, dtype=params.output_dtype).num_samples == 300_000


def _peak_growth_bytes(source: TraceSource, params: PreprocessParams, out_path, device: str) -> int:
    """Peak memory growth during a run: CUDA's allocator peak, or the process's resident-set high-water mark."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        preprocess_to_binary(source, params, out_path, device=device)
        return torch.cuda.max_memory_allocated(device) - base
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the resident-set high-water mark here")

    def kib(field: str) -> int:
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field))

    base = kib("VmRSS:")
    preprocess_to_binary(source, params, out_path, device=device)
    return 1024 * (kib("VmHWM:") - base)


def test_device_memory_does_not_grow_with_the_recording(tmp_path, device):
    """torch allocations (which tracemalloc does not see) are bounded by the chunk too.

    Both recordings are many chunks long, so both fill the pipeline (chunks in flight, host buffers, torch's
    pools); a recording of 2 chunks does not and peaks ~7-15 MB lower, which said nothing about the length.
    On CPU the resident-set high-water mark is noisy: 7-47 MB of growth per run whatever the length
    (300 000, 1.2 M and 4.8 M samples all gave 18-32 MB), highest first (allocator warm-up). So the lengths
    differ 16-fold, the runs alternate, each length's least of 3 counts, and the bound is an eighth of the
    long run's extra output (18 MB of 144 MB): what keeps an eighth of the output in memory fails.
    """
    params = PreprocessParams(noise_sample_chunks=3)
    mixing = 10.0 * np.eye(16) + 1.0
    short_samples, long_samples = 300_000, 4_800_000
    extra_bytes = (long_samples - short_samples) * 16 * 2  # 144 MB more float16 output for the long one
    short, long = BlockNoiseSource(short_samples, mixing, seed=11), BlockNoiseSource(long_samples, mixing, seed=11)
    _peak_growth_bytes(short, params, tmp_path / "warm.bin", device)  # caches, FFT plans, allocator pools
    peaks = [(_peak_growth_bytes(short, params, tmp_path / f"short{i}.bin", device),
              _peak_growth_bytes(long, params, tmp_path / f"long{i}.bin", device)) for i in range(3)]
    peak_short, peak_long = (min(column) for column in zip(*peaks))
    assert peak_long - peak_short < extra_bytes / 8, peaks


def test_oom_backoff_halves_the_chunk_and_continues(caplog):
    calls = []

    def step(lo, hi):
        calls.append((lo, hi))
        if hi - lo > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    backoff = OomBackoff(1000, min_chunk_samples=100)
    with caplog.at_level(logging.WARNING, logger="nwbflow.device"):
        backoff.run(step, 50, 2_050)
    assert calls[:3] == [(50, 1050), (50, 550), (50, 300)]  # halved twice, from the same start
    done = [c for c in calls if c[1] - c[0] <= 300]
    assert done[0] == (50, 300) and done[-1][1] == 2_050
    assert all(a[1] == b[0] for a, b in zip(done, done[1:]))  # consecutive: nothing skipped or repeated
    assert backoff.chunk_samples == 250 and "out of memory" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):  # below the floor the error goes through
        OomBackoff(1000, min_chunk_samples=400).run(step, 0, 1000)
    with pytest.raises(ValueError, match="not memory"):  # other errors are not retried
        OomBackoff(1000).run(lambda lo, hi: (_ for _ in ()).throw(ValueError("not memory")), 0, 10)


def test_host_allocation_failures_are_out_of_memory_too():
    """torch's CPU allocator raises a plain RuntimeError when the host has no memory: the backoff cures it too."""
    from nwbflow.device import is_out_of_memory

    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: beyond any address space
    assert is_out_of_memory(caught.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(OSError(28, "No space left on device"))


class _OomAboveSource(BlockNoiseSource):
    """Raises a (fake) CUDA out-of-memory error on any read of more than ``limit`` samples."""

    limit = 10_000

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        if end_sample - start_sample > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return super().get_traces(start_sample, end_sample)


def test_preprocess_to_binary_survives_out_of_memory(tmp_path, device):
    mixing = 10.0 * np.eye(4) + 2.0
    params = PreprocessParams(output_dtype="float32", common_reference=False, whiten=False)
    progress: list[tuple[int, int]] = []
    result = preprocess_to_binary(_OomAboveSource(100_000, mixing, seed=12, lfp_uv=50.0), params,
                                  tmp_path / "oom.bin", device=device, progress=lambda d, t: progress.append((d, t)),
                                  chunk_duration_s=1.0)
    reference = preprocess_to_binary(BlockNoiseSource(100_000, mixing, seed=12, lfp_uv=50.0), params,
                                     tmp_path / "ref.bin", device=device, chunk_duration_s=1.0)
    out, expected = _read(result), _read(reference)
    assert np.max(np.abs(out - expected)) <= 1e-3 * expected.std()
    assert progress[-1] == (100_000, 100_000) and len(progress) > 10  # chunks of < 10k samples after halving
    assert all(a[0] < b[0] for a, b in zip(progress, progress[1:]))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # at most 2 x margin: not worth going on
        _OomAboveSource.limit = 3 * result.margin_samples
        try:
            preprocess_to_binary(_OomAboveSource(100_000, mixing, seed=12), params, tmp_path / "x.bin", device=device,
                                 chunk_duration_s=1.0)
        finally:
            _OomAboveSource.limit = 10_000
    assert not (tmp_path / "x.bin").exists() and not list(tmp_path.glob(".x.bin.*"))


def test_out_of_memory_on_concurrent_cpu_streams_goes_on_with_half_the_chunk(tmp_path, caplog):
    """Chunks computed ahead of an out-of-memory error give their buffers back; the streams go on from the failed
    chunk at half its size (the backoff's rule), and never stall."""
    mixing = 10.0 * np.eye(4) + 2.0
    params = PreprocessParams(output_dtype="float32", common_reference=False, whiten=False)
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = preprocess_to_binary(_OomAboveSource(100_000, mixing, seed=12, lfp_uv=50.0), params,
                                                 tmp_path / "oom.bin", chunk_duration_s=1.0)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.WARNING, logger="nwbflow.device"):
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            worker.join(timeout=120)
    finally:
        torch.set_num_threads(threads)
    assert not worker.is_alive(), "the stream stalled after the out-of-memory error"
    halvings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert halvings and all("retrying from sample" in m for m in halvings)  # the backoff's rule, nothing else
    reference = preprocess_to_binary(BlockNoiseSource(100_000, mixing, seed=12, lfp_uv=50.0), params,
                                     tmp_path / "ref.bin", chunk_duration_s=1.0)
    np.testing.assert_allclose(_read(outcome["result"]), _read(reference), rtol=0, atol=1e-5 * _read(reference).std())


# --------------------------------------------------------------------------------------- output storage


def test_float16_output_is_float32_output_rounded_once(tmp_path):
    """The default float16 binary holds the float32 result rounded to nearest: relative error <= 2^-11."""
    source = BlockNoiseSource(60_000, 10.0 * np.eye(8) + 3.0, seed=21, lfp_uv=200.0)
    half = preprocess_to_binary(source, PreprocessParams(), tmp_path / "half.bin", chunk_duration_s=0.2)
    full = preprocess_to_binary(source, PreprocessParams(output_dtype="float32"),
                                tmp_path / "full.bin", chunk_duration_s=0.2)
    assert (half.dtype, full.dtype) == ("float16", "float32")
    assert half.binary_path.stat().st_size * 2 == full.binary_path.stat().st_size
    np.testing.assert_array_equal(_read(half), _read(full).astype(np.float16).astype(np.float32))
    reread = open_binary(half.binary_path, 8, dtype="float16").get_traces(1_000, 2_000)
    assert reread.dtype == np.float32
    np.testing.assert_array_equal(reread, _read(half)[1_000:2_000])
    with pytest.raises(BadInputError, match="float64"):
        open_binary(half.binary_path, 8, dtype="float64")


# ------------------------------------------------------------------------------------- background I/O


def test_window_prefetcher_serves_the_same_windows_as_read_window():
    source = BlockNoiseSource(10_000, np.eye(3), seed=13)
    plan = np.array([[1_000, 3_000], [6_000, 9_000]])
    asked = [(1_000, 2_000), (2_000, 3_000), (6_000, 7_500), (7_500, 9_000), (0, 500), (500, 10_000)]
    with WindowPrefetcher(source, 50, plan=plan) as reader:
        for start, end in asked:  # followed, split, jumped back, outside the plan
            got, expected = reader.read(start, end), read_window(source, start, end, 50)
            assert (got.context_before, got.context_after) == (expected.context_before, expected.context_after)
            np.testing.assert_array_equal(got.traces, expected.traces)


def test_background_writer_raises_write_errors():
    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with BackgroundWriter(FullDisk()) as writer:
            for _ in range(5):
                writer.write(np.zeros(10, dtype=np.float32))
