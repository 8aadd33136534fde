"""Calcium spike inference from ROI traces, one entry point for every method (registry: ``METHODS``).

:func:`spike_rate` turns what a RoiResponseSeries holds (raw fluorescence,
optionally with neuropil traces, or ΔF/F) into a spike rate in Hz per frame,
with the method named by ``CalciumParams.method``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nwbflow.ophys.ar1 import ar1_spike_rate
from nwbflow.ophys.infer import infer_spike_rate
from nwbflow.ophys.model import TRAINED_RATE_RANGE_HZ
from nwbflow.ophys.signal import dff_from_fluorescence, fill_gaps, noise_level
from nwbflow.ophys.weights import load_cnn
from nwbflow.params import DEFAULT_CHUNKS, CalciumParams

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SpikeRateResult:
    """rate_hz : (num_frames, num_rois) float32 spike rate (Hz); model / model_sha256 : the network
    used ("" for AR(1)); noise_level : (num_rois,) CASCADE noise level of the ΔF/F (% / sqrt(Hz))."""

    rate_hz: np.ndarray
    model: str
    model_sha256: str
    noise_level: np.ndarray


def _cnn(dff: np.ndarray, rate_hz: float, params: CalciumParams, device: torch.device, batch_size: int,
         progress: Progress | None) -> tuple[np.ndarray, str, str]:
    loaded = load_cnn(params.model, device=device)
    rates = infer_spike_rate(dff, rate_hz, loaded.model, device=device, batch_size=batch_size, progress=progress)
    return rates, loaded.name, loaded.sha256


def _ar1(dff: np.ndarray, rate_hz: float, params: CalciumParams, device: torch.device, batch_size: int,
         progress: Progress | None) -> tuple[np.ndarray, str, str]:
    rates = np.empty_like(dff)
    for roi in range(dff.shape[1]):
        rates[:, roi] = ar1_spike_rate(dff[:, roi:roi + 1], rate_hz, sparsity=params.ar1_sparsity,
                                       dff_per_spike=params.ar1_dff_per_spike)[:, 0]
        if progress is not None:
            progress(roi + 1, dff.shape[1])
    return rates, "", ""


#: method name -> implementation ``(dff, rate_hz, params, device, batch_size, progress) -> (rates Hz, model, sha256)``.
METHODS = {"cnn": _cnn, "ar1": _ar1}


def spike_rate(traces: np.ndarray, rate_hz: float, params: CalciumParams, *, is_dff: bool,
               neuropil: np.ndarray | None = None, device: torch.device | str = "cpu",
               batch_size: int = DEFAULT_CHUNKS.calcium_windows, progress: Progress | None = None) -> SpikeRateResult:
    """Spike rate (Hz) per frame and ROI.

    Parameters
    ----------
    traces : (num_frames, num_rois) raw fluorescence (a.u.) or ΔF/F (unitless) as ``is_dff`` says.
    rate_hz : frame rate (Hz).
    params : method, model, baseline and neuropil settings.
    neuropil : (num_frames, num_rois) neuropil fluorescence, subtracted from raw fluorescence only.
    device : where the CNN runs (AR(1) runs on the CPU).
    batch_size : CNN windows per forward pass (the execution policy's ``chunks.calcium_windows``); halved on
        out-of-memory errors.
    progress : called with (done, total) work units.
    """
    if params.method not in METHODS:
        raise ValueError(f"unknown calcium method {params.method!r}; choose among {sorted(METHODS)}")
    if is_dff:
        if neuropil is not None:
            log.warning("neuropil traces are ignored: the input is already ΔF/F")
        dff = fill_gaps(traces)
    else:
        dff = dff_from_fluorescence(traces, rate_hz, neuropil=neuropil,
                                    neuropil_coefficient=params.neuropil_coefficient,
                                    window_s=params.baseline_window_s, percentile=params.baseline_percentile)
    low, high = TRAINED_RATE_RANGE_HZ
    if not low <= rate_hz <= 2 * high:
        log.warning("frame rate %.3g Hz is outside the %g-%g Hz the calcium model was trained on", rate_hz, low, high)
    rates, model, sha = METHODS[params.method](dff, rate_hz, params, torch.device(device), batch_size, progress)
    return SpikeRateResult(rate_hz=rates.astype(np.float32), model=model, model_sha256=sha,
                           noise_level=noise_level(dff, rate_hz))
