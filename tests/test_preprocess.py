"""Preprocessing kernel: band-pass against scipy, chunk invariance, whitening, bad input, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import signal

from nwbflow.ephys.chunks import ArraySource, TraceSource, open_binary
from nwbflow.ephys.preprocess import (
    PreprocessResult,
    design_bandpass,
    filter_margin_samples,
    preprocess_chunk,
    preprocess_to_binary,
    whitening_matrix,
    zero_phase_filter,
)
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


def _read(result: PreprocessResult) -> np.ndarray:
    return np.fromfile(result.out_path, dtype=np.float32).reshape(result.num_samples, result.num_channels)


def _whole_array(source: TraceSource, params: PreprocessParams, result: PreprocessResult) -> np.ndarray:
    """The whole recording as one chunk (no chunk boundaries), same offsets and whitening."""
    sos = design_bandpass(params.freq_min_hz, params.freq_max_hz, source.sampling_rate_hz, params.filter_order)
    return preprocess_chunk(source.get_traces(0, source.num_samples), sos, result.margin_samples, context=(0, 0),
                            offsets_uv=result.offsets_uv, common_reference=params.common_reference,
                            whitening=result.whitening)


def test_source_protocol_is_satisfied():
    assert isinstance(BlockNoiseSource(10, np.eye(2)), TraceSource)
    assert isinstance(ArraySource(np.zeros((3, 2), np.float32), FS_HZ), TraceSource)


def test_bandpass_equals_sosfiltfilt_away_from_the_ends(tmp_path):
    source = BlockNoiseSource(90_000, 10.0 * np.eye(8), seed=1, lfp_uv=200.0)
    params = PreprocessParams(common_reference=False, whiten=False, chunk_duration_s=0.25)
    result = preprocess_to_binary(source, params, tmp_path / "filtered.bin")
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    expected = signal.sosfiltfilt(sos, source.get_traces(0, source.num_samples).astype(np.float64), axis=0)
    inner = slice(result.margin_samples, source.num_samples - result.margin_samples)
    error = np.max(np.abs(_read(result)[inner] - expected[inner]))
    assert error <= 1e-3 * expected.std(), error / expected.std()


def test_zero_phase_filter_is_sosfiltfilt_without_padding():
    x = np.random.default_rng(2).normal(size=(5000, 3))
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    np.testing.assert_allclose(zero_phase_filter(x, sos), signal.sosfiltfilt(sos, x, axis=0, padtype=None),
                               atol=1e-12)


def test_margin_bounds_the_truncation_error():
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    margin = filter_margin_samples(sos, tol=1e-6)
    impulse = np.zeros(8 * margin + 1)
    impulse[4 * margin] = 1.0
    response = np.abs(zero_phase_filter(impulse[:, None], sos)[:, 0])
    outside = response[:4 * margin - margin].sum() + response[4 * margin + margin + 1:].sum()
    assert outside <= 1e-6 * response.sum()
    assert filter_margin_samples(sos, tol=1e-3) < margin < filter_margin_samples(sos, tol=1e-9)


@pytest.mark.parametrize("common_reference,whiten", [(False, False), (True, True)])
def test_chunk_boundaries_are_invisible(tmp_path, common_reference, whiten):
    mixing = 10.0 * np.eye(6) + 4.0
    source = BlockNoiseSource(45_000, mixing, seed=3, lfp_uv=300.0)
    params = PreprocessParams(common_reference=common_reference, whiten=whiten, chunk_duration_s=0.1,
                              noise_sample_chunks=5)
    result = preprocess_to_binary(source, params, tmp_path / "chunked.bin")
    whole = _whole_array(source, params, result)
    error = np.max(np.abs(_read(result) - whole))
    assert error <= 1e-3 * whole.std(), error / whole.std()


def test_whitening_gives_identity_covariance(tmp_path):
    positions_um = np.arange(16) * 20.0
    correlation = np.exp(-np.abs(positions_um[:, None] - positions_um[None]) / 40.0)
    mixing = 10.0 * np.linalg.cholesky(0.8 * correlation + 0.2 * np.eye(16))
    source = BlockNoiseSource(300_000, mixing, seed=4, lfp_uv=100.0)
    params = PreprocessParams(common_reference=False, whiten=True, chunk_duration_s=0.5)
    result = preprocess_to_binary(source, params, tmp_path / "white.bin")
    white = _read(result).astype(np.float64)
    cov = white.T @ white / len(white)
    off_diagonal = cov[~np.eye(16, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 0.05
    assert np.max(np.abs(np.diag(cov) - 1.0)) < 0.05
    np.testing.assert_allclose(result.whitening_inverse @ result.whitening, np.eye(16), atol=1e-9)


def test_whitening_matrix_is_zca():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    w = whitening_matrix(cov, regularization=0.0)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w @ cov @ w, np.eye(6), atol=1e-9)
    with pytest.raises(BadInputError):
        whitening_matrix(np.zeros((3, 3)), regularization=0.1)


@pytest.mark.parametrize("num_samples", [1, 100, 2_000])  # < margin (442), < margin, < one chunk
def test_recordings_shorter_than_the_margin_or_a_chunk(tmp_path, num_samples):
    source = BlockNoiseSource(num_samples, 10.0 * np.eye(4) + 2.0, seed=6)
    params = PreprocessParams(chunk_duration_s=0.5, whiten=num_samples > 1)
    result = preprocess_to_binary(source, params, tmp_path / "short.bin")
    assert num_samples < 15_000 and (num_samples > 1_000 or num_samples < result.margin_samples)
    out = _read(result)
    assert out.shape == (num_samples, 4) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _whole_array(source, params, result), atol=1e-4 * max(out.std(), 1e-3))


def test_nan_is_refused_with_the_sample_range(tmp_path):
    traces = np.random.default_rng(7).normal(size=(20_000, 4)).astype(np.float32)
    traces[12_345, 2] = np.nan
    params = PreprocessParams(chunk_duration_s=0.1, noise_sample_chunks=2)
    with pytest.raises(BadInputError, match=r"NaN/Inf in samples \[\d+, \d+\) \(first at sample 12345"):
        preprocess_to_binary(ArraySource(traces, FS_HZ), params, tmp_path / "nan.bin")
    assert not (tmp_path / "nan.bin").exists() and not (tmp_path / "nan.bin.partial").exists()


def test_band_above_nyquist_is_refused(tmp_path):
    source = BlockNoiseSource(1000, np.eye(2), sampling_rate_hz=10_000.0)
    with pytest.raises(BadInputError, match="Nyquist"):
        preprocess_to_binary(source, PreprocessParams(freq_max_hz=6000.0), tmp_path / "x.bin")


def _peak_traced_bytes(source: TraceSource, params: PreprocessParams, out_path) -> int:
    tracemalloc.start()
    try:
        preprocess_to_binary(source, params, out_path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_chunk_not_the_recording(tmp_path):
    params = PreprocessParams(freq_max_hz=3000.0, chunk_duration_s=0.1, noise_sample_chunks=4)
    mixing = 10.0 * np.eye(8) + 1.0
    short = BlockNoiseSource(10_000, mixing, seed=8, sampling_rate_hz=10_000.0)
    long = BlockNoiseSource(100_000, mixing, seed=8, sampling_rate_hz=10_000.0)
    _peak_traced_bytes(short, params, tmp_path / "warm.bin")  # first-call allocations (imports, caches)
    peak_short = _peak_traced_bytes(short, params, tmp_path / "short.bin")
    peak_long = _peak_traced_bytes(long, params, tmp_path / "long.bin")
    assert peak_long <= 1.2 * peak_short, (peak_short, peak_long)
    assert open_binary(tmp_path / "long.bin", 8, 10_000.0).num_samples == 100_000
