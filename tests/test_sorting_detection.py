"""Footprint detection (the detection that feeds clustering) against per-channel thresholds and known noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nwbflow.ephys.local_matrix as local_matrix
import nwbflow.ephys.sorting.detection as detection
from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.sorting.detection import (FootprintDetector, detect_in_window, threshold_tables,
                                             waveform_prototypes)
from nwbflow.ephys.sorting.traces import ScaledSource
from nwbflow.params import SortingParams

FS = 30_000.0
BEFORE, WIDTH = 21, 61
#: A 2-column probe, 20 µm pitch, 32 channels.
POSITIONS = np.stack([np.tile([0.0, 20.0], 16), np.repeat(np.arange(16) * 20.0, 2)], axis=1)


def _waveform(shift: int = 0) -> np.ndarray:
    """A biphasic spike of unit trough depth, trough at ``BEFORE + shift``."""
    t = np.arange(WIDTH) - BEFORE - shift
    return -np.exp(-0.5 * (t / 3.0) ** 2) + 0.35 * np.exp(-0.5 * ((t - 10) / 6.0) ** 2)


def _detector(traces: np.ndarray, device: str, threshold: float = 5.0) -> tuple[FootprintDetector, ScaledSource]:
    scaled = ScaledSource(ArraySource(traces.astype(np.float32), FS), np.ones(traces.shape[1]), torch.device(device))
    prototypes = waveform_prototypes(torch.as_tensor(np.stack([_waveform()] * 20), dtype=torch.float32,
                                                     device=device), BEFORE, seed=0)
    detector = FootprintDetector.build(prototypes, BEFORE, POSITIONS, FS, threshold)
    return detector.measured(scaled.sample(chunk_samples=60_000, num_chunks=detection.NOISE_SAMPLE_CHUNKS,
                                           seed=0)), scaled


def _hits(found: np.ndarray, times: np.ndarray, tolerance: int = 2) -> np.ndarray:
    """For each of ``times``, whether the sorted ``found`` holds a sample within ``tolerance``."""
    if not len(found):
        return np.zeros(len(times), bool)
    index = np.searchsorted(found, times)
    before, after = found[np.clip(index - 1, 0, len(found) - 1)], found[np.clip(index, 0, len(found) - 1)]
    return np.minimum(np.abs(before - times), np.abs(after - times)) <= tolerance


def test_measured_noise_of_white_noise_scores_is_one(device):
    # A unit-norm prototype on a unit-norm footprint has output SD 1 on unit white noise; MAD
    # over 5 chunks x ~8 500 kept lags x 32 centres, correlated across neighbouring centres: ~1 % error.
    traces = np.random.default_rng(0).normal(size=(300_000, 32))
    detector, _ = _detector(traces, device)
    np.testing.assert_allclose(detector.noise.cpu().numpy(), 1.0, atol=0.04)


def test_footprint_detection_finds_a_spread_spike_the_channel_threshold_misses(device):
    # A unit at 2.5 noise SD on its best channel, spread over the probe with a 25 µm decay: a 5.5 MAD
    # threshold on its best channel sees almost none of its spikes; its energy summed over ~10
    # channels and the waveform's samples is ~7.5 SD, so footprint detection at 5 finds most.
    rng = np.random.default_rng(1)
    traces = rng.normal(size=(600_000, 32))
    centre = np.array([10.0, 150.0])
    footprint = 2.5 * np.exp(-0.5 * (np.linalg.norm(POSITIONS - centre, axis=1) / 25.0) ** 2)
    times = np.sort(rng.choice(np.arange(200, 599_800, 150), 600, replace=False))
    for time in times:
        traces[time - BEFORE: time - BEFORE + WIDTH] += _waveform()[:, None] * footprint[None, :]
    detector, scaled = _detector(traces, device)
    window, first = scaled.window(0, len(traces), WIDTH)
    rows, channels = detector.detect(window, (WIDTH, WIDTH + len(traces)))
    found = np.sort((rows + first).cpu().numpy())
    tables = threshold_tables(POSITIONS, FS, SortingParams().detect_threshold_mad, torch.device(device))
    plain, _ = detect_in_window(window, tables, (WIDTH, WIDTH + len(traces)))
    assert _hits(np.sort((plain + first).cpu().numpy()), times).mean() < 0.1
    assert _hits(found, times).mean() > 0.8
    nearest = np.argsort(np.linalg.norm(POSITIONS - centre, axis=1))[:4]
    assert np.isin(channels.cpu().numpy(), nearest).mean() > 0.9  # centred on the unit
    false = (~_hits(times, found, tolerance=WIDTH)).sum()  # detections far from every spike: noise
    assert false < 0.02 * len(times)


def test_an_echo_of_a_large_spike_is_not_detected_but_a_small_spike_alone_is(device):
    # A large spike near the top of the probe and, 15 samples later on every channel, a spike-shaped
    # echo with 15 % of its footprint score (what a median reference shifted by the spike's
    # after-peak leaves); the echo alone crosses the threshold. A small spike alone far away must stay.
    rng = np.random.default_rng(2)
    traces = 0.5 * rng.normal(size=(120_000, 32))
    big = 40.0 * np.exp(-0.5 * (np.linalg.norm(POSITIONS - np.array([10.0, 290.0]), axis=1) / 20.0) ** 2)
    small = 3.0 * np.exp(-0.5 * (np.linalg.norm(POSITIONS - np.array([10.0, 20.0]), axis=1) / 20.0) ** 2)
    echo_level = 0.15 * np.linalg.norm(big) / np.sqrt(32)  # the same score on a footprint as 15 % of the spike
    spikes, echoes, smalls = [], [], []
    for time in range(1_000, 110_000, 1_000):
        traces[time - BEFORE: time - BEFORE + WIDTH] += _waveform()[:, None] * big[None, :]
        traces[time + 15 - BEFORE: time + 15 - BEFORE + WIDTH] += echo_level * _waveform()[:, None]
        traces[time + 500 - BEFORE: time + 500 - BEFORE + WIDTH] += _waveform()[:, None] * small[None, :]
        spikes.append(time), echoes.append(time + 15), smalls.append(time + 500)
    detector, scaled = _detector(traces, device)
    window, first = scaled.window(0, len(traces), WIDTH)
    rows, channels = detector.detect(window, (WIDTH, WIDTH + len(traces)))
    found, channels = (rows + first).cpu().numpy(), channels.cpu().numpy()
    far = np.abs(POSITIONS[channels, 1] - 290.0) > 100
    assert _hits(np.sort(found), np.array(spikes)).mean() == 1.0
    assert _hits(np.sort(found[far]), np.array(smalls)).mean() > 0.95
    assert _hits(np.sort(found[far]), np.array(echoes), tolerance=5).mean() < 0.05
    # Without the echo rule (ratio infinite) the echo is found on the far channels: the test can fail.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detection, "ECHO_RATIO", float("inf"))
        rows, channels = detector.detect(window, (WIDTH, WIDTH + len(traces)))
    found, channels = (rows + first).cpu().numpy(), channels.cpu().numpy()
    far = np.abs(POSITIONS[channels, 1] - 290.0) > 100
    assert _hits(np.sort(found[far]), np.array(echoes), tolerance=5).mean() > 0.5


def test_prototypes_keep_their_trough_where_the_waveforms_were_aligned():
    rng = np.random.default_rng(3)
    aligned = np.stack([_waveform() * rng.uniform(1, 3) for _ in range(60)])
    overlaps = np.stack([_waveform() + 1.5 * _waveform(25) for _ in range(30)])  # trough 25 samples late
    waveforms = torch.as_tensor(np.concatenate([aligned, overlaps]) + 0.05 * rng.normal(size=(90, WIDTH)),
                                dtype=torch.float32)
    prototypes = waveform_prototypes(waveforms, BEFORE, seed=0)
    assert torch.all(prototypes.argmin(dim=1) == BEFORE)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(len(prototypes)))
    cosine = prototypes.double() @ torch.as_tensor(_waveform() / np.linalg.norm(_waveform()))
    assert float(cosine.max()) > 0.99


def test_footprint_scores_at_neuropixels_scale_equal_the_dense_sums(device, monkeypatch):
    # 384 channels: footprint sums go through blocks of nearby channels (LocalMatrix), not the dense product;
    # the scores and the detections must be those of the dense product (LocalMatrix forced dense below).
    positions = np.stack([np.tile([0.0, 32.0], 192) + np.repeat(np.arange(192) % 2 * 16.0, 2),
                          np.repeat(np.arange(192) * 20.0, 2)], axis=1)
    rng = np.random.default_rng(4)
    traces = rng.standard_normal((20_000, 384)).astype(np.float32)
    for sample, channel in zip(rng.integers(200, 19_800, 60), rng.integers(0, 384, 60)):
        near = np.abs(positions[:, 1] - positions[channel, 1]) <= 40.0
        traces[sample - BEFORE: sample - BEFORE + WIDTH, near] += 6.0 * _waveform()[:, None]
    prototypes = waveform_prototypes(torch.as_tensor(np.stack([_waveform()] * 20), dtype=torch.float32,
                                                     device=device), BEFORE, seed=0)
    blocked = FootprintDetector.build(prototypes, BEFORE, positions, FS, 5.0)
    monkeypatch.setattr(local_matrix, "MAX_READ_FRACTION", 0.0)  # blocks never pay: the dense product
    dense = FootprintDetector.build(prototypes, BEFORE, positions, FS, 5.0)
    assert blocked.footprints.dense is None and dense.footprints.dense is not None
    x = torch.as_tensor(traces, device=device)
    # float32 sums of ~30 terms of size ~5 in another order
    torch.testing.assert_close(blocked.raw_scores(x), dense.raw_scores(x), rtol=0, atol=2e-4)
    core = (WIDTH, 20_000 - WIDTH)
    found, expected = blocked.detect(x, core), dense.detect(x, core)
    assert len(expected[0]) >= 40
    for ours, theirs in zip(found, expected):
        assert torch.equal(ours, theirs)
