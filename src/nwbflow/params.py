"""One frozen parameter model per stage: defaults, units, bounds, one line each.

These models are the flow parameters too, so the Prefect UI renders a form
from them and provenance records their resolved values. Unknown keys are
refused (``extra="forbid"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nwbflow.cpu_threads import default_threads
from nwbflow.ephys.sorting.registry import SORTERS
from nwbflow.errors import BadInputError

StageName = Literal["preprocess", "peaks", "motion", "sorting", "calcium"]
STAGE_ORDER: tuple[str, ...] = ("preprocess", "peaks", "motion", "sorting", "calcium")
DeviceName = Literal["auto", "cpu", "cuda"]


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def as_json(self) -> str:
        """The resolved parameters as compact, key-sorted JSON (for provenance)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class BadChannelParams(_Params):
    """Dead, noisy and outside-the-brain channels (IBL's coherence + spectrum method,
    ``nwbflow.ephys.bad_channels``); the thresholds are IBL's (and SpikeInterface's) defaults, and
    ``dead_rms_below`` ours."""

    detect: bool = Field(True, description="Detect bad channels and leave them out of the common reference, "
                                           "whitening, detection, sorting and the units' electrodes (probes of "
                                           "at least 16 channels).")
    chunks: int = Field(50, ge=1, le=10000, description="Windows sampled (seeded) to label channels; each "
                                                       "channel takes the label it gets most often.")
    chunk_s: float = Field(0.3, gt=0.01, le=10, description="Length of each window (s).")
    highpass_hz: float = Field(300.0, gt=0, description="Zero-phase high-pass applied to each window first (Hz).")
    neighbours: int = Field(11, ge=3, le=101, description="Channels of the median filter along the probe (odd).")
    dead_below: float = Field(-0.5, description="Dead: similarity to the probe minus its neighbours' below this ...")
    dead_rms_below: float = Field(
        0.5, gt=0, description="... and high-passed RMS below this fraction of the probe's median channel RMS "
                               "(our addition: spares channels under large units where the probe carries no "
                               "shared background).")
    noisy_above: float = Field(1.0, description="Noisy: similarity minus its neighbours' above this ...")
    psd_hf_above_uv2_hz: float = Field(
        0.02, gt=0, description="... or mean power above nyquist_fraction of Nyquist above this (µV²/Hz).")
    nyquist_fraction: float = Field(0.8, gt=0, lt=1, description="Where the high-frequency band starts.")
    outside_below: float = Field(-0.75, description="Outside: the block at the top of the probe whose neighbours' "
                                                    "similarity is below 1 + this.")
    welch_ms: float = Field(10.0, gt=0.1, le=1000, description="Welch window of the spectrum (ms).")

    @field_validator("neighbours")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"neighbours must be odd, got {value}")
        return value


class SaturationParams(_Params):
    """Saturation and artifact periods, zeroed after preprocessing (``nwbflow.ephys.saturation``; IBL's rule
    and SpikeInterface's ``detect_saturation_periods``, measured on offset-free µV)."""

    detect: bool = Field(True, description="Zero the periods where more than `proportion` of the channels are "
                                           "beyond `level_uv` or jump by `jump_uv_per_ms` at once.")
    level_uv: float = Field(
        1000.0, gt=0, description="A channel is beyond its range this far from its offset (µV): below "
                                  "Neuropixels 1.0's rails (about ±1.2 mV) by more than its usual offsets. Raise it "
                                  "for wide-band recordings whose LFP swings by a millivolt on many channels.")
    jump_uv_per_ms: float = Field(
        9000.0, gt=0, description="... or moves this fast (µV per ms; IBL's 300 µV per sample at 30 kHz).")
    proportion: float = Field(0.2, gt=0, lt=1, description="Fraction of the channels that must be at once.")
    pad_ms: float = Field(1.0, ge=0, le=100,
                          description="Zeroed on each side of a period too (ms): where the band-pass rings.")


class PreprocessParams(_Params):
    """Offset removal, median common reference, zero-phase band-pass, ZCA whitening."""

    freq_min_hz: float = Field(300.0, gt=0, description="Band-pass low cut-off (Hz).")
    freq_max_hz: float = Field(6000.0, gt=0,
                               description="Band-pass high cut-off (Hz); must be below Nyquist.")
    filter_order: int = Field(3, ge=1, le=8,
                              description="Butterworth order of each pass (applied forward and backward).")
    adc_phase_shift: bool = Field(
        True, description="Delay each channel by its ADC sample shift (the electrodes table's inter_sample_shift, "
                          "as NeuroConv writes for Neuropixels) before the common reference; no effect where the "
                          "file has no shifts.")
    bad_channels: BadChannelParams = Field(default_factory=BadChannelParams)
    saturation: SaturationParams = Field(default_factory=SaturationParams)
    common_reference: bool = Field(True, description="Subtract the median across channels per sample.")
    whiten: bool = Field(True, description="Apply ZCA whitening estimated from sampled chunks.")
    whitening_mode: Literal["global", "local"] = Field(
        "global", description="ZCA over all channels, or per channel over its neighbourhood (Kilosort-style).")
    whitening_radius_um: float = Field(
        100.0, gt=0, le=2000, description="Neighbourhood radius of local whitening (µm).")
    whitening_regularization: float = Field(
        1e-3, ge=0, le=1,
        description="eps added to covariance eigenvalues, as a fraction of their mean (unitless).")
    noise_sample_chunks: int = Field(
        20, ge=1, le=1000, description="Chunks sampled to estimate offsets and the whitening matrix.")
    noise_sample_duration_s: float = Field(
        0.33, gt=0.005, le=60, description="Length of each sampled chunk (s); 20 x 0.33 s = 200k samples, "
                                           "as SpikeInterface's whitening uses.")
    output_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage of the preprocessed scratch binary: float16 (relative precision 2^-11, "
                               "half the disk and I/O of float32; read back as float32) or float32.")

    @model_validator(mode="after")
    def _band_is_ordered(self) -> PreprocessParams:
        if self.freq_min_hz >= self.freq_max_hz:
            raise ValueError(f"freq_min_hz ({self.freq_min_hz}) must be below freq_max_hz ({self.freq_max_hz})")
        return self


class PeakParams(_Params):
    """Locally exclusive threshold detection and center-of-mass localization."""

    threshold_mad: float = Field(5.0, gt=0, le=100,
                                 description="Detection threshold in units of each channel's noise MAD.")
    peak_sign: Literal["neg", "pos", "both"] = Field("neg", description="Polarity of peaks to detect.")
    exclusion_radius_um: float = Field(
        50.0, ge=0, le=1000, description="A peak must be the largest within this distance (µm).")
    sweep_ms: float = Field(0.1, ge=0, le=5,
                            description="... and within this many ms before and after (ms).")
    localization: Literal["center_of_mass", "monopolar_triangulation"] = Field(
        "center_of_mass", description="How a peak's position is estimated from its neighbourhood's amplitudes.")
    localization_radius_um: float = Field(
        75.0, gt=0, le=1000, description="Channels within this distance are used to localize a peak (µm).")
    noise_sample_chunks: int = Field(
        20, ge=1, le=1000, description="Chunks sampled to estimate each channel's noise level (MAD).")
    noise_sample_duration_s: float = Field(
        0.33, gt=0.005, le=60, description="Length of each chunk sampled for the noise level (s).")
    write_to_nwb: bool = Field(False, description="Also write peaks to the NWB file as an EventsTable.")


class MotionParams(_Params):
    """MEDiCINe motion estimation from peaks, and motion correction of the preprocessed traces.

    The defaults are ours (measured in benchmarks/RESULTS.md); :meth:`paper`
    gives the hyper-parameters of the MEDiCINe paper and its reference package.
    """

    time_bin_s: float = Field(1.0, gt=0, le=60, description="Motion time resolution (s).")
    num_depth_bins: int = Field(2, ge=1, le=64,
                                description="Depth levels of the motion (1: rigid); interpolated linearly between.")
    time_kernel_width_s: float = Field(
        10.0, ge=0, le=3600, description="Width of the triangular smoothing kernel over time (s); the paper: 30 "
                                         "(which blurs step-like drift: benchmarks/RESULTS.md).")
    motion_bound_um: float = Field(800.0, gt=0, le=20000,
                                   description="Bound on the peak-to-peak motion (µm); the motion is b*tanh(M).")
    time_interpolation: Literal["linear", "bin"] = Field(
        "linear", description="A peak's motion: linear between time-bin centres, or its bin's value (the paper).")
    amplitude_threshold_quantile: float = Field(
        0.0, ge=0, lt=1, description="Fraction of smallest-|amplitude| peaks ignored.")
    hidden_features: tuple[int, ...] = Field(
        (96, 96), min_length=1, max_length=4,
        description="Hidden layer widths of the activity network (the paper: 256, 256; 128, 128: 0.05 µm lower "
                    "error for 1.4x the fit time, benchmarks/RESULTS.md).")
    batch_size: int = Field(4096, ge=64, le=1 << 20, description="Real peaks per step (as many negatives).")
    training_steps: int = Field(4000, ge=1, le=1_000_000,
                                description="Optimizer steps (at most); the paper: 10 000.")
    learning_rate: float = Field(5e-4, gt=0, le=1, description="Adam learning rate.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    initial_motion_noise: float = Field(
        0.1, ge=0, le=1, description="Std of the Gaussian noise added to the motion at step 0 (normalized depth).")
    motion_noise_steps: int = Field(2000, ge=1, description="Steps over which that noise decays linearly to 0.")
    average_steps: int = Field(
        200, ge=0, description="Once the motion noise is gone, report the motion averaged over about this many "
                               "steps (exponential average); 0: the last step's motion (the paper).")
    early_stop_tolerance_um: float = Field(
        0.05, ge=0, description="Stop once the averaged motion moved less than this (µm, mean over bins) between "
                               "two checks 250 steps apart; 0: run every step (the paper).")
    write_corrected_traces: bool = Field(
        True, description="Also write the motion-corrected preprocessed traces (the sorter's input).")
    interpolation: Literal["kriging", "idw", "nearest"] = Field(
        "kriging", description="How corrected traces are interpolated from neighbouring channels.")
    border: Literal["clamp", "zeros"] = Field(
        "clamp", description="Corrected positions off the probe: 'clamp' reads them at the nearest point of the "
                             "probe's extent (every channel keeps its noise level, which the sorter needs); "
                             "'zeros' zeroes them (SpikeInterface's force_zeros).")
    kriging_sigma_um: float = Field(20.0, gt=0, le=500, description="Length scale of the kriging kernel (µm).")
    kriging_p: float = Field(1.0, gt=0, le=2, description="Exponent of the kriging kernel exp(-(d/sigma)^p).")
    correction_radius_um: float = Field(
        100.0, gt=0, le=1000, description="Channels farther than this from a target position do not contribute (µm).")
    idw_num_closest: int = Field(
        3, ge=1, le=64, description="Nearest channels averaged by 'idw' interpolation (SpikeInterface's num_closest).")

    @classmethod
    def paper(cls, **overrides) -> MotionParams:
        """The MEDiCINe paper's / reference package's settings: 256-wide network, 30 s kernel, motion
        constant over a time bin, the last step's motion, all 10 000 steps run."""
        return cls(**{"time_interpolation": "bin", "hidden_features": (256, 256), "average_steps": 0,
                      "early_stop_tolerance_um": 0.0, "time_kernel_width_s": 30.0, "training_steps": 10_000,
                      **overrides})


#: Who can sort: the names of :data:`nwbflow.ephys.sorting.registry.SORTERS` (the UI shows them as a list).
SorterName = Literal[tuple(SORTERS)]


class SortingParams(_Params):
    """Spike sorting on the motion-corrected, whitened traces: detection, SVD features, clustering,
    template matching with residual subtraction, merges, quality metrics.

    Amplitude thresholds are in units of the whitened noise (each channel's robust standard deviation).
    """

    sorter: SorterName = Field(
        "nwbflow", description="Who sorts: 'nwbflow' (ours, template matching in torch, on the preprocessed and "
                               "motion-corrected traces) or a SpikeInterface sorter installed here, run on the raw "
                               "series with its own preprocessing (our preprocess, peaks and motion then run only "
                               "when asked for).")
    sorter_params: dict[str, float | int | str | bool | None] = Field(
        default_factory=dict, description="Parameters passed to a SpikeInterface sorter (ignored by 'nwbflow').")
    detect_threshold_mad: float = Field(
        5.5, gt=1, le=50, description="Threshold of the per-channel detection that samples waveforms for the "
                                      "temporal basis and the detection prototypes (noise MAD units).")
    footprint_threshold: float = Field(
        5.0, gt=1, le=100, description="Threshold of the detection that feeds clustering: prototype waveforms "
                                       "matched and summed over channel footprints (that score's noise SDs).")
    ms_before: float = Field(0.7, gt=0.1, le=5, description="Template samples before the trough (ms).")
    ms_after: float = Field(1.3, gt=0.1, le=10, description="Template samples after the trough (ms).")
    temporal_components: int = Field(
        6, ge=1, le=16, description="Rank of the SVD temporal basis each channel's waveform is projected on.")
    clustering_radius_um: float = Field(
        60.0, gt=0, le=500, description="Spikes are clustered on the channels within this distance of their "
                                        "peak channel (µm).")
    template_radius_um: float = Field(
        100.0, gt=0, le=1000, description="Templates are kept on channels within this distance of their "
                                          "peak channel, zero beyond (µm).")
    max_spikes_per_channel: int = Field(
        3000, ge=100, le=100_000, description="Spikes per peak channel kept for clustering (a uniform random "
                                              "subset of the whole recording).")
    min_cluster_spikes: int = Field(
        20, ge=5, le=10_000, description="Smallest cluster that becomes a template (spikes in the subset).")
    bimodality_threshold: float = Field(
        0.5, gt=0, lt=1, description="Two clusters stay apart when the dip between them along the line of "
                                     "their centres is deeper than this fraction of the smaller mode.")
    match_threshold: float = Field(
        6.0, gt=1, le=100, description="A template match is a spike when its matched-filter output reaches "
                                       "this many noise standard deviations.")
    match_passes: int = Field(
        8, ge=1, le=50, description="Match-and-subtract passes per chunk (later passes find overlapping spikes).")
    template_update_passes: int = Field(
        1, ge=0, le=5, description="Full matching passes whose spikes re-estimate the templates before the "
                                   "final pass.")
    template_update_s: float = Field(
        120.0, gt=0, le=86_400, description="Recording matched by each template-update pass: chunks sampled "
                                           "uniformly up to this duration (s); the final pass matches all of it.")
    merge_similarity: float = Field(
        0.9, gt=0, le=1, description="Units whose templates correlate at least this much (best lag) are "
                                     "merged when their cross-correlogram is refractory.")
    refractory_ms: float = Field(1.5, gt=0, le=10,
                                 description="Refractory period for merges and the ISI violation metric (ms).")
    min_unit_spikes: int = Field(
        10, ge=1, le=100_000, description="Units with fewer matched spikes are dropped.")
    waveform_spikes: int = Field(
        300, ge=10, le=10_000, description="Spikes per unit (random) averaged into waveform_mean / waveform_sd.")
    presence_bin_s: float = Field(60.0, gt=0, le=3600,
                                  description="Bin of the presence_ratio quality metric (s).")

    @model_validator(mode="after")
    def _radii_are_nested(self) -> SortingParams:
        if self.clustering_radius_um > self.template_radius_um:
            raise ValueError(f"clustering_radius_um ({self.clustering_radius_um}) must not exceed "
                             f"template_radius_um ({self.template_radius_um})")
        return self


#: The shipped calcium network (nwbflow/ophys/weights/<name>.pt), the default of CalciumParams.model.
CALCIUM_MODEL = "nwbflow-cnn-v3"


class CalciumParams(_Params):
    """Calcium spike inference: ΔF/F from a RoiResponseSeries -> spike rate (Hz) per frame."""

    method: Literal["cnn", "ar1"] = Field(
        "cnn", description="'cnn': the shipped network (nwbflow.ophys); 'ar1': non-negative AR(1) deconvolution.")
    model: str = Field(CALCIUM_MODEL, min_length=1, max_length=100,
                       description="Name of the shipped network (method 'cnn').")
    roi_series: tuple[str, ...] | str | None = Field(
        None, description="Object path(s) of the RoiResponseSeries to read (e.g. "
                          "'processing/ophys/Fluorescence/RoiResponseSeries'); default: each segmentation's traces, "
                          "chosen by role (README: which ROI series).")
    input_kind: Literal["auto", "fluorescence", "dff"] = Field(
        "auto", description="What the series holds: raw fluorescence (ΔF/F is computed) or ΔF/F already; 'auto': "
                            "ΔF/F when it sits in a DfOverF container, else fluorescence.")
    neuropil_series: str | None = Field(
        None, description="Object path of a RoiResponseSeries of neuropil traces of the same ROIs, subtracted "
                          "(times neuropil_coefficient) before ΔF/F; only with raw fluorescence and one ROI "
                          "series. Default: the neuropil series of the traces' container, when there is one.")
    @field_validator("roi_series", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        return (value,) if isinstance(value, str) else value

    neuropil_coefficient: float = Field(0.7, ge=0, le=2,
                                        description="F - coefficient x neuropil (unitless).")
    baseline_window_s: float = Field(60.0, gt=1, le=3600,
                                     description="Running window of the robust F0 baseline (s).")
    baseline_percentile: float = Field(10.0, ge=0, le=50,
                                       description="Percentile of 0.5 s bin means taken as F0 in each window.")
    ar1_sparsity: float = Field(4.0, ge=0, le=100,
                                description="AR(1): L1 penalty in units of the trace's noise sd (unitless); "
                                            "default tuned on the ground truth (benchmarks/calcium.py).")
    ar1_dff_per_spike: float = Field(0.29, gt=0, le=10,
                                     description="AR(1): ΔF/F jump of one spike, to turn jumps into spikes; "
                                                 "default calibrated on the ground truth.")


class ChunkSizes(_Params):
    """How much of the recording each stage computes at once: memory and speed, and through the order
    of floating-point sums the last bits of its output (so they enter the stages' cache keys)."""

    preprocess_s: float = Field(1.0, gt=0.01, le=60,
                                description="Preprocess: samples filtered and whitened at once (s; on the CPU "
                                            "also kept to ~16 MB windows).")
    peaks_s: float = Field(1.0, gt=0.01, le=60, description="Peaks: samples detected and localized at once (s).")
    motion_correction_s: float = Field(
        1.0, gt=0.01, le=60, description="Motion correction: samples interpolated at once (s; on the CPU also "
                                         "kept to ~16 MB).")
    sorting_s: float = Field(2.0, gt=0.05, le=60, description="Sorting: samples detected and matched at once (s).")
    calcium_windows: int = Field(64, ge=1, le=65536,
                                 description="Calcium: CNN windows (of 4096 samples at the model rate) per "
                                             "forward pass.")


#: The chunk sizes kernels use when the caller gives none (the policy's defaults).
DEFAULT_CHUNKS = ChunkSizes()


class ExecutionPolicy(_Params):
    """How a run computes, apart from what it computes: device, threads, seed, chunk sizes, time limit.

    Travels with every stage and into every provenance row (``execution.*`` parameters). The seed and
    the chunk sizes change results, so they enter the stages' cache keys; the device, the threads and
    the time limit do not (a result computed on another device is reused). Out-of-memory errors are
    handled inside the kernels (the chunk is halved and the stage goes on: ``nwbflow.device.OomBackoff``);
    Prefect retries transient I/O errors only.
    """

    device: DeviceName = Field("auto", description="Compute device; 'auto' picks CUDA when present.")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads a stage's torch operations use; default: this run's share "
                                         "of the cores (the cores it may use / NWBFLOW_RUNS_AT_ONCE, which "
                                         "`nwbflow worker --limit N` sets).")
    seed: int = Field(0, ge=0, description="Seed of every random choice: sampled chunks, clustering subsets, "
                                           "the motion fit, waveform spikes.")
    chunks: ChunkSizes = Field(default_factory=ChunkSizes)
    stage_timeout_s: float | None = Field(
        None, gt=0, description="Stop a stage that runs longer than this (s); checked between chunks. "
                                "Default: no limit.")
    keep_preprocessed_binary: bool = Field(
        False, description="Keep the preprocessed binary after the motion stage wrote a corrected one (by default "
                           "it is deleted once a series' stages have run: the sorter reads the corrected one; "
                           "~83 GB per recording-hour at 384 channels).")
    series_at_once: int = Field(
        1, ge=1, le=64, description="Series (probes, imaging planes) processed at once, each its own chain of "
                                    "stages; on CUDA each stage holds a 'gpu' slot. Torch's CPU threads are "
                                    "one pool per process: on the CPU, leave 1.")

    def chunk(self, stage: str) -> float | int:
        """The chunk size of ``stage`` (s; calcium: windows); None for stages that do not stream (motion's fit)."""
        field = {"preprocess": "preprocess_s", "peaks": "peaks_s", "motion": "motion_correction_s",
                 "sorting": "sorting_s", "calcium": "calcium_windows"}[stage]
        return getattr(self.chunks, field)

    def cpu_threads(self) -> int:
        """The CPU threads a stage uses: ``threads``, or the run's share of the cores
        (:func:`nwbflow.cpu_threads.default_threads`)."""
        return self.threads if self.threads is not None else default_threads()

    def result_affecting(self, stage: str) -> dict:
        """What of the policy changes ``stage``'s output (its cache key holds it): the seed and its chunk."""
        return {"seed": self.seed, "chunk": self.chunk(stage)}

    def for_provenance(self, stage: str, device: str) -> dict:
        """The policy as ``stage`` ran under it (its chunk; the device it resolved to), for its provenance row."""
        return {"device": device, "threads": self.cpu_threads(), "seed": self.seed, "chunk": self.chunk(stage),
                "stage_timeout_s": self.stage_timeout_s}


class WriteParams(_Params):
    """What the processed file holds besides the results."""

    copy_raw: bool = Field(
        False, description="Also copy the bulk acquisition data (every continuous ElectricalSeries, raw or LFP, "
                           "and imaging stacks such as TwoPhotonSeries) for a self-contained file; default: a lean "
                           "file naming them by the raw file's identifier and object path.")


class SessionParams(_Params):
    """What `process_session` runs on one NWB file."""

    stages: tuple[StageName, ...] | None = Field(
        None, description="Stages to run; default: every built stage that applies to the file's content.")
    electrical_series: tuple[str, ...] | str | None = Field(
        None, description="Object path(s) of the ElectricalSeries to process (e.g. "
                          "'acquisition/ElectricalSeriesAPImec0'); default: every one sampled at >= 10 kHz (each "
                          "probe's raw band; LFP bands are skipped).")
    execution: ExecutionPolicy = Field(default_factory=ExecutionPolicy)
    write: WriteParams = Field(default_factory=WriteParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    peaks: PeakParams = Field(default_factory=PeakParams)
    motion: MotionParams = Field(default_factory=MotionParams)
    sorting: SortingParams = Field(default_factory=SortingParams)
    calcium: CalciumParams = Field(default_factory=CalciumParams)

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if stages is None else tuple(s for s in STAGE_ORDER if s in stages)

    @field_validator("electrical_series", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        return (value,) if isinstance(value, str) else value


def load_session_params(path: str | Path | None, *, stages: list[str] | None = None,
                        device: str | None = None) -> SessionParams:
    """Read SessionParams from a JSON or YAML file, then apply the command line's ``stages`` and ``device``.

    Raises BadInputError naming the file and the offending field.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise BadInputError(f"cannot read parameter file ({exc.strerror})", path=path,
                                fix="pass an existing JSON or YAML file to --params") from exc
        try:
            data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise BadInputError(f"not valid JSON/YAML: {exc}", path=path) from exc
        if not isinstance(data, dict):
            raise BadInputError("parameter file must hold a mapping at top level", path=path)
    if stages is not None:
        data["stages"] = stages
    if device is not None and isinstance(data.get("execution", {}), dict):  # else validation names the problem
        data["execution"] = {**data.get("execution", {}), "device": device}
    try:
        return SessionParams.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInputError(f"invalid parameters: {problems}", path=path,
                            fix="see `nwbflow run --help` and the parameter descriptions") from exc
