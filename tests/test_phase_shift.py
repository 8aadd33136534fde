"""ADC sample-shift correction (nwbflow.ephys.phase_shift): against an analytic ground truth, against
SpikeInterface's phase_shift, inside preprocessing, and read from the electrodes table."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.phase_shift import delay_channels, neuropixels_1_shifts
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.nwb_io.read import open_session
from nwbflow.params import PreprocessParams
from nwbflow.synth import SynthConfig, write_synthetic_session
from nwb_writers import edit_h5

RATE_HZ = 30_000.0


def _tones(num_samples: int, shifts: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, C) float64 µV: 8 tones in 300-6000 Hz, channel c sampled ``shifts[c]`` samples late."""
    rng = np.random.default_rng(seed)
    frequencies, phases = rng.uniform(300, 6000, 8), rng.uniform(0, 2 * np.pi, 8)
    times_s = (np.arange(num_samples)[:, None] + shifts[None, :]) / RATE_HZ
    return sum(20 * np.sin(2 * np.pi * f * times_s + p) for f, p in zip(frequencies, phases))


def test_delaying_each_channel_recovers_samples_taken_on_time():
    shifts = neuropixels_1_shifts(48)
    late, on_time = _tones(30_000, shifts), _tones(30_000, np.zeros(48))
    corrected = delay_channels(torch.from_numpy(late), torch.from_numpy(shifts)).numpy()
    interior = slice(300, -300)  # 10 ms from each end of the window: the margin a caller drops
    # Tones between the samples' grid are not periodic in the window, so the FFT's interpolation is exact
    # only far from its ends; 10 ms in, the error is below 0.2 % of the signal's RMS (~57 µV).
    error = np.abs(corrected[interior] - on_time[interior]).max()
    assert error < 2e-3 * on_time.std(), error
    assert np.abs(late[interior] - on_time[interior]).max() > 50 * error  # the shifts were not negligible


def test_ours_matches_spikeinterfaces_phase_shift():
    from spikeinterface.core import NumpyRecording
    from spikeinterface.preprocessing import phase_shift

    rng = np.random.default_rng(1)
    shifts = neuropixels_1_shifts(24)
    traces = (_tones(60_000, shifts, seed=2) + rng.normal(0, 10, (60_000, 24))).astype(np.float32)
    recording = NumpyRecording(traces, RATE_HZ)
    theirs = phase_shift(recording, inter_sample_shift=shifts).get_traces(start_frame=3000, end_frame=57_000)
    ours = delay_channels(torch.from_numpy(traces).double(), torch.from_numpy(shifts)).numpy()[3000:57_000]
    # Same rotation of the spectrum, on different windows (SpikeInterface: samples 3000-57000 with its 40 ms
    # tapered margin; ours: the whole array, its end-to-end line taken out). With white noise up to Nyquist
    # each window's edge effect decays only as 1/distance: measured, the largest difference is 0.24 µV
    # (0.6 % of the RMS) within 6000 samples of SpikeInterface's window ends and 0.004-0.02 µV in the middle.
    middle = slice(12_000, 42_000)
    assert np.abs(ours[middle] - theirs[middle]).max() < 1e-3 * traces.std()
    assert np.abs(ours - theirs).max() < 1e-2 * traces.std()


def test_preprocessing_undoes_the_shifts_so_the_common_reference_cancels_common_noise(tmp_path):
    rng = np.random.default_rng(3)
    shifts = neuropixels_1_shifts(32)
    own = rng.normal(0, 10, (60_000, 32))
    params = PreprocessParams(whiten=False, output_dtype="float32")

    def residual(traces: np.ndarray, correction: np.ndarray | None) -> float:
        """RMS (µV) of the common-mode signal left after preprocessing: the preprocessed traces minus the
        channels' own noise preprocessed the same way."""
        def run(values, name):
            out = preprocess_to_binary(ArraySource(values.astype(np.float32), RATE_HZ), params, tmp_path / name,
                                       sample_shifts=correction)
            return out.open().get_traces(0, 60_000)
        return float(np.sqrt(np.mean((run(traces, "with.bin") - run(own, "own.bin")) ** 2)))

    staggered = own + _tones(60_000, shifts)  # a 57 µV common-mode signal, read at staggered times
    corrected, left = residual(staggered, shifts), residual(staggered, None)
    off = preprocess_to_binary(ArraySource(staggered.astype(np.float32), RATE_HZ),
                               params.model_copy(update={"adc_phase_shift": False}), tmp_path / "off.bin",
                               sample_shifts=shifts)
    assert off.phase_shifted is False
    assert left > 5 and corrected < left / 20, (left, corrected)


def test_shifts_are_read_from_the_electrodes_table_and_a_bad_column_is_left_out(tmp_path, caplog):
    path = tmp_path / "np.nwb"
    write_synthetic_session(path, SynthConfig(duration_s=1.0, num_channels=32, num_units=3, ophys=False,
                                              adc_shifts=True, common_noise_uv=30.0))
    with open_session(path) as session:
        np.testing.assert_allclose(session.select_ephys().inter_sample_shift, neuropixels_1_shifts(32))
    with edit_h5(path) as handle:
        column = handle["general/extracellular_ephys/electrodes/inter_sample_shift"]
        column[3] = np.nan
    with caplog.at_level(logging.WARNING), open_session(path) as session:
        assert session.select_ephys().inter_sample_shift is None
    assert "inter_sample_shift is not one finite number per row" in caplog.text


def test_a_synthetic_neuropixels_session_is_sampled_at_the_adc_delays(tmp_path):
    plain, staggered = tmp_path / "plain.nwb", tmp_path / "staggered.nwb"
    config = dict(duration_s=1.0, num_channels=32, num_units=3, ophys=False, noise_level_uv=0.0)
    write_synthetic_session(plain, SynthConfig(**config))
    write_synthetic_session(staggered, SynthConfig(**config, adc_shifts=True))
    with open_session(plain) as a, open_session(staggered) as b:
        on_time, late = a.select_ephys().get_traces(0, 30_000), b.select_ephys().get_traces(0, 30_000)
        assert a.select_ephys().inter_sample_shift is None
    shifts = neuropixels_1_shifts(32)
    # Undoing the delays brings the staggered session back to the plain one (to int16 rounding, 0.195 µV).
    undone = delay_channels(torch.from_numpy(late).double(), torch.from_numpy(shifts)).numpy()
    interior = slice(3000, -3000)
    assert np.abs(undone[interior] - on_time[interior]).max() < 1.0
    assert np.abs(late[interior] - on_time[interior]).max() > 5.0


@pytest.mark.parametrize("shifts", [np.full(31, 0.5), np.r_[np.full(31, 0.5), np.nan]])
def test_shifts_that_do_not_fit_the_channels_are_refused(tmp_path, shifts):
    from nwbflow.errors import BadInputError

    with pytest.raises(BadInputError, match="ADC sample shifts must be 32 finite numbers"):
        preprocess_to_binary(ArraySource(np.zeros((3000, 32), np.float32), RATE_HZ), PreprocessParams(whiten=False),
                             tmp_path / "x.bin", sample_shifts=shifts)
