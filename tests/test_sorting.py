"""Our sorter: its pieces against brute force / SpikeInterface, and ground-truth accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.sorting.clustering import cluster_features, dip_split
from nwbflow.ephys.sorting.features import _Reservoir
from nwbflow.ephys.sorting.matching import match_recording, score_noise_levels
from nwbflow.ephys.sorting.sorter import sort_traces
from nwbflow.ephys.sorting.templates import Templates
from nwbflow.ephys.sorting.traces import ScaledSource
from nwbflow.ephys.sorting.units import UnitWaveforms, quality_metrics, values_at
from nwbflow.errors import BadInputError
from nwbflow.params import PreprocessParams, SortingParams

FS = 30_000.0


def _templates(num_units: int, num_channels: int, width: int = 31, rank: int = 4, seed: int = 0) -> Templates:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, rank, generator=generator))[0]
    return Templates(basis, torch.randn(num_units, num_channels, rank, generator=generator) * 4, width // 3)


def test_cross_products_equal_brute_force_shifted_inner_products():
    templates = _templates(3, 5, width=9, rank=3)
    dense, products = templates.dense().double(), templates.cross_products().double()
    width = templates.width
    for j in range(3):
        for k in range(3):
            for lag in range(-(width - 1), width):
                expected = sum(float((dense[j, t] * dense[k, t + lag]).sum()) for t in range(width)
                               if 0 <= t + lag < width)
                assert products[j, k, lag + width - 1].item() == pytest.approx(expected, abs=1e-4)


def _white_noise_levels(templates: Templates) -> torch.Tensor:
    """Each template's matched-filter output SD on unit white noise: its norm."""
    return templates.squared_norms().sqrt()


def test_score_noise_levels_measure_correlated_noise_and_skip_spikes():
    # Noise correlated in time (an FIR) and across channels (a mixing matrix), as band-passed noise
    # whitened on spiking data is; the output SD of W on it is the norm of W mixed back and
    # convolved with the FIR, not ||W||. Large spikes (12 noise SD, 20 Hz) must not count.
    rng = np.random.default_rng(5)
    templates = _templates(4, 6, seed=5)
    fir = np.array([0.5, 1.0, 0.6, -0.3, -0.4])
    mixing = np.eye(6) + 0.4 * rng.normal(size=(6, 6))
    white = rng.normal(size=(400_000, 6))
    colored = np.stack([np.convolve(white[:, c], fir, mode="same") for c in range(6)], axis=1) @ mixing.T
    scales = 1.0 / colored.std(axis=0)
    noise = colored * scales
    expected = []
    for w in templates.dense().double().numpy():  # (T, C): score = sum_t,c w[t,c] x[t,c]; x = scale * (fir * n) M^T
        mixed = (w * scales) @ mixing  # weights on the white noise's channels
        equivalent = np.stack([np.convolve(mixed[:, d], fir[::-1]) for d in range(6)], axis=1)
        expected.append(np.sqrt((equivalent ** 2).sum()))
    traces = noise.copy()
    dense = templates.dense().numpy()
    for time in rng.choice(np.arange(100, len(traces) - 100), 400_000 // 1500, replace=False):
        traces[time:time + templates.width] += 12.0 * dense[rng.integers(4)] / np.abs(dense).max()
    scaled = ScaledSource(ArraySource(traces.astype(np.float32), FS), np.ones(6), torch.device("cpu"))
    measured = score_noise_levels(scaled.sample(chunk_samples=40_000, num_chunks=5, seed=0), templates).numpy()
    # 5 chunks of 40 000 scores, correlated over ~35 lags: ~5 700 independent, SD error ~1 %; 4 % is 4 sigma.
    np.testing.assert_allclose(measured, expected, rtol=0.04)
    assert np.max(np.abs(_white_noise_levels(templates).numpy() / expected - 1)) > 0.1  # ||W|| would be wrong


@pytest.mark.parametrize("passes, expected", [(1, 1), (4, 2)])
def test_matching_subtracts_and_finds_a_spike_hidden_under_a_larger_one(device, passes, expected):
    templates = _templates(2, 6)
    dense = templates.dense()
    traces = torch.zeros(2000, 6)
    start = 1000 - templates.before
    traces[start:start + templates.width] += 2.0 * dense[0]          # a large spike of unit 0 at 1000
    traces[start + 6:start + 6 + templates.width] += 0.9 * dense[1]  # unit 1, 6 samples later, overlapping
    source = ArraySource(traces.numpy(), FS)
    scaled = ScaledSource(source, np.ones(6), torch.device(device))
    found = match_recording(scaled, Templates(templates.basis.to(device), templates.spatial.to(device),
                                              templates.before), threshold=5.0, passes=passes,
                            chunk_samples=700, score_noise=_white_noise_levels(templates).to(device))
    assert len(found.samples) == expected
    assert found.samples[0] in (1000, 1006)
    if expected == 2:
        order = np.argsort(found.units)
        assert found.units[order].tolist() == [0, 1]
        assert found.samples[order].tolist() == [1000, 1006]
        # Greedy amplitudes of overlapping spikes are biased (1.93 here); one refit sweep brings them within 1 %.
        np.testing.assert_allclose(found.amplitudes[order], [2.0, 0.9], rtol=0.01)


def test_matching_refuses_a_half_size_copy_of_a_template_but_takes_a_smaller_spike_in_range():
    # Both are far above threshold (score 0.5 ||W||^2 = 0.5 x ~18 noise SD); only the scaling differs.
    from nwbflow.ephys.sorting.matching import AMPLITUDE_RANGE

    templates = _templates(1, 6)
    dense = templates.dense()
    traces = torch.zeros(3000, 6)
    for centre, scale in ((1000, 0.5), (2000, 0.7)):
        traces[centre - templates.before:centre - templates.before + templates.width] += scale * dense[0]
    scaled = ScaledSource(ArraySource(traces.numpy(), FS), np.ones(6), torch.device("cpu"))
    found = match_recording(scaled, templates, threshold=5.0, passes=2, chunk_samples=3000,
                            score_noise=_white_noise_levels(templates))
    assert AMPLITUDE_RANGE[0] > 0.5
    assert found.samples.tolist() == [2000]
    np.testing.assert_allclose(found.amplitudes, [0.7], rtol=0.01)


def test_matching_is_the_same_whatever_the_chunking():
    rng = np.random.default_rng(3)
    templates = _templates(3, 8, seed=3)
    dense = templates.dense().numpy()
    traces = rng.normal(size=(20_000, 8)).astype(np.float32)
    times = np.sort(rng.choice(np.arange(50, 19_900), 120, replace=False))
    for time, unit in zip(times, rng.integers(0, 3, len(times))):
        traces[time - templates.before:time - templates.before + templates.width] += dense[unit]
    scaled = ScaledSource(ArraySource(traces, FS), np.ones(8), torch.device("cpu"))
    runs = [match_recording(scaled, templates, 6.0, 4, chunk, _white_noise_levels(templates))
            for chunk in (20_000, 1_777, 5_000)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.samples, runs[0].samples)
        np.testing.assert_array_equal(run.units, runs[0].units)
    recall = np.mean([np.min(np.abs(runs[0].samples - t)) <= 1 for t in times])
    assert recall > 0.9


def test_dip_split_tells_two_populations_from_one():
    rng = np.random.default_rng(0)
    one = torch.as_tensor(rng.normal(size=2000))
    two = torch.as_tensor(np.concatenate([rng.normal(-4, 1, 1000), rng.normal(4, 1, 1000)]))
    assert dip_split(one, -1.0, 1.0)[0] < 0.3
    score, cut = dip_split(two, -4.0, 4.0)
    assert score > 0.9 and abs(cut) < 1.0


def test_clustering_recovers_three_gaussian_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=np.float64)
    truth = np.repeat(np.arange(3), 300)
    points = torch.as_tensor(centres[truth] + rng.normal(size=(900, 4)), dtype=torch.float32)
    labels = cluster_features(points, min_cluster_spikes=20, bimodality_threshold=0.5, seed=0).numpy()
    assert len(np.unique(labels[labels >= 0])) == 3
    purity = sum(np.bincount(labels[truth == k][labels[truth == k] >= 0]).max() for k in range(3)) / 900
    assert purity > 0.97


def test_clustering_subset_is_bounded_per_channel():
    reservoir = _Reservoir(cap=50, num_channels=2, seed=0)
    for batch in range(40):
        channels = np.arange(100) % 2
        reservoir.add(np.arange(100) + 100 * batch, channels, np.zeros((100, 1, 1), np.float32))
    subset = reservoir.subset()
    assert subset.detected == 4000
    assert np.bincount(subset.channels).tolist() == [50, 50]
    assert np.all(np.diff(subset.samples) > 0)
    assert subset.samples.min() < 1000 and subset.samples.max() > 3000  # drawn from the whole recording


def test_quality_metrics_equal_spikeinterface_definitions():
    from spikeinterface.metrics.quality.misc_metrics import isi_violations, presence_ratio

    rng = np.random.default_rng(2)
    num_samples = int(150 * FS)
    trains = [np.sort(rng.choice(num_samples, n, replace=False)) for n in (300, 1500)]
    samples = np.concatenate(trains)
    units = np.repeat([0, 1], [300, 1500])
    order = np.argsort(samples, kind="stable")
    samples, units = samples[order], units[order]
    waveforms = UnitWaveforms(np.zeros((2, 5, 3), np.float32), np.zeros((2, 5, 3), np.float32),
                              np.array([0, 2]), np.array([-50.0, -80.0]))
    metrics = quality_metrics(samples, units, 2, num_samples, FS, np.full(len(samples), -40.0), waveforms,
                              np.array([10.0, 1.0, 20.0]), refractory_ms=1.5, presence_bin_s=60.0)
    edges = np.arange(0, num_samples // int(60 * FS) * int(60 * FS) + 1, int(60 * FS))
    for unit, train in enumerate(trains):
        assert metrics["firing_rate"][unit] == pytest.approx(len(train) / 150.0)
        ratio, _, _ = isi_violations([train / FS], 150.0, isi_threshold_s=0.0015)
        assert metrics["isi_violations_ratio"][unit] == pytest.approx(ratio)
        assert metrics["presence_ratio"][unit] == pytest.approx(presence_ratio(train, bin_edges=edges))
    np.testing.assert_allclose(metrics["snr"], [5.0, 4.0])
    np.testing.assert_allclose(metrics["amplitude_median"], [-40.0, -40.0])


def test_a_silent_recording_gives_no_units_and_says_why():
    source = ArraySource(np.random.default_rng(0).normal(size=(int(2 * FS), 4)).astype(np.float32), FS)
    result = sort_traces(source, np.array([[0, 0], [0, 20], [0, 40], [0, 60]], dtype=float), SortingParams())
    assert result.num_units == 0 and len(result.spike_samples) == 0
    assert "crossed the sorting threshold" in result.nothing_found


def test_sorting_refuses_positions_that_do_not_match_the_channels():
    source = ArraySource(np.zeros((100, 4), np.float32), FS)
    with pytest.raises(BadInputError, match="channel_positions_um"):
        sort_traces(source, np.zeros((3, 2)), SortingParams())


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """SpikeInterface ground truth (32 channels, 60 s, 10 units, seeded), preprocessed by our stage."""
    import spikeinterface.core as sc

    from nwbflow.ephys.preprocess import preprocess_to_binary
    from nwbflow.evaluation import RecordingSource

    recording, truth = sc.generate_ground_truth_recording(
        durations=[60.0], sampling_frequency=FS, num_channels=32, num_units=10, seed=1,
        generate_probe_kwargs={"num_columns": 2, "xpitch": 20, "ypitch": 20, "contact_shapes": "circle",
                               "contact_shape_params": {"radius": 6}})
    positions = recording.get_channel_locations()
    out = tmp_path_factory.mktemp("sorting") / "preprocessed.bin"
    result = preprocess_to_binary(RecordingSource(recording), PreprocessParams(), out,
                                  channel_positions_um=positions)
    return result.open(), positions, truth


def test_sorting_recovers_ground_truth_units(ground_truth, device):
    """At least 8 of 10 units with accuracy >= 0.8 (SpikeInterface's comparison, 0.4 ms tolerance).

    The issue's bar; on this seed every unit is above threshold (peak >= 4.4 noise SDs on the
    whitened traces) and all 10 are found on the CPU (measured: 10/10, no false-positive unit; one,
    a template built from spike fragments, before misaligned units were dropped).
    """
    import spikeinterface.core as sc
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    source, positions, truth = ground_truth
    result = sort_traces(source, positions, SortingParams(), device=device)
    sorting = sc.NumpySorting.from_samples_and_labels([result.spike_samples], [result.spike_units], FS)
    comparison = compare_sorter_to_ground_truth(truth, sorting, exhaustive_gt=True)
    assert len(comparison.get_well_detected_units(well_detected_score=0.8)) >= 8
    assert comparison.count_false_positive_units() <= 1
    assert result.templates.shape[1:] == (61, 32) and len(result.template_units) == len(result.templates)


def test_an_uninstalled_spikeinterface_sorter_is_refused_clearly(monkeypatch, tmp_path):
    from nwbflow.ephys.sorting import registry

    monkeypatch.setattr(registry, "installed", lambda: ["nwbflow", "simple"])
    with pytest.raises(BadInputError, match="'kilosort4' is not installed here.*installed: nwbflow, simple"):
        registry.SORTERS["kilosort4"].run(None, SortingParams(sorter="kilosort4"), tmp_path)


def test_the_sorter_parameter_accepts_exactly_the_registry():
    from pydantic import ValidationError

    from nwbflow.ephys.sorting.registry import SORTERS

    assert SortingParams.model_json_schema()["properties"]["sorter"]["enum"] == list(SORTERS)
    with pytest.raises(ValidationError):
        SortingParams(sorter="kilosort2")


def test_values_at_reads_each_spike_value_in_blocks():
    rng = np.random.default_rng(6)
    traces = rng.normal(size=(100_000, 5)).astype(np.float32)
    samples = np.sort(rng.choice(100_000, 500, replace=False))
    channels = rng.integers(0, 5, 500)
    reads = []

    class Counting(ArraySource):
        def get_traces(self, start_sample, end_sample):
            reads.append((start_sample, end_sample))
            return super().get_traces(start_sample, end_sample)

    np.testing.assert_array_equal(values_at(Counting(traces, FS), samples, channels), traces[samples, channels])
    assert len(reads) <= 4  # windows of 30 000 samples, not one read per spike


def test_satellite_units_are_copies_of_larger_units_at_a_fixed_lag():
    from nwbflow.ephys.sorting.curation import satellite_units

    rng = np.random.default_rng(4)
    big = np.sort(rng.choice(3_000_000, 1_500, replace=False))
    independent = np.sort(rng.choice(3_000_000, 800, replace=False))  # small, fires on its own
    echo = np.sort(rng.choice(big, 600, replace=False) + 17 + rng.integers(-1, 2, 600))  # 17 samples after big
    # Half at its own times, half locked: not a satellite (below SATELLITE_FRACTION).
    mixed = np.sort(np.concatenate([rng.choice(3_000_000, 500, replace=False), rng.choice(big, 300) - 9]))
    samples = np.concatenate([big, independent, echo, mixed])
    units = np.repeat(np.arange(4), [len(big), len(independent), len(echo), len(mixed)])
    order = np.argsort(samples, kind="stable")
    sizes = np.array([20.0, 3.0, 3.0, 3.0])
    assert satellite_units(samples[order], units[order], sizes, width=61).tolist() == [False, False, True, False]
    # A copy as large as its parent is not a satellite (size ratio below 2): the test can fail.
    assert not satellite_units(samples[order], units[order], np.array([20.0, 3.0, 15.0, 3.0]), width=61)[2]


def test_misaligned_units_have_their_template_trough_away_from_the_detection_sample():
    from nwbflow.ephys.sorting.curation import misaligned_units

    before, width, channels = 20, 61, 4
    t = np.arange(width)[:, None]

    def spike(trough: int, sign: float = -1.0) -> np.ndarray:
        trough_phase = np.exp(-0.5 * ((t - trough) / 3.0) ** 2)
        repolarisation = 0.3 * np.exp(-0.5 * ((t - trough - 12) / 6.0) ** 2)
        return sign * (trough_phase - repolarisation) * np.array([1.0, 0.6, 0.3, 0.1])[None, :channels]

    templates = np.stack([
        spike(before),                      # unit 0: trough on the detection sample
        spike(before + 2),                  # unit 1: 2 samples late (0.07 ms), within the jitter
        spike(before + 6),                  # unit 2: 0.2 ms late, a fragment
        spike(before + 15, sign=1.0) * 3,   # unit 3's largest template: positive, its trough elsewhere
        spike(before) * 0.5,                # unit 3's smaller template, aligned: the largest decides
    ]).astype(np.float32)
    misaligned = misaligned_units(templates, np.array([0, 1, 2, 3, 3]), 5, before, FS)
    assert misaligned.tolist() == [False, False, True, True, False]  # unit 4 has no template: not flagged


def _drift_split_pair(num_samples: int, seed: int, independent: bool):
    """Two whitened templates of one footprint 8 µm apart (a neuron's two ends of a residual drift), W^-1, and
    their matches: one neuron's spikes shared between them by time (refractory across the pair), or, with
    ``independent``, two Poisson trains (no refractory dip between them)."""
    from nwbflow.ephys.sorting.matching import Matches
    from nwbflow.ephys.sorting.templates import Templates

    depth = 20.0 * np.arange(12)
    covariance = np.exp(-np.abs(depth[:, None] - depth[None, :]) / 100.0) + 1e-3 * np.eye(12)  # shared noise
    values, vectors = np.linalg.eigh(covariance)
    whitening, inverse = (vectors * values ** -0.5) @ vectors.T, (vectors * values ** 0.5) @ vectors.T
    footprints = np.stack([np.exp(-0.5 * ((depth - centre) / 15.0) ** 2) for centre in (110.0, 118.0)])
    basis = torch.tensor(np.hanning(20)[:, None] / np.linalg.norm(np.hanning(20)), dtype=torch.float32)
    spatial = torch.tensor((footprints @ whitening.T)[:, :, None], dtype=torch.float32)
    templates = Templates(basis, spatial, before=10)
    rng = np.random.default_rng(seed)
    if independent:
        trains = [np.sort(rng.choice(num_samples, 400, replace=False)) for _ in range(2)]
    else:  # one neuron, 2 ms apart at least, its spikes on one template or the other by the drift's phase
        times = np.cumsum(rng.integers(60, 2 * num_samples // 800, 800))
        times = times[times < num_samples]
        phase = (times // (num_samples // 6)) % 2
        trains = [times[phase == 0], times[phase == 1]]
    samples = np.concatenate(trains)
    units = np.concatenate([np.full(len(t), k) for k, t in enumerate(trains)])
    order = np.argsort(samples)
    return templates, inverse, Matches(samples[order], units[order], np.ones(len(samples), np.float32))


@pytest.mark.parametrize("independent", [False, True])
def test_a_drift_split_neuron_is_merged_on_the_filtered_scale_two_neurons_are_not(independent):
    from nwbflow.ephys.sorting.curation import merge_oversplit_units
    from nwbflow.ephys.sorting.templates import similarity

    num_samples = 30000 * 60
    templates, inverse, matches = _drift_split_pair(num_samples, seed=3, independent=independent)
    filtered = templates.unwhitened(np.ones(12), inverse)
    assert float(similarity(templates, 2)[0, 1]) < 0.9 < float(similarity(filtered, 2)[0, 1])
    params = SortingParams()
    _, whitened_units = merge_oversplit_units(matches, templates, params, 30000.0, num_samples, 2)
    _, filtered_units = merge_oversplit_units(matches, templates, params, 30000.0, num_samples, 2, filtered)
    assert len(set(whitened_units.tolist())) == 2  # the whitened shapes alone never test the pair
    assert len(set(filtered_units.tolist())) == (2 if independent else 1)  # the refractory test decides


def test_unwhitened_templates_are_w_inverse_of_the_noise_scaled_templates():
    rng = np.random.default_rng(0)
    basis = torch.linalg.qr(torch.randn(20, 3))[0]
    templates = Templates(basis, torch.randn(4, 6, 3), before=8)
    noise, inverse = rng.uniform(0.5, 2.0, 6), rng.normal(size=(6, 6))
    expected = np.einsum("dc,ktc->ktd", inverse, templates.dense().numpy() * noise)
    np.testing.assert_allclose(templates.unwhitened(noise, inverse).dense().numpy(), expected, rtol=1e-4, atol=1e-5)
