"""Peak kernel: detection rules, localization, chunk boundaries, ground truth vs SpikeInterface."""

from __future__ import annotations

import importlib.util
import logging
import typing

import numpy as np
import pytest
import torch

from nwbflow.ephys import peaks as peaks_module
from nwbflow.ephys.localize import LOCALIZATION_METHODS, monopolar_triangulation
from nwbflow.evaluation import RecordingSource
from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.noise import noise_levels
from nwbflow.ephys.peaks import (DetectionTables, detect_peaks, iter_peaks, localize_center_of_mass,
                                 localize_monopolar_triangulation)
from nwbflow.ephys.preprocess import design_bandpass, preprocess_to_binary
from nwbflow.params import PeakParams, PreprocessParams

FS_HZ = 30_000.0
MATCH_S = 0.4e-3
TWO_ROWS_UM = np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0], [0.0, 100.0]])


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


# ---------------------------------------------------------------- detection rules (synthetic, exact)

def test_locally_exclusive_keeps_the_largest_within_radius_and_sweep(device):
    traces = np.zeros((40, 4), dtype=np.float32)
    traces[10, :3] = [-6.0, -9.0, -7.0]  # one event on three neighbouring channels: channel 1 wins
    traces[12, 0] = -8.5                 # within the sweep (3 samples) and 20 µm of the winner: excluded
    traces[10, 3] = -6.0                 # 60 µm from channel 1 (> 50 µm): its own peak
    traces[30, 0] = -4.0                 # below threshold (5 x noise 1)
    found = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, PeakParams(), noise_levels=np.ones(4), device=device)
    assert found["sample_index"].tolist() == [10, 10]
    assert found["channel_index"].tolist() == [1, 3]
    assert found["amplitude"].tolist() == [-9.0, -6.0]
    assert found["sample_index"].dtype == np.int64 and found["channel_index"].dtype == np.int32
    assert found["amplitude"].dtype == np.float32


def test_ties_go_to_the_earliest_sample_then_the_lowest_channel(device):
    traces = np.zeros((40, 4), dtype=np.float32)
    traces[10:13, 1] = -7.0        # a plateau: the first sample wins
    traces[25, 1:3] = -7.0         # equal on two neighbouring channels: the lower index wins
    found = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, PeakParams(), noise_levels=np.ones(4), device=device)
    assert list(zip(found["sample_index"].tolist(), found["channel_index"].tolist())) == [(10, 1), (25, 1)]


def test_a_tie_is_broken_only_by_a_neighbourhood_maximum(device):
    traces = np.zeros((40, 1), dtype=np.float32)
    traces[[10, 13, 16], 0] = [-8.0, -7.0, -7.0]  # 13 is not a maximum (10 is larger): 16 keeps its peak
    found = detect_peaks(traces, np.zeros((1, 2)), FS_HZ, PeakParams(), np.ones(1), device=device)
    assert found["sample_index"].tolist() == [10, 16]


@pytest.mark.parametrize("peak_sign,expected", [("neg", [5]), ("pos", [20]), ("both", [5, 20])])
def test_polarity(peak_sign, expected, device):
    traces = np.zeros((30, 1), dtype=np.float32)
    traces[5, 0], traces[20, 0] = -10.0, 10.0
    found = detect_peaks(traces, np.zeros((1, 2)), FS_HZ, PeakParams(peak_sign=peak_sign), np.ones(1),
                         device=device)
    assert found["sample_index"].tolist() == expected


def test_threshold_is_per_channel_noise(device):
    traces = np.full((20, 2), 0.0, dtype=np.float32)
    traces[10] = [-6.0, -6.0]
    far_apart = np.array([[0.0, 0.0], [0.0, 500.0]])
    found = detect_peaks(traces, far_apart, FS_HZ, PeakParams(), noise_levels=np.array([1.0, 2.0]), device=device)
    assert found["channel_index"].tolist() == [0]


def test_crossings_are_found_exactly_at_z_equal_one(device):
    # The kernel compares the traces with a per-channel onset instead of computing z = x * scale; the
    # onset must be the exact float32 boundary of z >= 1 as the device rounds it.
    rng = np.random.default_rng(3)
    noise = rng.uniform(0.1, 50.0, 2_000)
    tables = DetectionTables.for_peaks(np.zeros((2_000, 2)), FS_HZ, PeakParams(threshold_mad=4.3), noise, device)
    onset, scale = tables.onset, tables.scale
    below = torch.nextafter(onset, torch.full_like(onset, -np.inf))
    assert bool(torch.all(onset * scale >= 1)) and bool(torch.all(below * scale < 1))


def test_noise_level_is_the_median_absolute_deviation(device):
    rng = np.random.default_rng(4)
    traces = (rng.normal(size=(4_000, 3)) * [1.0, 2.0, 5.0] + 3.0).astype(np.float32)
    got = noise_levels(ArraySource(traces, FS_HZ), chunk_samples=1_000, num_chunks=4, device=device)
    chunks = traces.reshape(4, 1_000, 3)
    expected = np.median(np.median(np.abs(chunks - np.median(chunks, axis=1, keepdims=True)), axis=1), axis=0)
    np.testing.assert_allclose(got, expected / 0.6744897501960817, rtol=1e-6)


def test_center_of_mass_undoes_whitening(device):
    rng = np.random.default_rng(0)
    positions = np.stack([np.tile([0.0, 20.0], 8), np.repeat(np.arange(8) * 20.0, 2)], axis=1)
    filtered = rng.normal(size=(50, 16)).astype(np.float32)
    mixing = rng.normal(size=(16, 16))
    whitening = np.linalg.inv(mixing @ mixing.T + 16 * np.eye(16))
    whitened = (filtered @ whitening.T).astype(np.float32)
    samples, channels = np.arange(50), rng.integers(0, 16, 50)
    expected = localize_center_of_mass(filtered, samples, channels, positions, 45.0, device=device)
    got = localize_center_of_mass(whitened, samples, channels, positions, 45.0,
                                  whitening_inverse=np.linalg.inv(whitening), device=device)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    x_um, y_um = expected
    assert x_um.dtype == np.float32 and np.all((y_um >= 0) & (y_um <= 140))


def test_triangulation_recovers_a_point_source(device):
    # Noise-free footprints of point sources, a / (distance): the fit must land on the source. Center of
    # mass cannot (a convex combination of contacts, pulled toward the peak channel).
    positions = np.stack([np.tile([0.0, 32.0], 16), np.repeat(np.arange(16) * 20.0, 2)], axis=1)
    rng = np.random.default_rng(5)
    sources = np.stack([rng.uniform(-10, 42, 40), rng.uniform(80, 220, 40), rng.uniform(5, 60, 40)], axis=1)
    distance = np.sqrt(((positions[None] - sources[:, None, :2]) ** 2).sum(-1) + sources[:, 2:3] ** 2)
    traces = (-rng.uniform(100, 400, (40, 1)) / distance).astype(np.float32)  # one source per sample
    samples, channels = np.arange(40), np.argmax(np.abs(traces), axis=1)
    x_um, y_um = localize_monopolar_triangulation(traces, samples, channels, positions, 75.0, device=device)
    error_um = np.hypot(x_um - sources[:, 0], y_um - sources[:, 1])
    com = np.stack(localize_center_of_mass(traces, samples, channels, positions, 75.0, device=device), axis=1)
    print(f"point sources: triangulation error max {error_um.max():.3f} µm, center of mass mean "
          f"{np.hypot(*(com - sources[:, :2]).T).mean():.1f} µm")
    assert error_um.max() < 0.5
    assert np.hypot(*(com - sources[:, :2]).T).mean() > 5.0


def test_every_localization_parameter_value_has_a_method():
    assert set(typing.get_args(PeakParams.model_fields["localization"].annotation)) == set(LOCALIZATION_METHODS)


def test_triangulation_respects_its_bounds_and_survives_empty_footprints(device):
    magnitudes = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, 0.0], [1.0, 1.0, 1.0]], device=device)
    positions = torch.tensor([[0.0, 0.0], [0.0, 20.0], [0.0, 40.0]], device=device).expand(3, 3, 2)
    source = monopolar_triangulation(magnitudes, positions, positions[:, 0])
    assert bool(torch.isfinite(source).all())
    assert source[0, :2].tolist() == [0.0, 0.0]  # nothing to fit: the peak channel
    assert bool(((source[:, 2] >= 1.0) & (source[:, 2] <= 100.0)).all())
    assert bool((source[:, 1] >= -30.0).all() & (source[:, 1] <= 70.0).all())


def test_iter_peaks_no_duplicates_or_misses_at_any_chunk_size(device):
    rng = np.random.default_rng(1)
    traces = rng.normal(size=(3_000, 4)).astype(np.float32)
    traces[rng.integers(0, 3_000, 150), rng.integers(0, 4, 150)] -= 12.0  # events everywhere
    traces[[99, 100, 101, 199, 200], 2] = -20.0  # plateaus straddling boundaries of 100-sample chunks
    params = PeakParams(sweep_ms=0.2)
    whole = detect_peaks(traces, TWO_ROWS_UM, FS_HZ, params, noise_levels=np.ones(4), device=device)
    for chunk_samples in (7, 100, 333, 3_000):
        streamed = _concat(list(iter_peaks(ArraySource(traces, FS_HZ), TWO_ROWS_UM, params, noise_levels=np.ones(4),
                                           chunk_samples=chunk_samples, device=device)))
        for key in ("sample_index", "channel_index", "amplitude"):
            np.testing.assert_array_equal(streamed[key], whole[key], err_msg=f"{key} @ {chunk_samples}")


def test_out_of_memory_halves_the_chunk_and_loses_nothing(device, monkeypatch, caplog):
    rng = np.random.default_rng(2)
    traces = rng.normal(size=(4_000, 4)).astype(np.float32)
    traces[rng.integers(0, 4_000, 200), rng.integers(0, 4, 200)] -= 12.0
    source = ArraySource(traces, FS_HZ)
    params = PeakParams(localization="monopolar_triangulation")
    run = dict(noise_levels=np.ones(4), chunk_samples=1_000, device=device)
    expected = list(iter_peaks(source, TWO_ROWS_UM, params, **run))
    window_peaks, sizes = peaks_module._window_peaks, []

    def small_memory(source, start, end, *args):
        sizes.append(end - start)
        if end - start > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return window_peaks(source, start, end, *args)

    monkeypatch.setattr(peaks_module, "_window_peaks", small_memory)
    with caplog.at_level(logging.WARNING, logger="nwbflow.device"):
        got = list(iter_peaks(source, TWO_ROWS_UM, params, **run))
    assert sizes[:3] == [1_000, 500, 250] and max(sizes[3:]) == 250 and "out of memory" in caplog.text
    assert len(got) == len(expected) == 4  # still one batch per chunk, in order
    for key in expected[0]:
        np.testing.assert_allclose(_concat(got)[key], _concat(expected)[key], atol=1e-3, err_msg=key)


# ---------------------------------------------------------------- ground truth (SpikeInterface generator)

@pytest.fixture(scope="module")
def recording_data(tmp_path_factory):
    """20 s, 32 channels, 10 units, 10 µV noise; preprocessed with defaults (float16 binary; device independent)."""
    import spikeinterface.core as si

    recording, sorting = si.generate_ground_truth_recording(
        durations=[20.0], sampling_frequency=FS_HZ, num_channels=32, num_units=10, seed=2205,
        noise_kwargs=dict(noise_levels=10.0, strategy="on_the_fly"))
    binary = tmp_path_factory.mktemp("peaks") / "preprocessed.bin"
    pre = preprocess_to_binary(RecordingSource(recording), PreprocessParams(), binary)
    spikes = sorting.to_spike_vector()
    return dict(recording=recording, pre=pre, binary=binary, positions=recording.get_channel_locations(),
                gt_samples=spikes["sample_index"], gt_units=spikes["unit_index"],
                gt_locations_um=sorting.get_property("gt_unit_locations"))


def _run(gt, localization: str, chunk_samples: int) -> dict[str, np.ndarray]:
    params = gt["params"].model_copy(update={"localization": localization})
    return _concat(list(iter_peaks(gt["pre"].open(), gt["positions"], params,
                                   whitening_inverse=gt["pre"].whitening_inverse, noise_levels=gt["noise"],
                                   chunk_samples=chunk_samples, device=gt["device"])))


@pytest.fixture(scope="module")
def ground_truth(recording_data, device):
    """Our peaks on the ground-truth recording, located by center of mass and by triangulation."""
    gt = dict(recording_data, params=PeakParams(), device=device)
    gt["noise"] = noise_levels(gt["pre"].open(), chunk_samples=30_000, device=device)
    gt["ours"] = _run(gt, "center_of_mass", 30_000)
    gt["triangulated"] = _run(gt, "monopolar_triangulation", 30_000)
    return gt


def _spikeinterface_peaks(gt) -> np.ndarray:
    """SpikeInterface 0.105 locally exclusive detection on our preprocessed binary, same thresholds."""
    import spikeinterface.core as si
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks as si_detect_peaks

    data = np.fromfile(gt["binary"], dtype=gt["pre"].dtype).astype(np.float32).reshape(-1, 32)
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
    from scipy import signal

    templates = gt["recording"].templates  # (units, samples, channels), µV
    sos = design_bandpass(300.0, 6000.0, FS_HZ, order=3)
    filtered = signal.sosfiltfilt(sos, np.pad(templates, ((0, 0), (500, 500), (0, 0))), axis=1)
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


def _location_errors(gt, peaks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per matched peak: distance (µm, probe plane) to its unit's true location, and the unit; per-unit counts."""
    order = np.argsort(gt["gt_samples"])
    distance, nearest = _nearest_distance(gt["gt_samples"][order], peaks["sample_index"])
    matched = distance <= int(round(MATCH_S * FS_HZ))
    units = gt["gt_units"][order][nearest][matched]
    error_um = np.hypot(peaks["x_um"][matched] - gt["gt_locations_um"][units, 0],
                        peaks["y_um"][matched] - gt["gt_locations_um"][units, 1])
    return error_um, units, np.bincount(units, minlength=10)


def test_center_of_mass_is_near_the_true_unit_location(ground_truth):
    # Center of mass is a convex combination of contacts within 75 µm of the peak channel (20 µm
    # pitch), so it cannot leave the probe's footprint (units sit up to 10 µm past its ends and
    # 5-50 µm off its plane) and is pulled toward the peak channel: about 1.5 pitch = 30 µm.
    error_um, units, counts = _location_errors(ground_truth, ground_truth["ours"])
    mean_error_um = np.bincount(units, weights=error_um, minlength=10) / np.maximum(counts, 1)
    print(f"mean COM error per unit (µm): {np.round(mean_error_um, 1)}")
    assert np.all(mean_error_um[counts >= 20] < 30.0)
    assert np.mean(error_um) < 15.0


def test_triangulation_is_nearer_the_true_unit_location_than_center_of_mass(ground_truth):
    # Measured (CPU, 3038 peaks): mean error 7.3 µm triangulated vs 10.3 µm center of mass; worst unit
    # 11.1 vs 24.5 µm. Triangulation is not exact here: the generator's footprints decay as
    # exp(-r / 10-45 µm) over an ellipsoid distance, not as 1 / r, and whitening noise adds |noise|
    # to far channels. Bounds leave ~1 µm (mean) and ~4 µm (per unit) of slack.
    com_um, _, _ = _location_errors(ground_truth, ground_truth["ours"])
    error_um, units, counts = _location_errors(ground_truth, ground_truth["triangulated"])
    mean_error_um = np.bincount(units, weights=error_um, minlength=10) / np.maximum(counts, 1)
    print(f"mean error (µm): triangulation {np.mean(error_um):.2f}, center of mass {np.mean(com_um):.2f}; "
          f"per unit {np.round(mean_error_um, 1)}")
    assert np.mean(error_um) < np.mean(com_um) - 2.0
    assert np.mean(error_um) < 8.5
    assert np.all(mean_error_um[counts >= 20] < 15.0)


def test_same_peaks_with_two_chunk_sizes(ground_truth):
    gt = ground_truth
    for localization, reference in (("center_of_mass", gt["ours"]), ("monopolar_triangulation", gt["triangulated"])):
        other = _run(gt, localization, 7_919)
        for key in ("sample_index", "channel_index", "amplitude"):
            np.testing.assert_array_equal(other[key], reference[key], err_msg=key)
        for key in ("x_um", "y_um"):  # same arithmetic per peak, batched differently: equal to rounding
            np.testing.assert_allclose(other[key], reference[key], atol=1e-2, err_msg=f"{localization} {key}")
