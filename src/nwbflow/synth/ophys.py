"""Synthetic two-photon imaging: calcium simulation and the NWB imaging objects."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from nwbflow.synth._nwb import _create_device, _data_io
from nwbflow.synth.config import INDICATORS, SynthConfig, _stream_seed

logger = logging.getLogger(__name__)

ROI_RESPONSE_SERIES_PATH = "processing/ophys/Fluorescence/RoiResponseSeries"
PLANE_SEGMENTATION_PATH = "processing/ophys/ImageSegmentation/PlaneSegmentation"


@dataclass(frozen=True, eq=False)
class OphysTruth:
    """Simulated two-photon session.

    Attributes
    ----------
    fluorescence_au : (num_frames, num_rois) float32 raw fluorescence (a.u.).
    image_masks : (num_rois, fov_px, fov_px) float32 weights in [0, 1].
    spike_roi_index, spike_times_s : (N,) ground-truth spikes (int64, s), time-sorted.
    roi_params : per-ROI arrays (rates, kinetics, F0, neuropil coefficient, centre, radius).
    """

    fluorescence_au: np.ndarray
    image_masks: np.ndarray
    spike_roi_index: np.ndarray
    spike_times_s: np.ndarray
    roi_params: dict[str, np.ndarray]


def _roi_params(rng: np.random.Generator, config: SynthConfig) -> dict[str, np.ndarray]:
    """Per-ROI rates and indicator parameters, jittered ±15 % (lognormal) around the indicator's."""
    kinetics, n = INDICATORS[config.indicator], config.num_rois
    low, high = config.roi_rate_range_hz
    bursty = rng.random(n) < config.burst_fraction

    def jitter() -> np.ndarray:
        return np.exp(rng.normal(0.0, 0.15, n))

    decay = kinetics.decay_s * jitter()
    return dict(
        rate_hz=np.exp(rng.uniform(np.log(low), np.log(high), n)),
        bursty=bursty,
        burst_rate_hz=np.where(bursty, rng.uniform(0.03, 0.15, n), 0.0),
        tau_rise_s=np.minimum(kinetics.rise_s * jitter(), 0.5 * decay),
        tau_decay_s=decay,
        dff_per_spike=kinetics.dff_per_spike * jitter(),
        saturation_spikes=np.full(n, kinetics.saturation_spikes),
        f0_au=rng.uniform(300.0, 900.0, n),
        neuropil_coefficient=rng.uniform(0.5, 0.9, n),
        bleach_tau_s=rng.uniform(600.0, 3000.0, n),
    )


def _roi_spike_train(rng: np.random.Generator, rate_hz: float, burst_rate_hz: float,
                     duration_s: float, refractory_s: float = 0.002) -> np.ndarray:
    """Poisson spikes plus Poisson-timed bursts (2-8 spikes, 6-15 ms ISI); (N,) sorted times (s)."""
    parts = [rng.uniform(0.0, duration_s, rng.poisson(rate_hz * duration_s))]
    for start in rng.uniform(0.0, duration_s, rng.poisson(burst_rate_hz * duration_s)):
        size = 2 + min(int(rng.poisson(2.0)), 6)
        parts.append(start + np.concatenate([[0.0], np.cumsum(rng.uniform(0.006, 0.015, size - 1))]))
    times = np.sort(np.concatenate(parts))
    times = times[times < duration_s]
    while times.size > 1:
        too_close = np.flatnonzero(np.diff(times) < refractory_s)
        if too_close.size == 0:
            break
        times = np.delete(times, too_close + 1)
    return times


def indicator_dff(spike_times_s: np.ndarray, tau_rise_s: float, tau_decay_s: float, dff_per_spike: float,
                  saturation_spikes: float, dt_s: float, num_steps: int) -> np.ndarray:
    """ΔF/F on a fine grid: double-exponential calcium, then a saturating Hill (n = 1) curve.

    Parameters
    ----------
    spike_times_s : (N,) spike times (s).
    tau_rise_s, tau_decay_s : kinetics (s), tau_rise_s < tau_decay_s.
    dff_per_spike : peak ΔF/F of one isolated spike.
    saturation_spikes : calcium (spike-equivalents) at half of the maximal ΔF/F.
    dt_s, num_steps : fine grid step (s) and length; step i covers [i dt, (i + 1) dt).

    Returns
    -------
    (num_steps,) float64 ΔF/F; zero before the first spike, rising after each spike.
    """
    from scipy.signal import lfilter

    index = np.minimum((np.asarray(spike_times_s) / dt_s).astype(np.int64), num_steps - 1)
    counts = np.bincount(index, minlength=num_steps).astype(np.float64)
    decay = lfilter([1.0], [1.0, -math.exp(-dt_s / tau_decay_s)], counts)
    rise = lfilter([1.0], [1.0, -math.exp(-dt_s / tau_rise_s)], counts)
    t_peak = tau_decay_s * tau_rise_s / (tau_decay_s - tau_rise_s) * math.log(tau_decay_s / tau_rise_s)
    calcium = (decay - rise) / (math.exp(-t_peak / tau_decay_s) - math.exp(-t_peak / tau_rise_s))
    return dff_per_spike * (1.0 + saturation_spikes) * calcium / (calcium + saturation_spikes)


def _slow_modulation(rng: np.random.Generator, times_s: np.ndarray, amplitude: float) -> np.ndarray:
    """1 + a sum of three slow sinusoids (periods 20-200 s, random phases); (F,) unitless."""
    periods, phases = rng.uniform(20.0, 200.0, 3), rng.uniform(0.0, 2 * np.pi, 3)
    waves = np.sin(2 * np.pi * times_s[:, None] / periods[None, :] + phases[None, :])
    return 1.0 + amplitude * waves.sum(axis=1)


def _neuropil_au(rng: np.random.Generator, dff: np.ndarray, times_s: np.ndarray, rate_hz: float) -> np.ndarray:
    """Shared neuropil fluorescence (a.u.): 400 a.u. baseline, half the mean ROI ΔF/F, AR(1) noise."""
    from scipy.signal import lfilter

    alpha = math.exp(-1.0 / (2.0 * rate_hz))  # 2 s correlation time
    fluctuation = lfilter([math.sqrt(1 - alpha**2)], [1.0, -alpha], rng.standard_normal(times_s.size)) * 0.03
    return 400.0 * (1.0 + 0.5 * dff.mean(axis=1) + fluctuation) * np.exp(-times_s / 1500.0)


def _roi_masks(rng: np.random.Generator, num_rois: int, fov_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian blob ROIs placed without overlap where possible.

    Returns
    -------
    masks : (num_rois, fov_px, fov_px) float32; centres : (num_rois, 2) px (row, col); radii : (num_rois,) px.
    """
    radii = rng.uniform(2.5, 4.0, num_rois)
    centres = np.zeros((num_rois, 2))
    for i, radius in enumerate(radii):
        for _attempt in range(500):
            centres[i] = rng.uniform(radius + 1, fov_px - radius - 1, 2)
            gaps = np.linalg.norm(centres[:i] - centres[i], axis=1) - radii[:i] - radius
            if np.all(gaps >= 1.0):
                break
        else:
            logger.warning("ROI %d overlaps a neighbour: %d ROIs are crowded in %d px", i, num_rois, fov_px)
    rows, cols = np.mgrid[0:fov_px, 0:fov_px]
    d2 = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    masks = np.exp(-d2 / (2 * (radii[:, None, None] / 2.0) ** 2))
    masks[d2 > radii[:, None, None] ** 2] = 0.0
    return masks.astype(np.float32), centres, radii


def simulate_ophys(config: SynthConfig) -> OphysTruth:
    """Raw ROI fluorescence from ground-truth spikes (see the ``nwbflow.synth`` docstring for the model)."""
    rng = np.random.default_rng(_stream_seed(config.seed, "ophys"))
    params = _roi_params(rng, config)
    num_frames = int(config.duration_s * config.imaging_rate_hz)
    oversample = max(1, math.ceil(1000.0 / config.imaging_rate_hz))  # fine step <= 1 ms
    dt_s = 1.0 / (config.imaging_rate_hz * oversample)
    frame_mid_s = (np.arange(num_frames) + 0.5) / config.imaging_rate_hz
    trains, dff = [], np.zeros((num_frames, config.num_rois))
    for r in range(config.num_rois):
        trains.append(_roi_spike_train(rng, params["rate_hz"][r], params["burst_rate_hz"][r],
                                       num_frames / config.imaging_rate_hz))
        fine = indicator_dff(trains[r], params["tau_rise_s"][r], params["tau_decay_s"][r],
                             params["dff_per_spike"][r], params["saturation_spikes"][r], dt_s,
                             num_frames * oversample)
        dff[:, r] = fine.reshape(num_frames, oversample).mean(axis=1)  # exposure integral
    baseline = np.column_stack([params["f0_au"][r] * np.exp(-frame_mid_s / params["bleach_tau_s"][r])
                                * _slow_modulation(rng, frame_mid_s, 0.01) for r in range(config.num_rois)])
    neuropil = _neuropil_au(rng, dff, frame_mid_s, config.imaging_rate_hz)
    clean = baseline * (1.0 + dff) + params["neuropil_coefficient"][None, :] * neuropil[:, None]
    shot = np.sqrt(config.photon_gain_au * clean) * rng.standard_normal(clean.shape)
    noisy = clean + shot + 2.0 * rng.standard_normal(clean.shape)
    masks, centres, radii = _roi_masks(rng, config.num_rois, config.fov_px)
    params.update(center_px=centres, radius_px=radii)
    roi_index = np.concatenate([np.full(t.size, r, np.int64) for r, t in enumerate(trains)])
    times = np.concatenate(trains)
    order = np.lexsort((roi_index, times))
    return OphysTruth(fluorescence_au=noisy.astype(np.float32), image_masks=masks,
                      spike_roi_index=roi_index[order], spike_times_s=times[order], roi_params=params)


def _add_ophys(nwbfile, truth: OphysTruth, config: SynthConfig) -> None:
    """Microscope, imaging plane, plane segmentation (image masks) and raw Fluorescence."""
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel

    device = _create_device(nwbfile, "Microscope", "Simulated two-photon resonant-scanning microscope.")
    channel = OpticalChannel(name="OpticalChannel", description="Green emission channel.", emission_lambda=510.0)
    plane = nwbfile.create_imaging_plane(
        name="ImagingPlane", optical_channel=channel, device=device, excitation_lambda=920.0,
        indicator=config.indicator, location=config.imaging_area, imaging_rate=float(config.imaging_rate_hz),
        grid_spacing=[2.0, 2.0], grid_spacing_unit="micrometers",
        description=f"Simulated {config.fov_px}x{config.fov_px} px field of view, 2 µm per pixel, layer 2/3.")
    module = nwbfile.create_processing_module(
        name="ophys", description="Optical physiology: ROI segmentation and raw fluorescence (synthetic).")
    segmentation = ImageSegmentation(name="ImageSegmentation")
    module.add(segmentation)
    planes = segmentation.create_plane_segmentation(
        name="PlaneSegmentation", imaging_plane=plane,
        description="Ground-truth ROIs: Gaussian blobs, weights in [0, 1].")
    for mask in truth.image_masks:
        planes.add_roi(image_mask=mask)
    fluorescence = Fluorescence(name="Fluorescence")
    module.add(fluorescence)
    fluorescence.create_roi_response_series(
        name="RoiResponseSeries", data=_data_io(truth.fluorescence_au, config), unit="a.u.",
        rois=planes.create_roi_table_region(region=list(range(config.num_rois)), description="All ROIs."),
        rate=float(config.imaging_rate_hz), starting_time=0.0,
        description="Raw ROI fluorescence, not neuropil-corrected; frame k averages its exposure "
                    "[k/rate, (k+1)/rate) s.")
