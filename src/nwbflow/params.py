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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nwbflow.errors import BadInputError

StageName = Literal["preprocess", "peaks", "motion", "sorting", "calcium"]
STAGE_ORDER: tuple[str, ...] = ("preprocess", "peaks", "motion", "sorting", "calcium")
DeviceName = Literal["auto", "cpu", "cuda"]


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def as_json(self) -> str:
        """The resolved parameters as compact, key-sorted JSON (for provenance)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class PreprocessParams(_Params):
    """Offset removal, median common reference, zero-phase band-pass, ZCA whitening."""

    freq_min_hz: float = Field(300.0, gt=0, description="Band-pass low cut-off (Hz).")
    freq_max_hz: float = Field(6000.0, gt=0,
                               description="Band-pass high cut-off (Hz); must be below Nyquist.")
    filter_order: int = Field(3, ge=1, le=8,
                              description="Butterworth order of each pass (applied forward and backward).")
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
    chunk_duration_s: float = Field(1.0, gt=0.01, le=60, description="Samples processed at once (s).")

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


class SessionParams(_Params):
    """What `process_session` runs on one NWB file."""

    stages: tuple[StageName, ...] | None = Field(
        None, description="Stages to run; default: every built stage that applies to the file's content.")
    device: DeviceName = Field("auto", description="Compute device; 'auto' picks CUDA when present.")
    electrical_series: str | None = Field(
        None, description="Object path of the ElectricalSeries to process (e.g. 'acquisition/ElectricalSeriesAP'); "
                          "default: the only raw-band series.")
    stage_timeout_s: float | None = Field(
        None, gt=0, description="Stop a stage that runs longer than this (s); checked between chunks. "
                                "Default: no limit.")
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    peaks: PeakParams = Field(default_factory=PeakParams)

    @model_validator(mode="after")
    def _stages_in_order(self) -> SessionParams:
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(s for s in STAGE_ORDER if s in self.stages))
        return self


def load_session_params(path: str | Path | None, **overrides) -> SessionParams:
    """Read SessionParams from a JSON or YAML file, then apply keyword overrides.

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
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SessionParams.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInputError(f"invalid parameters: {problems}", path=path,
                            fix="see `nwbflow run --help` and the parameter descriptions") from exc
