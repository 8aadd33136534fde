"""Saturation and artifact periods (nwbflow.ephys.saturation): found where the synthetic probe was driven past
its rails, as SpikeInterface's detect_saturation_periods finds them, zeroed after preprocessing the same
whatever the chunking, and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.ephys.recording import PreprocessedRecording
from nwbflow.ephys.saturation import merge_periods, periods_of, saturated_samples
from nwbflow.nwb_io.read import open_session
from nwbflow.params import PreprocessParams, SaturationParams
from nwbflow.synth import SynthConfig, write_synthetic_session
from nwbflow.synth.ephys import saturation_periods

RATE = 30000.0
CONFIG = SynthConfig(duration_s=4.0, num_channels=32, num_units=8, ophys=False, saturation_events=6)


@pytest.fixture(scope="module")
def saturated(tmp_path_factory):
    path = tmp_path_factory.mktemp("saturation") / "saturated.nwb"
    write_synthetic_session(path, CONFIG)
    return path


def _noise_with_artifacts(rng, samples=60000, channels=24, artifacts=((10000, 10300), (29900, 30500))):
    """Gaussian noise (10 µV) with spikes of 300 µV on single channels, and artifacts of ~2 mV on most channels."""
    traces = rng.normal(0.0, 10.0, (samples, channels)).astype(np.float32)
    traces[rng.integers(0, samples, 200), rng.integers(0, channels, 200)] -= 300.0
    for start, end in artifacts:
        gains = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        gains[: channels // 4] = 0.0  # a quarter of the channels untouched
        traces[start:end] += 2000.0 * gains
    return traces


def test_periods_are_spikeinterfaces():
    """Same samples as SpikeInterface's detect_saturation_periods, except that a jump also marks the sample it
    lands on (SpikeInterface marks the one before it only): ours may end one sample later, never earlier."""
    import spikeinterface.core as si
    import spikeinterface.preprocessing as spre

    rng = np.random.default_rng(3)
    traces = _noise_with_artifacts(rng)
    traces[45000:45004] += np.array([0, 600, 1200, 0], np.float32)[:, None]  # a fast artifact that never clips
    rule = dict(level_uv=1000.0, jump_uv=300.0, proportion=0.2)
    ours = periods_of(saturated_samples(torch.from_numpy(traces), **rule).numpy())
    recording = si.NumpyRecording(traces, sampling_frequency=RATE)
    recording.set_channel_gains(1.0)  # traces are µV
    recording.set_channel_offsets(0.0)
    theirs = spre.detect_saturation_periods(recording, saturation_threshold_uV=1000.0, diff_threshold_uV=300.0,
                                            proportion=0.2)
    theirs = np.stack([theirs["start_sample_index"], theirs["end_sample_index"]], axis=1)
    assert len(ours) == len(theirs) == 3
    np.testing.assert_array_equal(ours[:, 0], theirs[:, 0])
    assert np.all((ours[:, 1] - theirs[:, 1] >= 0) & (ours[:, 1] - theirs[:, 1] <= 1))


def test_spikes_and_noise_are_never_saturation():
    rng = np.random.default_rng(4)
    traces = _noise_with_artifacts(rng, artifacts=())
    assert not saturated_samples(torch.from_numpy(traces), 1000.0, 300.0, 0.2).any()


def test_merge_joins_pieces_of_one_period():
    pieces = [np.array([[10, 20], [40, 50]]), np.array([[20, 30]]), np.array([[45, 60], [70, 71]])]
    assert merge_periods(pieces).tolist() == [[10, 30], [40, 60], [70, 71]]
    assert merge_periods([]).shape == (0, 2)


@pytest.mark.parametrize("chunk_s", [0.05, 10.0])
def test_zeroed_rows_are_the_periods_whatever_the_chunking(tmp_path, chunk_s):
    """Artifacts crossing chunk boundaries (50 ms chunks) are zeroed and reported exactly as in one chunk."""
    rng = np.random.default_rng(5)
    traces = _noise_with_artifacts(rng)
    params = PreprocessParams(whiten=False, output_dtype="float32", saturation=SaturationParams(pad_ms=1.0))
    record = preprocess_to_binary(ArraySource(traces, RATE), params, tmp_path / "out.bin", chunk_duration_s=chunk_s)
    out = np.fromfile(tmp_path / "out.bin", np.float32).reshape(traces.shape)
    pad = 30 + 1  # 1 ms, and the jumps into and out of each artifact mark the samples either side of them
    expected = [(10000 - pad, 10300 + pad), (29900 - pad, 30500 + pad)]
    assert [tuple(p) for p in record.saturated_periods] == expected
    zero_rows = np.flatnonzero(np.all(out == 0.0, axis=1))
    assert periods_of(np.isin(np.arange(len(out)), zero_rows)).tolist() == [list(p) for p in expected]
    whole = tmp_path / "whole.bin"
    preprocess_to_binary(ArraySource(traces, RATE), params, whole, chunk_duration_s=10.0)
    # what lies beyond the band-pass's margin is forgotten up to DEFAULT_MARGIN_TOLERANCE (1e-6) of the input:
    # of a 2 mV artifact, 2e-3 µV
    np.testing.assert_allclose(out, np.fromfile(whole, np.float32).reshape(traces.shape), atol=5e-3)


def test_detection_off_zeroes_nothing(tmp_path):
    traces = _noise_with_artifacts(np.random.default_rng(6))
    params = PreprocessParams(whiten=False, saturation=SaturationParams(detect=False))
    record = preprocess_to_binary(ArraySource(traces, RATE), params, tmp_path / "out.bin")
    assert record.saturated_periods == ()


def test_synthetic_saturation_is_clipped_at_the_rails_and_found(saturated, tmp_path):
    truth = saturation_periods(CONFIG)
    assert len(truth) == CONFIG.saturation_events
    with open_session(saturated) as session:
        series = session.select_ephys()
        start, end = (int(v) for v in truth[0])
        during = series.get_traces(start, end)
        assert np.abs(during).max() == pytest.approx(CONFIG.saturation_rail_uv, abs=CONFIG.lsb_uv)
        assert np.abs(series.get_traces(0, start - 1000)).max() < CONFIG.saturation_rail_uv
        record = preprocess_to_binary(series, PreprocessParams(), tmp_path / "p.bin")
    found = np.asarray(record.saturated_periods)
    assert len(found) == len(truth)
    pad = int(round(SaturationParams().pad_ms * CONFIG.sampling_rate_hz / 1000))
    # each truth event lies inside its zeroed period, which reaches at most the pad (and the raised-cosine
    # edges still under the thresholds, 0.5 ms) beyond it
    assert np.all(found[:, 0] <= truth[:, 0]) and np.all(found[:, 1] >= truth[:, 1])
    assert np.all(truth[:, 0] - found[:, 0] <= pad) and np.all(found[:, 1] - truth[:, 1] <= pad)
    record.save(tmp_path)
    assert PreprocessedRecording.load(tmp_path).saturated_periods == record.saturated_periods


def test_a_recording_saturated_throughout_is_refused_naming_its_file(tmp_path):
    """Traces beyond the levels everywhere (e.g. a wrong data type or conversion): a clear error naming the
    file and series (the source knows them), not a singular whitening."""
    from nwbflow.errors import BadInputError

    class NamedSource(ArraySource):
        file_path, object_path = tmp_path / "session.nwb", "acquisition/ElectricalSeries"

    traces = np.where(np.arange(30000)[:, None] % 2 == 0, 3000.0, -3000.0) * np.ones((1, 24), np.float32)
    traces = (traces + np.random.default_rng(7).normal(0, 10, traces.shape)).astype(np.float32)
    params = PreprocessParams(bad_channels={"detect": False})  # alternating rails: every channel is odd too
    with pytest.raises(BadInputError, match="zeroed as saturated") as raised:
        preprocess_to_binary(NamedSource(traces, RATE), params, tmp_path / "out.bin")
    assert "session.nwb" in str(raised.value) and "saturation.level_uv" in str(raised.value)
    with pytest.raises(BadInputError, match="every channel was labelled bad") as raised:
        preprocess_to_binary(NamedSource(traces, RATE), PreprocessParams(), tmp_path / "out.bin")
    assert "session.nwb" in str(raised.value)
