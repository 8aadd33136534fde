"""Bad channels (nwbflow.ephys.bad_channels): found as the synthetic probe was damaged, as SpikeInterface's
detect_bad_channels (IBL's method) finds them, and left out of everything downstream."""

from __future__ import annotations

import numpy as np
import pytest

from nwbflow.ephys.bad_channels import LABELS, channel_labels
from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.preprocess import detect_bad_channels, preprocess_to_binary
from nwbflow.ephys.sorting.units import unit_channels
from nwbflow.nwb_io.read import open_session
from nwbflow.params import BadChannelParams, PreprocessParams
from nwbflow.synth import SynthConfig, write_synthetic_session
from nwbflow.synth.ephys import outside_channel_indices

DEAD, NOISY, OUTSIDE = (5, 40), (17, 63), 8
CONFIG = SynthConfig(duration_s=6.0, num_channels=96, num_units=20, ophys=False, common_noise_uv=20.0,
                     dead_channels=DEAD, noisy_channels=NOISY, outside_channels=OUTSIDE)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A 96-channel session with 2 dead, 2 noisy and 8 outside channels, and the shared background (20 µV)
    the channels in the brain carry."""
    path = tmp_path_factory.mktemp("bad") / "damaged.nwb"
    write_synthetic_session(path, CONFIG)
    return path


def _truth(positions: np.ndarray) -> dict[str, list[int]]:
    return {"dead": list(DEAD), "noisy": list(NOISY),
            "outside": outside_channel_indices(CONFIG, positions).tolist()}


def test_bad_channels_are_found_as_the_probe_was_damaged(damaged):
    with open_session(damaged) as session:
        series = session.select_ephys()
        found = detect_bad_channels(series, BadChannelParams(), series.channel_positions_um, seed=0)
        assert found.by_label() == _truth(series.channel_positions_um)
        assert len(found.indices) == 12


def test_the_labels_are_spikeinterfaces(damaged):
    import spikeinterface.preprocessing as spre

    from nwbflow.nwb_io.si_recording import NwbSeriesRecording

    recording = NwbSeriesRecording(damaged, "acquisition/ElectricalSeries")
    try:
        _, theirs = spre.detect_bad_channels(recording, method="coherence+psd", seed=0)
        with open_session(damaged) as session:
            series = session.select_ephys()
            ours = detect_bad_channels(series, BadChannelParams(), series.channel_positions_um, seed=0)
    finally:
        recording.close()
    names = {"good": "good", "dead": "dead", "noise": "noisy", "out": "outside"}
    assert [names[label] for label in theirs] == [LABELS[code] for code in ours.labels]


def test_bad_channels_are_left_out_of_the_reference_and_whitening_and_come_out_as_zeros(damaged, tmp_path):
    with open_session(damaged) as session:
        series = session.select_ephys()
        record = preprocess_to_binary(series, PreprocessParams(), tmp_path / "pre.bin")
        truth = _truth(series.channel_positions_um)
    bad = sorted(c for channels in truth.values() for c in channels)
    assert record.bad_channels == tuple(bad) and record.bad_channel_labels == truth
    traces = record.open().get_traces(0, record.num_samples)
    good = np.setdiff1d(np.arange(96), bad)
    assert not traces[:, bad].any()  # zeros: nothing to detect, localize or sort there
    assert np.all(traces[:, good].std(axis=0) > 0.5)  # whitened good channels, noise sd ~1
    assert not record.whitening[bad].any() and not record.whitening[:, bad].any()
    np.testing.assert_allclose(record.whitening[np.ix_(good, good)] @ record.whitening_inverse[np.ix_(good, good)],
                               np.eye(len(good)), atol=1e-8)


def test_the_common_reference_ignores_bad_channels(tmp_path):
    rng = np.random.default_rng(0)
    traces = rng.normal(0, 10, (30_000, 32)).astype(np.float32)
    traces[:, :3] = rng.normal(0, 200, (30_000, 3))  # 3 noisy channels
    params = PreprocessParams(whiten=False, output_dtype="float32")
    detect = preprocess_to_binary(ArraySource(traces, 30_000.0), params, tmp_path / "a.bin")
    off = params.model_copy(update={"bad_channels": BadChannelParams(detect=False)})
    only_good = preprocess_to_binary(ArraySource(traces[:, 3:].copy(), 30_000.0), off, tmp_path / "b.bin")
    assert detect.bad_channel_labels["noisy"] == [0, 1, 2]
    # The good channels come out as if the bad ones had never been recorded (median over the good only).
    out = detect.open().get_traces(0, 30_000)
    np.testing.assert_allclose(out[:, 3:], only_good.open().get_traces(0, 30_000), atol=1e-4)
    assert not out[:, :3].any()


def test_a_small_probe_or_detection_off_finds_nothing():
    source = ArraySource(np.random.default_rng(1).normal(0, 10, (9000, 8)).astype(np.float32), 30_000.0)
    assert detect_bad_channels(source, BadChannelParams(), None, seed=0) is None
    wide = ArraySource(np.zeros((9000, 32), np.float32), 30_000.0)
    assert detect_bad_channels(wide, BadChannelParams(detect=False), None, seed=0) is None
    brief = ArraySource(np.random.default_rng(1).normal(0, 10, (400, 32)).astype(np.float32), 30_000.0)
    assert detect_bad_channels(brief, BadChannelParams(), None, seed=0) is None  # under two Welch windows


def test_units_never_report_a_bad_channel():
    positions = np.stack([np.zeros(10), np.arange(10) * 20.0], axis=1)
    assert 4 in unit_channels(positions, np.array([4]), 30.0)[0]
    channels = unit_channels(positions, np.array([4, 0]), 30.0, excluded=(3, 5))
    assert channels[0, 0] == 4 and not {3, 5} & set(channels.ravel())  # the next nearest good ones instead


def test_one_window_labels_follow_the_method():
    # Channels carrying the probe's shared signal, one carrying nothing (dead), one with strong white noise
    # (noisy), and the top 4 without the shared signal (outside).
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 5, (9000, 1))  # white: 0.002 µV²/Hz with the channels' own noise, under 0.02
    window = shared + rng.normal(0, 3, (9000, 24))
    window[:, 3] = rng.normal(0, 1, 9000)
    window[:, 10] += rng.normal(0, 40, 9000)  # 0.1 µV²/Hz
    window[:, 20:] = rng.normal(0, 3, (9000, 4))
    labels = channel_labels([window], 30_000.0, None, BadChannelParams())
    assert labels.by_label() == {"dead": [3], "noisy": [10], "outside": [20, 21, 22, 23]}
