"""Scores against ground truth, shared by the demo, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RecordingSource:
    """A SpikeInterface ground-truth recording as a TraceSource (its generators' traces are µV, gain 1).

    Duck-typed: SpikeInterface is not imported here.
    """

    def __init__(self, recording):
        self._recording = recording
        self.num_samples = recording.get_num_samples()
        self.num_channels = recording.get_num_channels()
        self.sampling_rate_hz = recording.sampling_frequency

    def get_traces(self, start_sample: int, end_sample: int) -> np.ndarray:
        return self._recording.get_traces(start_frame=start_sample, end_frame=end_sample).astype(np.float32)


@dataclass(frozen=True)
class DetectionScore:
    recall: float       # fraction of true events with a detection within tolerance
    precision: float    # fraction of detections with a true event within tolerance
    num_true: int
    num_detected: int


def score_detection(detected_samples: np.ndarray, true_samples: np.ndarray,
                    tolerance_samples: int) -> DetectionScore:
    """Match detections to true events (sample indices) within ± ``tolerance_samples``.

    Each side is scored independently by its nearest neighbour on the other
    side (several spikes of overlapping units may share one detection).
    """
    detected = np.sort(np.asarray(detected_samples, dtype=np.int64))
    truth = np.sort(np.asarray(true_samples, dtype=np.int64))
    recall = _fraction_near(truth, detected, tolerance_samples)
    precision = _fraction_near(detected, truth, tolerance_samples)
    return DetectionScore(recall, precision, int(truth.size), int(detected.size))


def _fraction_near(points: np.ndarray, reference: np.ndarray, tolerance: int) -> float:
    if points.size == 0:
        return float("nan")
    if reference.size == 0:
        return 0.0
    right = np.clip(np.searchsorted(reference, points), 0, reference.size - 1)
    left = np.clip(right - 1, 0, reference.size - 1)
    distance = np.minimum(np.abs(reference[right] - points), np.abs(reference[left] - points))
    return float(np.mean(distance <= tolerance))
