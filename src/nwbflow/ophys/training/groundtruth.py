"""Public simultaneous imaging + electrophysiology ground truth in CASCADE's format.

Each dataset is a folder ``DSxx-<indicator>-<species>-<area>[-...]`` of
``.mat`` files, one neuron per file, holding a struct array ``CAttached``
with one element per recording: ``fluo_time`` (frame times, s),
``fluo_mean`` (ΔF/F) and ``events_AP`` (spike times in units of 0.1 ms).
We read them from a local copy of PTRRupprecht/Autocalibrated-spike-inference
(folder ``GT_autocalibration``); the data are never committed to nwbflow.

Datasets DS09 and DS14 (Chen et al. 2013, GENIE project) are refused: the
Spikefinder challenge's GCaMP6 sets come from those recordings, and
Spikefinder is our held-out benchmark.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io

from nwbflow.errors import BadInputError

log = logging.getLogger(__name__)

GT_REPO = "PTRRupprecht/Autocalibrated-spike-inference"
GT_COMMIT = "b2bb9430136437bd75a467c5fe05e14924e4c6d6"
GT_FOLDER = "GT_autocalibration"
#: Datasets never used (prefix -> why).
EXCLUDED = {
    "DS09": "Chen et al. 2013 GCaMP6f recordings, the source of Spikefinder's GCaMP6f set (held-out benchmark)",
    "DS14": "Chen et al. 2013 GCaMP6s recordings, the source of Spikefinder's GCaMP6s set (held-out benchmark)",
}
#: A recording is split where frames are missing for longer than this many frame intervals.
GAP_FRAMES = 2.5


def indicator_family(dataset: str) -> str:
    """The indicator family of a dataset folder name, e.g. ``DS31-GCaMP8m-m-V1`` -> ``GCaMP8``.

    Examples
    --------
    >>> indicator_family("DS12-GCaMP6s-m-V1-neuropil-corrected"), indicator_family("DS30-GCaMP8f-m-V1")
    ('GCaMP6s', 'GCaMP8')
    """
    indicator = dataset.split("-")[1]
    match = re.match(r"(?:j)?GCaMP(\d)([a-z]?)", indicator)
    if match is None:
        return "OGB" if indicator.upper().startswith("OGB") else indicator
    number, kind = match.groups()
    return f"GCaMP{number}" if number == "8" else f"GCaMP{number}{kind}"


@dataclass(frozen=True)
class Recording:
    """One continuous recording of one neuron.

    Attributes
    ----------
    times_s : (n,) frame times (s), increasing.
    dff : (n,) ΔF/F (unitless).
    spike_times_s : (k,) spike times (s) within the frames' span.
    """

    times_s: np.ndarray
    dff: np.ndarray
    spike_times_s: np.ndarray

    @property
    def rate_hz(self) -> float:
        return float(1.0 / np.median(np.diff(self.times_s)))


@dataclass
class GtDataset:
    """One ground-truth dataset: its name, family, neurons (each a list of recordings), files."""

    name: str
    family: str
    neurons: list[list[Recording]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def rate_hz(self) -> float:
        return float(np.median([r.rate_hz for n in self.neurons for r in n]))

    def provenance(self) -> dict:
        return {"repo": GT_REPO, "commit": GT_COMMIT, "path": f"{GT_FOLDER}/{self.name}",
                "neurons": len(self.neurons), "files_sha256": self.sha256, "family": self.family,
                "frame_rate_hz": round(self.rate_hz, 2),
                "spikes": int(sum(r.spike_times_s.size for n in self.neurons for r in n))}


def _recordings(struct) -> list[Recording]:
    """The recordings of one ``CAttached`` element, split at missing frames."""
    times = np.asarray(struct["fluo_time"][0, 0], dtype=np.float64).ravel()
    dff = np.asarray(struct["fluo_mean"][0, 0], dtype=np.float64).ravel()
    spikes = np.asarray(struct["events_AP"][0, 0], dtype=np.float64).ravel() / 1e4
    good = np.isfinite(times) & np.isfinite(dff)
    times, dff = times[good], dff[good]
    if times.size < 100:
        return []
    step = np.median(np.diff(times))
    cuts = np.flatnonzero(np.diff(times) > GAP_FRAMES * step) + 1
    out = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, times.size]):
        if hi - lo < 100:
            continue
        t = times[lo:hi]
        inside = spikes[(spikes >= t[0]) & (spikes < t[-1] + step)]
        out.append(Recording(times_s=t, dff=dff[lo:hi].astype(np.float32), spike_times_s=np.sort(inside)))
    return out


def load_dataset(folder: Path) -> GtDataset:
    """Read every ``.mat`` file of one dataset folder (sorted by name)."""
    if folder.name[:4] in EXCLUDED:
        raise BadInputError(f"dataset {folder.name} is excluded: {EXCLUDED[folder.name[:4]]}", path=folder)
    dataset = GtDataset(name=folder.name, family=indicator_family(folder.name))
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.mat")):
        data = path.read_bytes()
        digest.update(hashlib.sha256(data).digest())
        struct = scipy.io.loadmat(path)["CAttached"].ravel()
        recordings = [r for element in struct for r in _recordings(element)]
        if recordings:
            dataset.neurons.append(recordings)
            dataset.files.append(path.name)
    dataset.sha256 = digest.hexdigest()
    return dataset


def find_datasets(data_dir: str | Path) -> list[Path]:
    """Dataset folders under ``data_dir`` (or ``data_dir/GT_autocalibration``), excluded ones left out."""
    root = Path(data_dir)
    if (root / GT_FOLDER).is_dir():
        root = root / GT_FOLDER
    if not root.is_dir():
        raise BadInputError("ground-truth folder not found", path=root,
                            fix=f"copy {GT_FOLDER}/ of github.com/{GT_REPO} (commit {GT_COMMIT[:10]}) there")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"DS\d\d-", p.name))
    skipped = [p.name for p in folders if p.name[:4] in EXCLUDED]
    if skipped:
        log.info("left out (Spikefinder sources): %s", ", ".join(skipped))
    folders = [p for p in folders if p.name[:4] not in EXCLUDED]
    if not folders:
        raise BadInputError("no DSxx-* dataset folders with .mat files", path=root,
                            fix=f"copy {GT_FOLDER}/ of github.com/{GT_REPO} there")
    return folders


def load_all(data_dir: str | Path) -> list[GtDataset]:
    """Every usable dataset under ``data_dir``, in name order."""
    datasets = [load_dataset(folder) for folder in find_datasets(data_dir)]
    for d in datasets:
        log.info("%s: %d neurons, %.0f Hz", d.name, len(d.neurons), d.rate_hz)
    return datasets
