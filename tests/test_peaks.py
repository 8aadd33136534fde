"""Peak kernel: detection rules, localization, chunk boundaries, ground truth vs SpikeInterface."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from nwbflow.ephys.peaks import detect_peaks, iter_peaks, localize_center_of_mass, noise_mad
from nwbflow.ephys.preprocess import design_bandpass, preprocess_to_binary, zero_phase_filter
from nwbflow.params import PeakParams, PreprocessParams

FS_HZ = 30_000.0
MATCH_S = 0.4e-3
TWO_ROWS_UM = np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0], [0.0, 100.0]])


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


# ---------------------------------------------------------------- detection rules (synthetic, exact)

def test_locally_exclusive_keeps_the_largest_within_radius_and_sweep():
    traces = np.zeros((40, 4), dtype=np.float32)
    traces[10, :3] = [-6.0, -9.0, -7.0]  # one event on three neighbouring channels: channel 1 wins
    traces[12, 0] = -8.5                 # within the sweep (3 samples) and 20 µm of the winner: excluded
    traces[10, 3] = -6.0                 # 60 µm from channel 1 (> 50 µm): its own peak
    traces[30, 0] = -4.0                 # below threshold (5 x noise 1)
    found = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, PeakParams(), noise_levels=np.ones(4))
    assert found["sample_index"].tolist() == [10, 10]
    assert found["channel_index"].tolist() == [1, 3]
    assert found["amplitude"].tolist() == [-9.0, -6.0]
    assert found["sample_index"].dtype == np.int64 and found["channel_index"].dtype == np.int32


def test_ties_go_to_the_earliest_sample_then_the_lowest_channel():
    traces = np.zeros((40, 4), dtype=np.float32)
    traces[10:13, 1] = -7.0        # a plateau: the first sample wins
    traces[25, 1:3] = -7.0         # equal on two neighbouring channels: the lower index wins
    found = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, PeakParams(), noise_levels=np.ones(4))
    assert list(zip(found["sample_index"].tolist(), found["channel_index"].tolist())) == [(10, 1), (25, 1)]


@pytest.mark.parametrize("peak_sign,expected", [("neg", [5]), ("pos", [20]), ("both", [5, 20])])
def test_polarity(peak_sign, expected):
    traces = np.zeros((30, 1), dtype=np.float32)
    traces[5, 0], traces[20, 0] = -10.0, 10.0
    found = detect_peaks(traces, np.zeros((1, 2)), FS_HZ, PeakParams(peak_sign=peak_sign), np.ones(1))
    assert found["sample_index"].tolist() == expected


def test_threshold_is_per_channel_noise():
    traces = np.full((20, 2), 0.0, dtype=np.float32)
    traces[10] = [-6.0, -6.0]
    far_apart = np.array([[0.0, 0.0], [0.0, 500.0]])
    found = detect_peaks(traces, far_apart, FS_HZ, PeakParams(), noise_levels=np.array([1.0, 2.0]))
    assert found["channel_index"].tolist() == [0]


def test_center_of_mass_undoes_whitening():
    rng = np.random.default_rng(0)
    positions = np.stack([np.tile([0.0, 20.0], 8), np.repeat(np.arange(8) * 20.0, 2)], axis=1)
    filtered = rng.normal(size=(50, 16)).astype(np.float32)
    mixing = rng.normal(size=(16, 16))
    whitening = np.linalg.inv(mixing @ mixing.T + 16 * np.eye(16))
    whitened = (filtered @ whitening.T).astype(np.float32)
    samples, channels = np.arange(50), rng.integers(0, 16, 50)
    expected = localize_center_of_mass(filtered, samples, channels, positions, 45.0)
    got = localize_center_of_mass(whitened, samples, channels, positions, 45.0,
                                  whitening_inverse=np.linalg.inv(whitening))
    np.testing.assert_allclose(got, expected, atol=1e-3)
    x_um, y_um = expected
    assert x_um.dtype == np.float32 and np.all((y_um >= 0) & (y_um <= 140))


def test_iter_peaks_no_duplicates_or_misses_at_any_chunk_size(tmp_path):
    rng = np.random.default_rng(1)
    traces = rng.normal(size=(3_000, 4)).astype(np.float32)
    traces[rng.integers(0, 3_000, 150), rng.integers(0, 4, 150)] -= 12.0  # events everywhere
    traces[[99, 100, 101, 199, 200], 2] = -20.0  # plateaus straddling boundaries of 100-sample chunks
    path = tmp_path / "traces.bin"
    traces.tofile(path)
    params = PeakParams(sweep_ms=0.2)
    whole = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, params, noise_levels=np.ones(4))
    for chunk_samples in (7, 100, 333, 3_000):
        streamed = _concat(list(iter_peaks(path, 4, TWO_ROWS_UM, FS_HZ, params, noise_levels=np.ones(4),
                                           chunk_samples=chunk_samples)))
        for key in ("sample_index", "channel_index", "amplitude"):
            np.testing.assert_array_equal(streamed[key], whole[key], err_msg=f"{key} @ {chunk_samples}")


# ---------------------------------------------------------------- ground truth (SpikeInterface generator)

class RecordingSource:
    """A SpikeInterface recording as a TraceSource (gains are 1: values are µV)."""

    def __init__(self, recording):
        self._recording = recording
        self.num_samples = recording.get_num_samples()
        self.num_channels = recording.get_num_channels()
        self.sampling_rate_hz = recording.sampling_frequency

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        return self._recording.get_traces(start_frame=start_sample, end_frame=end_sample).astype(np.float32)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """20 s, 32 channels, 10 units, 10 µV noise; preprocessed with defaults; our peaks and SpikeInterface's."""
    import spikeinterface.core as si

    recording, sorting = si.generate_ground_truth_recording(
        durations=[20.0], sampling_frequency=FS_HZ, num_channels=32, num_units=10, seed=2205,
        noise_kwargs=dict(noise_levels=10.0, strategy="on_the_fly"))
    binary = tmp_path_factory.mktemp("peaks") / "preprocessed.bin"
    pre = preprocess_to_binary(RecordingSource(recording), PreprocessParams(), binary)
    positions = recording.get_channel_locations()
    params = PeakParams()
    noise = noise_mad(binary, 32, chunk_samples=30_000)
    ours = _concat(list(iter_peaks(binary, 32, positions, FS_HZ, params, whitening_inverse=pre.whitening_inverse,
                                   noise_levels=noise, chunk_samples=30_000)))
    spikes = sorting.to_spike_vector()
    return dict(recording=recording, pre=pre, binary=binary, positions=positions, params=params, noise=noise,
                ours=ours, gt_samples=spikes["sample_index"], gt_units=spikes["unit_index"],
                gt_locations_um=sorting.get_property("gt_unit_locations"))


def _spikeinterface_peaks(gt) -> np.ndarray:
    """SpikeInterface 0.105 locally exclusive detection on our preprocessed binary, same thresholds."""
    import spikeinterface.core as si
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks as si_detect_peaks

    data = np.memmap(gt["binary"], dtype=np.float32, mode="r", shape=(gt["pre"].num_samples, 32))
    recording = si.NumpyRecording([data], sampling_frequency=FS_HZ)
    recording.set_probe(gt["recording"].get_probe())
    params = gt["params"]
    kwargs = dict(peak_sign=params.peak_sign, detect_threshold=params.threshold_mad,
                  exclude_sweep_ms=params.sweep_ms, radius_um=params.exclusion_radius_um, noise_levels=gt["noise"])
    method = "locally_exclusive" if importlib.util.find_spec("numba") else "locally_exclusive_torch"
    if method.endswith("torch"):
        kwargs["device"] = "cpu"
    return si_detect_peaks(recording, method=method, method_kwargs=kwargs,
                           job_kwargs=dict(n_jobs=1, chunk_duration="1s", progress_bar=False))["sample_index"]


def _nearest_distance(sorted_reference: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query, |distance| to and index of the nearest element of a sorted reference array."""
    right = np.clip(np.searchsorted(sorted_reference, queries), 1, len(sorted_reference) - 1)
    left = right - 1
    nearest = np.where(np.abs(sorted_reference[right] - queries) < np.abs(sorted_reference[left] - queries),
                       right, left)
    return np.abs(sorted_reference[nearest] - queries), nearest


def _detectable_units(gt) -> np.ndarray:
    """Units whose template, band-passed and whitened like the data, peaks beyond the threshold (MAD units)."""
    templates = gt["recording"].templates  # (units, samples, channels), µV
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    pad = ((0, 0), (500, 500), (0, 0))
    filtered = np.stack([zero_phase_filter(t, sos) for t in np.pad(templates, pad)])
    whitened = filtered @ gt["pre"].whitening.T
    snr_mad = np.max(-whitened / gt["noise"], axis=(1, 2))
    return np.nonzero(snr_mad >= gt["params"].threshold_mad)[0]


def _recall_precision(gt, detected_samples: np.ndarray) -> tuple[float, float]:
    """Recall of spikes of detectable units; precision = detected peaks within ±0.4 ms of any spike."""
    tolerance = int(round(MATCH_S * FS_HZ))
    detected = np.sort(detected_samples)
    wanted = gt["gt_samples"][np.isin(gt["gt_units"], _detectable_units(gt))]
    recall = np.mean(_nearest_distance(detected, wanted)[0] <= tolerance)
    precision = np.mean(_nearest_distance(np.sort(gt["gt_samples"]), detected)[0] <= tolerance)
    return float(recall), float(precision)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SpikeInterface torch detector vs numpy 2
def test_recall_and_precision_match_spikeinterface(ground_truth):
    ours = _recall_precision(ground_truth, ground_truth["ours"]["sample_index"])
    theirs = _recall_precision(ground_truth, _spikeinterface_peaks(ground_truth))
    print(f"recall/precision ours {ours}, SpikeInterface {theirs}")
    assert ours[0] >= theirs[0] - 0.01
    assert ours[1] >= theirs[1] - 0.01
    assert ours[0] > 0.9 and ours[1] > 0.95


def test_center_of_mass_is_near_the_true_unit_location(ground_truth):
    # Center of mass is a convex combination of contacts within 75 µm of the peak channel (20 µm
    # pitch), so it cannot leave the probe's footprint (units sit up to 10 µm past its ends and
    # 5-50 µm off its plane) and is pulled toward the peak channel: about 1.5 pitch = 30 µm.
    gt, peaks = ground_truth, ground_truth["ours"]
    order = np.argsort(gt["gt_samples"])
    distance, nearest = _nearest_distance(gt["gt_samples"][order], peaks["sample_index"])
    matched = distance <= int(round(MATCH_S * FS_HZ))
    units = gt["gt_units"][order][nearest][matched]
    error_um = np.hypot(peaks["x_um"][matched] - gt["gt_locations_um"][units, 0],
                        peaks["y_um"][matched] - gt["gt_locations_um"][units, 1])
    counts = np.bincount(units, minlength=10)
    mean_error_um = np.bincount(units, weights=error_um, minlength=10) / np.maximum(counts, 1)
    print(f"mean COM error per unit (µm): {np.round(mean_error_um, 1)}")
    assert np.all(mean_error_um[counts >= 20] < 30.0)
    assert np.mean(error_um) < 15.0


def test_same_peaks_with_two_chunk_sizes(ground_truth):
    gt = ground_truth
    other = _concat(list(iter_peaks(gt["binary"], 32, gt["positions"], FS_HZ, gt["params"],
                                    whitening_inverse=gt["pre"].whitening_inverse, noise_levels=gt["noise"],
                                    chunk_samples=7_919)))
    for key in ("sample_index", "channel_index", "amplitude"):
        np.testing.assert_array_equal(other[key], gt["ours"][key], err_msg=key)
    for key in ("x_um", "y_um"):  # same arithmetic, batched differently: equal to rounding
        np.testing.assert_allclose(other[key], gt["ours"][key], atol=1e-3, err_msg=key)
