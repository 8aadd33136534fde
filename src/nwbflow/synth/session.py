"""``write_synthetic_session``: the NWB file's metadata and the order of the steps."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nwbflow.atomic import atomic_path
from nwbflow.errors import BadInputError
from nwbflow.synth.config import SynthConfig, session_identifier
from nwbflow.synth.ephys import _add_ephys, make_ephys_recording
from nwbflow.synth.groundtruth import GroundTruthPaths, _write_sidecars, ground_truth_paths
from nwbflow.synth.ophys import _add_ophys, simulate_ophys

logger = logging.getLogger(__name__)

_SESSION_START = datetime(2024, 1, 15, 10, 0, 0, tzinfo=UTC)


def _new_nwbfile(config: SynthConfig):
    from pynwb import NWBFile
    from pynwb.file import Subject

    from nwbflow import __version__

    identifier = session_identifier(config)
    modalities = [m for m, on in (("extracellular electrophysiology", config.ephys),
                                  ("two-photon calcium imaging", config.ophys)) if on]
    subject = Subject(subject_id=f"synth-mouse-{config.seed}", species="Mus musculus",
                      sex="MF"[config.seed % 2], age="P90D", strain="C57BL/6J",
                      description="Simulated subject: no animal was used; data are synthetic.")
    return NWBFile(
        session_description=f"Synthetic {' and '.join(modalities)} session with ground truth "
                            f"(nwbflow.synth, seed {config.seed}, {config.duration_s:g} s).",
        identifier=identifier, session_id=f"synth-seed{config.seed}-{identifier[:8]}",
        session_start_time=_SESSION_START + timedelta(days=config.seed % 365),
        experimenter=["Synthetic, Data"], lab="nwbflow synthetic data", institution="nwbflow",
        experiment_description="Simulated recording for testing and demonstrating the nwbflow pipeline; "
                               "ground truth is stored in sidecar files next to this file.",
        keywords=["synthetic", "ground truth", *modalities],
        source_script="nwbflow.synth.write_synthetic_session", source_script_file_name="nwbflow/synth/session.py",
        was_generated_by=[["nwbflow", __version__]], subject=subject)


def _check_target(path: Path, overwrite: bool) -> None:
    if path.suffix != ".nwb":
        raise BadInputError("output name must end with .nwb", path=path, fix="e.g. session.nwb")
    if not path.parent.is_dir():
        raise BadInputError("output folder does not exist", path=path, fix="create the folder first")
    if path.exists() and not overwrite:
        raise BadInputError("output file exists", path=path, fix="delete it or pass overwrite=True")


def write_synthetic_session(path: str | os.PathLike, config: SynthConfig = SynthConfig(), *,
                            overwrite: bool = False) -> GroundTruthPaths:
    """Simulate ``config`` and write ``path`` (NWB) plus its ground-truth sidecars.

    The NWB file is streamed to a hidden temporary beside ``path``, the sidecars are
    written (each atomically), then the NWB file is renamed into place: a killed run
    leaves no partial ``.nwb``.

    Parameters
    ----------
    path : output file, ending in ``.nwb``; its folder must exist.
    config : what to simulate.
    overwrite : replace an existing file.

    Returns
    -------
    GroundTruthPaths of the files written (fields of absent modalities are None).
    """
    from pynwb import NWBHDF5IO

    target = Path(path)
    _check_target(target, overwrite)
    started = time.perf_counter()
    synth = make_ephys_recording(config) if config.ephys else None
    ophys = simulate_ophys(config) if config.ophys else None
    nwbfile = _new_nwbfile(config)
    iterator = _add_ephys(nwbfile, synth, config) if synth is not None else None
    if ophys is not None:
        _add_ophys(nwbfile, ophys, config)

    with atomic_path(target, suffix=".nwb") as tmp:
        with NWBHDF5IO(str(tmp), mode="w") as io:
            io.write(nwbfile)
        # Sidecars first: once the NWB is in place its ground truth is too.
        sidecars = _write_sidecars(ground_truth_paths(target), config, synth, ophys)
    clipped = iterator.num_clipped if iterator is not None else 0
    logger.info("wrote %s in %.2f s (%d int16-clipped samples)", target, time.perf_counter() - started, clipped)
    return sidecars
