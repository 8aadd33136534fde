"""Ground-truth sidecars: their names, atomic writing and reading back (``load_ground_truth``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nwbflow.atomic import atomic_path
from nwbflow.errors import BadInputError
from nwbflow.synth.config import INDICATORS, SynthConfig, session_identifier
from nwbflow.synth.ephys import _MS_AFTER, _MS_BEFORE, ELECTRICAL_SERIES_PATH, ELECTRODES_PATH, SynthRecording
from nwbflow.synth.ophys import PLANE_SEGMENTATION_PATH, ROI_RESPONSE_SERIES_PATH, OphysTruth

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "nwbflow-groundtruth"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class GroundTruthPaths:
    """The NWB file and its ground-truth sidecars; a field is None when not written."""

    nwb: Path
    metadata: Path
    ephys_spikes: Path | None = None
    ophys_spikes: Path | None = None
    drift: Path | None = None


def ground_truth_paths(nwb_path: str | os.PathLike) -> GroundTruthPaths:
    """Every sidecar name of ``nwb_path`` (``X.nwb`` -> ``X.groundtruth*.{json,parquet,npz}``).

    The one place the naming rule lives; all fields are set, whether the files exist or not.
    """
    nwb = Path(nwb_path)
    stem = nwb.name[:-4] if nwb.name.endswith(".nwb") else nwb.name
    side = nwb.with_name(f"{stem}.groundtruth")
    return GroundTruthPaths(
        nwb=nwb,
        metadata=side.with_name(side.name + ".json"),
        ephys_spikes=side.with_name(side.name + "_ephys.parquet"),
        ophys_spikes=side.with_name(side.name + "_ophys.parquet"),
        drift=side.with_name(side.name + "_drift.npz"),
    )


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array(values) for name, values in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        np.savez(stream, **arrays)


def _ephys_metadata(synth: SynthRecording, config: SynthConfig) -> dict[str, Any]:
    templates = synth.templates_uv
    troughs = templates.min(axis=1)  # (units, channels)
    vector = synth.sorting.to_spike_vector()
    counts = np.bincount(vector["unit_index"], minlength=config.num_units)
    units = [dict(unit_id=u, location_um=synth.unit_locations_um[u].tolist(),
                  best_channel_index=int(np.argmin(troughs[u])), trough_uv=float(troughs[u].min()),
                  firing_rate_hz=float(counts[u] / config.duration_s))
             for u in range(config.num_units)]
    return dict(electrical_series_path=ELECTRICAL_SERIES_PATH, electrodes_path=ELECTRODES_PATH,
                sampling_rate_hz=config.sampling_rate_hz, num_samples=int(synth.recording.get_num_samples()),
                lsb_uv=config.lsb_uv, channel_positions_um=synth.probe.contact_positions.tolist(),
                noise_level_uv=config.noise_level_uv, template_ms_before=_MS_BEFORE,
                template_ms_after=_MS_AFTER, units=units)


def _ophys_metadata(truth: OphysTruth, config: SynthConfig) -> dict[str, Any]:
    names = sorted(truth.roi_params)
    rois = [{"roi_index": r, **{k: np.asarray(truth.roi_params[k][r]).tolist() for k in names}}
            for r in range(config.num_rois)]
    return dict(roi_response_series_path=ROI_RESPONSE_SERIES_PATH, plane_segmentation_path=PLANE_SEGMENTATION_PATH,
                indicator=config.indicator, kinetics=dataclasses.asdict(INDICATORS[config.indicator]),
                imaging_rate_hz=config.imaging_rate_hz, num_frames=int(truth.fluorescence_au.shape[0]),
                frame_sampling="mean over each frame's exposure [k/rate, (k+1)/rate) s of a <= 1 ms grid",
                model="F = F0 exp(-t/bleach) slow(t) (1 + dF/F) + r * neuropil + shot(sqrt(gain F)) + read(2 a.u.)",
                rois=rois)


def _write_sidecars(paths: GroundTruthPaths, config: SynthConfig, synth: SynthRecording | None,
                    ophys: OphysTruth | None) -> GroundTruthPaths:
    """Write every sidecar (atomically); returns the paths written (None where absent)."""
    meta: dict[str, Any] = dict(format=SIDECAR_FORMAT, version=SIDECAR_VERSION, nwb_file=paths.nwb.name,
                                nwb_identifier=session_identifier(config), seed=config.seed,
                                config=config.as_dict(), ephys=None, ophys=None, drift=None)
    written = dict(ephys_spikes=None, ophys_spikes=None, drift=None)
    if synth is not None:
        vector = synth.sorting.to_spike_vector()
        samples = vector["sample_index"].astype(np.int64)
        _write_parquet(paths.ephys_spikes, dict(unit_id=vector["unit_index"].astype(np.int64), sample_index=samples,
                                                time_s=samples / config.sampling_rate_hz))
        meta["ephys"], written["ephys_spikes"] = _ephys_metadata(synth, config), paths.ephys_spikes
    if synth is not None and synth.drift is not None:
        _write_npz(paths.drift, dataclasses.asdict(synth.drift))
        meta["drift"] = dict(file=paths.drift.name, mode=config.drift_mode, rigid=True, direction="vertical (y)",
                             amplitude_um=config.drift_amplitude_um,
                             period_s=config.drift_period_s or config.duration_s / 2.0, step_um=1.0,
                             sign="a unit at depth y appears at y + displacement_um (SpikeInterface Motion)",
                             peak_to_peak_um=float(np.ptp(synth.drift.displacement_um)))
        written["drift"] = paths.drift
    if ophys is not None:
        _write_parquet(paths.ophys_spikes, dict(roi_index=ophys.spike_roi_index, time_s=ophys.spike_times_s))
        meta["ophys"], written["ophys_spikes"] = _ophys_metadata(ophys, config), paths.ophys_spikes
    text = json.dumps(meta, indent=1, sort_keys=True)
    with atomic_path(paths.metadata) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return GroundTruthPaths(nwb=paths.nwb, metadata=paths.metadata, **written)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The ground truth of one synthetic session, read back from its sidecars.

    Attributes
    ----------
    paths : the sidecar paths (None where the modality is absent).
    config : the SynthConfig that made the session.
    metadata : the parsed ``.groundtruth.json``.
    ephys_unit_id, ephys_sample_index, ephys_time_s : (N,) int64, int64, float64 (s).
    unit_locations_um : (num_units, 3) float64 (µm).
    ophys_roi_index, ophys_time_s : (M,) int64, float64 (s).
    drift_time_bins_s, drift_depth_bins_um, drift_displacement_um : (T,), (D,), (T, D) or None.
    """

    paths: GroundTruthPaths
    config: SynthConfig
    metadata: dict[str, Any]
    ephys_unit_id: np.ndarray | None = None
    ephys_sample_index: np.ndarray | None = None
    ephys_time_s: np.ndarray | None = None
    unit_locations_um: np.ndarray | None = None
    ophys_roi_index: np.ndarray | None = None
    ophys_time_s: np.ndarray | None = None
    drift_time_bins_s: np.ndarray | None = None
    drift_depth_bins_um: np.ndarray | None = None
    drift_displacement_um: np.ndarray | None = None

    def spike_trains(self, unit_id: int, *, in_samples: bool = False) -> np.ndarray:
        """Spike times (s, float64) of one unit, or sample indices (int64) with ``in_samples``."""
        self._require(self.ephys_unit_id, "ephys")
        values = self.ephys_sample_index if in_samples else self.ephys_time_s
        return values[self.ephys_unit_id == unit_id]

    def roi_spike_trains(self, roi_index: int) -> np.ndarray:
        """Ground-truth spike times (s) of one ROI."""
        self._require(self.ophys_roi_index, "ophys")
        return self.ophys_time_s[self.ophys_roi_index == roi_index]

    def to_sorting(self):
        """The ephys ground truth as a SpikeInterface ``NumpySorting`` (unit ids 0..num_units-1)."""
        from spikeinterface.core import NumpySorting

        self._require(self.ephys_unit_id, "ephys")
        return NumpySorting.from_samples_and_labels(
            [self.ephys_sample_index], [self.ephys_unit_id], self.config.sampling_rate_hz,
            unit_ids=np.arange(self.config.num_units))

    def _require(self, values: np.ndarray | None, modality: str) -> None:
        if values is None:
            raise BadInputError(f"this session has no {modality} ground truth", path=self.paths.nwb)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise BadInputError("ground-truth sidecar is missing", path=path, fix="re-run write_synthetic_session")
    return {name: column.to_numpy() for name, column in zip(pq.read_schema(path).names,
                                                               pq.read_table(path).columns)}


def _check_identifier(paths: GroundTruthPaths, expected: str) -> None:
    """Refuse sidecars that belong to another version of the NWB file."""
    import h5py

    if not paths.nwb.is_file():
        logger.warning("%s not found: ground truth read without checking its identifier", paths.nwb)
        return
    with h5py.File(paths.nwb, "r") as handle:
        found = handle["identifier"][()]
    found = found.decode() if isinstance(found, bytes) else str(found)
    if found != expected:
        raise BadInputError(f"sidecars describe identifier {expected}, the file has {found}",
                            path=paths.nwb, fix="re-run write_synthetic_session")


def load_ground_truth(nwb_path: str | os.PathLike) -> GroundTruth:
    """Read the sidecars of ``nwb_path`` back (see the ``nwbflow.synth`` docstring for names and columns)."""
    names = ground_truth_paths(nwb_path)
    if not names.metadata.is_file():
        raise BadInputError("no ground truth beside this file", path=names.metadata,
                            fix="only sessions written by nwbflow.synth have ground truth")
    meta = json.loads(names.metadata.read_text(encoding="utf-8"))
    if meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        raise BadInputError(f"unsupported ground-truth format {meta.get('format')!r} v{meta.get('version')!r}",
                            path=names.metadata)
    _check_identifier(names, meta["nwb_identifier"])
    values: dict[str, Any] = {}
    paths = dict(ephys_spikes=None, ophys_spikes=None, drift=None)
    if meta["ephys"] is not None:
        table = _read_parquet(names.ephys_spikes)
        values.update(ephys_unit_id=table["unit_id"], ephys_sample_index=table["sample_index"],
                      ephys_time_s=table["time_s"],
                      unit_locations_um=np.array([u["location_um"] for u in meta["ephys"]["units"]], float))
        paths["ephys_spikes"] = names.ephys_spikes
    if meta["ophys"] is not None:
        table = _read_parquet(names.ophys_spikes)
        values.update(ophys_roi_index=table["roi_index"], ophys_time_s=table["time_s"])
        paths["ophys_spikes"] = names.ophys_spikes
    if meta["drift"] is not None:
        with np.load(names.drift) as arrays:
            values.update(drift_time_bins_s=arrays["time_bins_s"], drift_depth_bins_um=arrays["depth_bins_um"],
                          drift_displacement_um=arrays["displacement_um"])
        paths["drift"] = names.drift
    return GroundTruth(paths=GroundTruthPaths(nwb=names.nwb, metadata=names.metadata, **paths),
                       config=SynthConfig.from_dict(meta["config"]), metadata=meta, **values)
