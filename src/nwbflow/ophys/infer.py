"""Spike-rate inference with the CNN: ΔF/F at any frame rate in, spike rate (Hz) per frame out.

Steps: gaps filled, noise level measured at the recorded rate, traces
resampled to the network's rate, edge-padded by half a window (so the first
and last frames get a full window and no NaN), cut into windows of
``chunk_samples`` that are batched across ROIs and time on the device, and the
predicted spikes per model sample resampled back to the recorded frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from nwbflow.device import OomBackoff
from nwbflow.ophys.model import DFF_CLIP, TRAINED_RATE_RANGE_HZ, SpikeCnn
from nwbflow.ophys.signal import fill_gaps, noise_level, resample

log = logging.getLogger(__name__)

#: Output samples per window (at the model rate): long windows amortize the padding of half a window.
CHUNK_SAMPLES = 4096


def infer_spike_rate(dff: np.ndarray, rate_hz: float, model: SpikeCnn, *, device: torch.device | str = "cpu",
                     batch_size: int = 64, chunk_samples: int = CHUNK_SAMPLES,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Spike rate of each ROI at each frame, from ΔF/F.

    Parameters
    ----------
    dff : (num_frames, num_rois) ΔF/F (unitless; NaN gaps are interpolated).
    rate_hz : frame rate of ``dff`` (Hz).
    model : a trained :class:`~nwbflow.ophys.model.SpikeCnn` (moved to ``device`` here).
    device : where the network runs; inputs are sent there batch by batch.
    batch_size : windows per forward pass (a window: ``chunk_samples`` + one receptive field);
        halved on out-of-memory errors.
    chunk_samples : output samples per window at the model rate.
    progress : called with (windows done, windows total).

    Returns
    -------
    (num_frames, num_rois) float32 spike rate (Hz), finite and >= 0 everywhere.
    """
    dff = fill_gaps(np.asarray(dff).reshape(len(dff), -1))
    num_frames, num_rois = dff.shape
    if num_frames < 2:
        return np.zeros((num_frames, num_rois), np.float32)
    spec = model.spec
    noise = noise_level(dff, rate_hz)
    x = resample(dff, rate_hz, spec.model_rate_hz)  # (T, N) at the model rate
    counts = _counts_at_model_rate(x, noise, rate_hz, model, torch.device(device), batch_size, chunk_samples,
                                   progress)
    # Frame k's rate is that of its span [t_k, t_k+1) (nwbflow.ophys.metrics), so it is read at its middle.
    rate = resample(counts * spec.model_rate_hz, spec.model_rate_hz, rate_hz, num_out=num_frames, shift_frames=0.5)
    return np.clip(rate, 0.0, None).astype(np.float32)


def _counts_at_model_rate(x: np.ndarray, noise: np.ndarray, recorded_rate_hz: float, model: SpikeCnn,
                          device: torch.device, batch_size: int, chunk_samples: int,
                          progress: Callable[[int, int], None] | None) -> np.ndarray:
    """Expected spikes per model sample, (T, N) float32, for traces ``x`` (T, N) at the model rate."""
    spec = model.spec
    half, length = spec.half_window, x.shape[0]
    num_chunks = -(-length // chunk_samples)
    padded_length = num_chunks * chunk_samples + 2 * half
    traces = torch.from_numpy(np.ascontiguousarray(np.clip(x, *DFF_CLIP).T))  # (N, T)
    padded = torch.nn.functional.pad(traces[:, None, :], (half, padded_length - length - half), mode="replicate")
    windows = padded[:, 0, :].unfold(1, chunk_samples + 2 * half, chunk_samples)  # (N, chunks, W) view
    noise_channel = torch.log(torch.as_tensor(noise, dtype=torch.float32).clamp(0.05, 100.0))
    rate_channel = float(np.log(np.clip(recorded_rate_hz, *TRAINED_RATE_RANGE_HZ) / spec.model_rate_hz))
    out = torch.empty(traces.shape[0], num_chunks * chunk_samples)
    total = traces.shape[0] * num_chunks
    model = model.to(device).eval()

    def step(lo: int, hi: int) -> None:
        flat = torch.arange(lo, hi)
        roi, chunk = flat // num_chunks, flat % num_chunks
        batch = torch.empty(hi - lo, 3, windows.shape[-1])
        batch[:, 0] = windows[roi, chunk]
        batch[:, 1] = noise_channel[roi, None]
        batch[:, 2] = rate_channel
        with torch.inference_mode():
            predicted = model(batch.to(device)).cpu()
        for i in range(hi - lo):  # written last: a step that fails leaves nothing behind
            start = int(chunk[i]) * chunk_samples
            out[int(roi[i]), start:start + chunk_samples] = predicted[i]
        if progress is not None:
            progress(hi, total)

    OomBackoff(batch_size, min_chunk_samples=1, device=device).run(step, 0, total)
    return out[:, :length].T.numpy().astype(np.float32)
