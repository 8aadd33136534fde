"""Calcium imaging science kernels: spike inference from ROI traces (numpy/torch; no Prefect, no NWB).

Modules: ``signal`` (ΔF/F with a robust running baseline, CASCADE noise
level, resampling), ``model`` (the 1-D CNN), ``weights`` (shipped networks,
checksummed), ``infer`` (batched CNN inference on a device), ``ar1``
(non-negative AR(1) deconvolution), ``methods`` (one entry point and the
method registry), ``metrics`` (Spikefinder correlation, CASCADE error and
bias), ``training`` (simulator, ground-truth loader, training command).
"""

from nwbflow.ophys.ar1 import ar1_spike_rate, deconvolve_ar1
from nwbflow.ophys.infer import infer_spike_rate
from nwbflow.ophys.methods import METHODS, SpikeRateResult, spike_rate
from nwbflow.ophys.signal import dff_from_fluorescence, noise_level, resample
from nwbflow.ophys.weights import DEFAULT_MODEL, WeightsChecksumError, load_cnn

__all__ = ["DEFAULT_MODEL", "METHODS", "SpikeRateResult", "WeightsChecksumError", "ar1_spike_rate",
           "deconvolve_ar1", "dff_from_fluorescence", "infer_spike_rate", "load_cnn", "noise_level", "resample",
           "spike_rate"]
