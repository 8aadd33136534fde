"""MEDiCINe motion estimation: accuracy on a SpikeInterface drifting ground truth, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nwbflow.ephys.chunks import ArraySource
from nwbflow.ephys.motion import Motion, estimate_motion
from nwbflow.ephys.motion.medicine import MIN_PEAKS, triangular_kernel
from nwbflow.ephys.peaks import iter_peaks
from nwbflow.ephys.preprocess import preprocess_to_binary
from nwbflow.errors import BadInputError
from nwbflow.params import MotionParams, PeakParams, PreprocessParams

FS_HZ = 30_000.0
DURATION_S = 90.0
#: Small enough for CI (about 10 s of fitting on one CPU core), same model as the defaults otherwise.
CI_MOTION = MotionParams(training_steps=1000, motion_noise_steps=300, batch_size=1024, hidden_features=(64, 64),
                         average_steps=200, early_stop_tolerance_um=0.0, time_kernel_width_s=8.0)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    """90 s, 32 channels (4 columns, a row every 20 µm), 40 units, rigid zigzag of ±15 µm (period 30 s).

    Our preprocessing and peaks (monopolar triangulation) on SpikeInterface's drifting generator; the
    truth is the generator's displacement vector (rigid: every unit's factor is 1).
    """
    from spikeinterface.generation import generate_drifting_recording

    probe = {"num_columns": 4, "num_contact_per_column": 8, "xpitch": 16.0, "ypitch": 40.0,
             "y_shift_per_column": [20.0, 0.0, 20.0, 0.0], "contact_shapes": "square",
             "contact_shape_params": {"width": 12.0}}
    drift = {"displacement_sampling_frequency": 5.0, "drift_start_um": [0.0, 15.0], "drift_stop_um": [0.0, -15.0],
             "drift_step_um": 1.0,
             "motion_list": [{"drift_mode": "zigzag", "amplitude_factor": 1.0, "non_rigid_gradient": None,
                              "t_start_drift": 5.0, "t_end_drift": None, "period_s": 30.0}]}
    _, recording, _, extra = generate_drifting_recording(
        num_units=40, duration=DURATION_S, sampling_frequency=FS_HZ, generate_probe_kwargs=probe,
        generate_displacement_vector_kwargs=drift, extra_outputs=True, seed=7)
    traces = recording.get_traces().astype(np.float32)
    positions = recording.get_channel_locations()
    binary = tmp_path_factory.mktemp("motion") / "pre.bin"
    pre = preprocess_to_binary(ArraySource(traces, FS_HZ), PreprocessParams(), binary)
    batches = list(iter_peaks(pre.open(), positions, PeakParams(localization="monopolar_triangulation"),
                              whitening_inverse=pre.whitening_inverse))
    peaks = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    truth = extra["displacement_vectors"][:, 1, 0] * float(np.mean(extra["displacement_unit_factor"][:, 0]))
    assert np.allclose(extra["displacement_unit_factor"][:, 0], 1.0)  # rigid
    return dict(times_s=peaks["sample_index"] / FS_HZ, depths_um=peaks["y_um"].astype(np.float64),
                amplitudes=np.abs(peaks["amplitude"]).astype(np.float64), truth_um=truth,
                truth_rate_hz=float(extra["displacement_sampling_frequency"]), positions=positions)


def _error_um(motion: Motion, gt) -> float:
    """Mean |estimate - truth| over truth samples x depths every 10 µm, after removing one global offset."""
    times = (np.arange(len(gt["truth_um"])) + 0.5) / gt["truth_rate_hz"]
    depths = np.arange(gt["positions"][:, 1].min(), gt["positions"][:, 1].max() + 1e-6, 10.0)
    grid_t, grid_z = np.meshgrid(times, depths, indexing="ij")
    error = motion.displacement_at(grid_t.ravel(), grid_z.ravel()).reshape(grid_t.shape) - gt["truth_um"][:, None]
    return float(np.mean(np.abs(error - np.median(error))))


def test_motion_error_is_below_half_of_the_zero_motion_error(drifting, device):
    fit = estimate_motion(drifting["times_s"], drifting["depths_um"], drifting["amplitudes"], CI_MOTION, seed=0,
                          device=device)
    zero = Motion(fit.motion.time_bins_s, fit.motion.depth_bins_um, np.zeros_like(fit.motion.displacement_um))
    ours, none = _error_um(fit.motion, drifting), _error_um(zero, drifting)
    print(f"motion MAE ours {ours:.2f} µm, zero motion {none:.2f} µm, {fit.steps} steps in {fit.seconds:.1f} s")
    assert none > 5.0  # the recording drifts
    assert ours < 0.5 * none
    assert fit.steps == CI_MOTION.training_steps and np.all(np.isfinite(fit.losses))
    assert fit.motion.displacement_um.shape == (int(np.ceil(drifting["times_s"].max())), 2)
    np.testing.assert_allclose(np.diff(fit.motion.time_bins_s), CI_MOTION.time_bin_s)


def _toy_peaks(num_peaks: int = 4_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of 8 units at fixed depths, drifting rigidly by 10 sin(2 pi t / 40 s) µm."""
    rng = np.random.default_rng(seed)
    unit = rng.integers(0, 8, num_peaks)
    times = np.sort(rng.uniform(0, 60.0, num_peaks))
    depths = np.linspace(50, 400, 8)[unit] + rng.normal(0, 3, num_peaks) + 10 * np.sin(2 * np.pi * times / 40)
    amplitudes = np.linspace(5, 20, 8)[unit] * rng.lognormal(0, 0.1, num_peaks)
    return times, depths, amplitudes


TOY = MotionParams(training_steps=300, motion_noise_steps=100, batch_size=256, hidden_features=(16,),
                   average_steps=50, early_stop_tolerance_um=0.0, time_kernel_width_s=6.0)


def test_a_seed_gives_the_same_motion_and_leaves_the_global_generator_alone():
    peaks = _toy_peaks()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = estimate_motion(*peaks, TOY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # our own generator; the global one is untouched
    second = estimate_motion(*peaks, TOY, seed=3)
    other = estimate_motion(*peaks, TOY, seed=4)
    np.testing.assert_array_equal(first.motion.displacement_um, second.motion.displacement_um)
    assert not np.array_equal(first.motion.displacement_um, other.motion.displacement_um)


def test_early_stop_ends_the_fit_once_the_averaged_motion_settles():
    params = TOY.model_copy(update={"training_steps": 5000, "early_stop_tolerance_um": 1.0})
    fit = estimate_motion(*_toy_peaks(), params, seed=0)
    assert params.motion_noise_steps + params.average_steps <= fit.steps < params.training_steps
    assert fit.steps % 250 == 0 and len(fit.losses) == fit.steps


def test_paper_settings_are_the_reference_packages():
    paper = MotionParams.paper()
    assert (paper.hidden_features, paper.time_interpolation, paper.average_steps) == ((256, 256), "bin", 0)
    assert (paper.training_steps, paper.batch_size, paper.learning_rate) == (10_000, 4096, 5e-4)
    assert (paper.motion_noise_steps, paper.initial_motion_noise, paper.early_stop_tolerance_um) == (2000, 0.1, 0.0)
    assert (paper.num_depth_bins, paper.time_bin_s, paper.time_kernel_width_s, paper.motion_bound_um) == (
        2, 1.0, 30.0, 800.0)
    fit = estimate_motion(*_toy_peaks(), MotionParams.paper(training_steps=20, motion_noise_steps=10), seed=0)
    assert fit.steps == 20


def test_triangular_kernel_has_unit_area_and_the_given_width():
    kernel = triangular_kernel(30.0, 1.0)
    assert kernel.sum() == pytest.approx(1.0) and len(kernel) == 29 and kernel.argmax() == 14
    np.testing.assert_allclose(kernel, kernel[::-1])
    assert triangular_kernel(0.5, 1.0).tolist() == [1.0]


@pytest.mark.parametrize("case", ["few", "nan", "flat", "lengths"])
def test_bad_peaks_are_refused_clearly(case):
    times, depths, amplitudes = _toy_peaks()
    if case == "few":
        times, depths, amplitudes = times[:MIN_PEAKS - 1], depths[:MIN_PEAKS - 1], amplitudes[:MIN_PEAKS - 1]
    elif case == "nan":
        depths = depths.copy()
        depths[5] = np.nan
    elif case == "flat":
        depths = np.full_like(depths, 100.0)
    else:
        amplitudes = amplitudes[:-1]
    with pytest.raises(BadInputError, match={"few": "too few", "nan": "non-finite", "flat": "same depth",
                                             "lengths": "differ in length"}[case]):
        estimate_motion(times, depths, amplitudes, TOY)


def test_motion_interpolates_bilinearly_and_converts_to_spikeinterface():
    motion = Motion(time_bins_s=np.array([0.5, 1.5, 2.5]), depth_bins_um=np.array([0.0, 100.0]),
                    displacement_um=np.array([[0, 0], [10, 20], [10, 20]], dtype=np.float32))
    got = motion.displacement_at(np.array([1.0, 1.5, -5.0, 9.0]), np.array([50.0, 100.0, 0.0, 500.0]))
    np.testing.assert_allclose(got, [7.5, 20.0, 0.0, 20.0])
    si_motion = motion.to_spikeinterface()
    expected = si_motion.get_displacement_at_time_and_depth(np.array([1.5]), np.array([50.0]))
    np.testing.assert_allclose(expected, motion.displacement_at(np.array([1.5]), np.array([50.0])), atol=1e-6)
    with pytest.raises(ValueError, match="strictly increasing"):
        Motion(np.array([1.0, 0.5]), np.array([0.0]), np.zeros((2, 1), dtype=np.float32))
